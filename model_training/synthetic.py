"""``ecglab synth-mimic OUT``: a small FAKE data set in the real PhysioNet MIMIC-IV layout.

Why
---
MIMIC-IV is credentialed data, so the pipeline (``preprocess`` → ``train`` → ``evaluate`` →
``export``) needs a stand-in that CI and a demo can run end to end. The stand-in must (1) be
byte-compatible with the real files, so the same code reads both; (2) contain the dirty rows the
method (docs/method.md §1.2, §2.3) tells the pipeline to drop, so those filters are exercised; and
(3) carry *planted, learnable* signal, so a correctly built model scores well above chance on the
planted targets and at chance on the rest. Every value is synthetic; no real patient data is used.

Layout written under ``OUT`` (file names, column names and order, value formats)
-------------------------------------------------------------------------------
* ``mimic-iv/3.1/hosp/``: ``patients.csv.gz``, ``admissions.csv.gz``, ``d_labitems.csv.gz``,
  ``labevents.csv.gz``, ``omr.csv.gz``.
* ``mimic-iv-ed/2.2/ed/``: ``edstays.csv.gz``, ``vitalsign.csv.gz``.
* ``mimic-iv-ecg/1.0/``: ``record_list.csv``, ``machine_measurements.csv`` and WFDB records
  ``files/pNNNN/pNNNNNNNN/sNNNNNNNN/NNNNNNNN.{hea,dat}`` (see :mod:`model_training.synth_waveforms`).
* ``mimic-iv-ecg-ext-icd-labels/1.0.1/records_w_diag_icd10.csv``.
* ``ground_truth.json``: the hidden per-ECG state and the planted rules (not part of MIMIC).

Sources relied on (read through the project's search tools): the MIMIC-IV documentation pages on
mimic.mit.edu for ``labevents`` (column list and types), ``d_labitems`` (itemid unique per
fluid/category/label tuple) and ``admissions`` (columns, the nine ``admission_type`` values,
location vocabularies); the ``MIT-LCP/mimic-code`` concept SQL (``chemistry.sql``,
``complete_blood_count.sql``, ``cardiac_marker.sql``, ``coagulation.sql``, ``inflammation.sql``,
``bg.sql``) for every blood itemid used here; public dataset-viewer excerpts of ``labevents`` (value
``___`` with a numeric ``valuenum``, ``flag`` = ``abnormal``, ``priority`` ROUTINE/STAT, per-row
reference ranges) and of the ED triage table (vital signs written as ``88.0``, pain as text);
``AI4HealthUOL/ECG-MIMIC`` ``full_preprocessing.py`` for the exact column order and value formats of
``records_w_diag_icd10.csv`` (diagnosis columns are Python list literals, ``fold``/``strat_fold``
0-19, ``file_name`` prefixed with the zip's folder name); the CardioLab reference
``preprocessing.py`` for the OMR result names (``BMI (kg/m2)``, ``Height (Inches)``, ``Weight (Lbs)``)
and the unit rules (D-Dimer ``ng/mL DDU`` and Absolute Lymphocyte Count ``#/uL`` rows are dropped);
and MIMIC-IV-ECG's published record paths (``files/p1000/p10000032/s40689238/40689238``), 500 Hz,
10 s, 12 leads. Not confirmed from a public source, so chosen here and marked as such: the itemids
of the hemolysis/icterus/lipemia index rows labelled ``H``/``I``/``L`` (:data:`INDEX_ITEMIDS`), the
label text of the urine creatinine itemid 51082 (written as ``Creatinine`` with fluid ``Urine`` so
the "most frequent fluid" rule has something to remove), and the WFDB ADC gain (1000/mV, from the
project brief).

Identifiers and times: ``subject_id`` 10000000-19999999, ``hadm_id`` 20000000-29999999, ED
``stay_id`` 30000000-39999999, ``study_id`` 40000000-49999999; times ``YYYY-MM-DD HH:MM:SS`` shifted
into 2110-2195 like MIMIC's de-identified years; ``anchor_age`` above 89 is written as 91.

Planted signal (the hidden state is in ``ground_truth.json``)
------------------------------------------------------------
Each ECG gets five hidden standard-normal drivers: ``z_volt`` (low QRS voltage), ``z_rate`` (heart
rate), ``z_k`` (T-wave peaking), ``z_qt`` (QTc prolongation) and ``z_inf`` (inflammation). They set
the waveform (rate = 76 + 16·z_rate bpm; QRS gain = exp(-0.38·z_volt); T amplitude = exp(0.42·z_k)
with downstroke SD 40·exp(-0.22·z_k) ms, i.e. tall and narrow when high; QTc = 425 + 32·z_qt ms) and
the ED vital signs (temperature = 98.3 + 0.9·z_inf °F, respiratory rate = 17 + 2.2·z_inf, heart rate
= ECG rate ± 4). Metadata drivers are ``z_age`` = (anchor_age - 60)/17, ``z_sex`` = +1 male / -1
female and ``z_weight`` = (weight - sex mean)/15 kg (weight is visible through OMR).

For each planted lab a score ``s = (Σ wᵢ·driverᵢ + n·ε) / ‖(w, n)‖`` (ε independent noise) is mapped
to the lab's value at the ECG; every draw inside the estimation window [ECG-60, ECG+60] min and the
monitoring windows [ECG, ECG+H] min measures that value with 1.5 % analytic noise, so the rule
determines both the ``est`` and all ``monN`` labels. Draws outside the windows (-3 h, +4 h) measure a
drifted state and so only hurt a pipeline that gets its windows wrong. Rules (see :data:`PLANTED_RULES`):

* NTproBNP (pg/mL, high > 353): both branches; 0.6·z_volt + 0.5·z_rate + 0.55·z_age, noise 0.3;
  value 353·exp(1.6·(s - 0.52)), ~30 % high.
* Potassium (mEq/L, 3.3-5.1): waveform only; z_k, noise 0.3; 4.2 + 1.05·s, ~20 % low, ~20 % high.
* Hemoglobin (g/dL, 13.7-17.5): metadata only; 0.65·z_sex - 0.45·z_age + 0.5·z_weight, noise 0.3;
  15.4 + 2.1·s, ~20 % low, ~17 % high.
* Hematocrit (%, 40-51): metadata only, via the hemoglobin score (noise 0.15); 46.5 + 6.3·s,
  ~14 % low, ~26 % high.
* Creatinine (mg/dL, 0.5-1.2): both; 0.5·z_age + 0.35·z_sex + 0.65·z_qt, noise 0.3;
  1.2·exp(0.5·(s - 0.67)), ~9 % low, ~22 % high.
* Urea Nitrogen (mg/dL, 6-20): both, via the creatinine score (noise 0.35);
  20·exp(0.45·(s - 0.6)), ~27 % high (low is rare, ~2 %, and not listed as planted).
* White Blood Cells (K/uL, 4.0-11.0): metadata only (vital signs); z_inf, noise 0.3;
  11·exp(0.5·(s - 0.95)), ~14 % low, ~17 % high.

A direction is listed in ``planted_targets`` when the rule puts at least ~5 % of ECGs in it;
``ground_truth.json`` also records the realised positive rate of every direction.

Every other lab (Sodium, Chloride, Bicarbonate, Anion Gap, Glucose, Calcium, Magnesium, Phosphate,
Albumin, Platelet Count, INR(PT), PTT, Troponin T, C-Reactive Protein, Lactate, D-Dimer, Absolute
Lymphocyte Count) is pure noise, independent of every input.

Rows the pipeline must drop or repair: NaN ``valuenum`` (``UNABLE TO REPORT``, Troponin T
``<0.01``), urine Creatinine (fluid ``Urine``), ``H``/``I``/``L`` index labels, rows with
``ref_range_lower == ref_range_upper == 0``, D-Dimer in ``ng/mL DDU`` and Absolute Lymphocyte Count
in ``#/uL``; vital-sign rows with NaN fields, implausible values (°C temperatures, SBP > 500) and
rows outside ±30 min; OMR rows outside ±30 days and implausible weights; subjects without OMR.
Reference ranges are per row: mostly the main range, a minority a variant, so only the median gives
the paper's thresholds.

Determinism: one ``numpy`` generator per seed, per-record waveform seeds derived from
``(seed, study_id)``, gzip ``mtime=0`` and sorted output, so the same seed gives byte-identical files
whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from fhir_mappings.errors import InputError
from fhir_mappings.tasks import TASKS
from model_training.synth_waveforms import N_SAMPLES, EcgParams, RecordTask, write_record

MIN_SUBJECTS = 20

HOSP_DIR = Path("mimic-iv/3.1/hosp")
ED_DIR = Path("mimic-iv-ed/2.2/ed")
ECG_DIR = Path("mimic-iv-ecg/1.0")
ICD_DIR = Path("mimic-iv-ecg-ext-icd-labels/1.0.1")
GROUND_TRUTH = "ground_truth.json"
#: Top-level entries this command owns under OUT; ``--force`` removes exactly these.
OWNED_ENTRIES: tuple[str, ...] = (
    "mimic-iv",
    "mimic-iv-ed",
    "mimic-iv-ecg",
    "mimic-iv-ecg-ext-icd-labels",
    GROUND_TRUTH,
)
ZIP_PREFIX = "mimic-iv-ecg-diagnostic-electrocardiogram-matched-subset-1.0"

PATIENTS_COLUMNS = ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod")
ADMISSIONS_COLUMNS = (
    "subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
    "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
    "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag",
)  # fmt: skip
D_LABITEMS_COLUMNS = ("itemid", "label", "fluid", "category")
LABEVENTS_COLUMNS = (
    "labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id",
    "charttime", "storetime", "value", "valuenum", "valueuom", "ref_range_lower",
    "ref_range_upper", "flag", "priority", "comments",
)  # fmt: skip
OMR_COLUMNS = ("subject_id", "chartdate", "seq_num", "result_name", "result_value")
EDSTAYS_COLUMNS = (
    "subject_id", "hadm_id", "stay_id", "intime", "outtime", "gender", "race",
    "arrival_transport", "disposition",
)  # fmt: skip
VITALSIGN_COLUMNS = (
    "subject_id", "stay_id", "charttime", "temperature", "heartrate", "resprate", "o2sat",
    "sbp", "dbp", "rhythm", "pain",
)  # fmt: skip
RECORD_LIST_COLUMNS = ("subject_id", "study_id", "file_name", "ecg_time", "path")
MACHINE_MEASUREMENTS_COLUMNS = (
    "subject_id", "study_id", "cart_id", "ecg_time", *(f"report_{i}" for i in range(18)),
    "bandwidth", "filtering", "rr_interval", "p_onset", "p_end", "qrs_onset", "qrs_end", "t_end",
    "p_axis", "qrs_axis", "t_axis",
)  # fmt: skip
RECORDS_W_DIAG_COLUMNS = (
    "file_name", "study_id", "subject_id", "ecg_time", "ed_stay_id", "ed_hadm_id",
    "hosp_hadm_id", "ed_diag_ed", "ed_diag_hosp", "hosp_diag_hosp", "all_diag_hosp",
    "all_diag_all", "gender", "age", "anchor_year", "anchor_age", "dod", "ecg_no_within_stay",
    "ecg_taken_in_ed", "ecg_taken_in_hosp", "ecg_taken_in_ed_or_hosp", "fold", "strat_fold",
)  # fmt: skip

#: Itemids chosen for the ``H``/``I``/``L`` serum index rows (real itemids not confirmed publicly).
INDEX_ITEMIDS: dict[str, int] = {"H": 52001, "I": 52002, "L": 52003}
URINE_CREATININE_ITEMID = 51082


# --------------------------------------------------------------------------------------------
# Lab catalogue and planted rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabItem:
    """One ``d_labitems`` row plus how this generator measures it.

    ``ref`` is the reference range written on most rows, ``ref_variants`` the ranges on a
    minority (so the per-label median is what the method needs). For noise labs the state value
    is ``centre + spread·N(0,1)`` (``log=False``) or ``centre·exp(spread·N(0,1))`` (``log=True``).
    ``panel`` groups labs drawn from one specimen; ``draw_prob`` is the chance the lab is run when
    its panel is drawn.
    """

    itemid: int
    label: str
    fluid: str
    category: str
    unit: str | None
    ref: tuple[float, float] | None
    ref_variants: tuple[tuple[float, float], ...] = ()
    decimals: int = 1
    panel: str = "chem"
    draw_prob: float = 1.0
    centre: float = 1.0
    spread: float = 0.1
    log: bool = False
    minimum: float = 0.0


@dataclass(frozen=True)
class PlantedRule:
    """A lab whose value at the ECG is a fixed function of visible drivers plus noise.

    ``score = (Σ w·driver + noise·ε) / ‖(w, noise)‖``; the value is ``centre + scale·score``
    (``log=False``) or ``centre·exp(scale·score)`` (``log=True``). A driver may be another rule's
    score (e.g. Hematocrit follows the hemoglobin score). ``directions`` are the planted classes;
    ``branch`` says whether the waveform, the metadata or both carry the signal.
    """

    label: str
    weights: dict[str, float]
    noise: float
    centre: float
    scale: float
    log: bool
    directions: tuple[str, ...]
    branch: str
    description: str


PLANTED_RULES: tuple[PlantedRule, ...] = (
    PlantedRule(
        "NTproBNP", {"z_volt": 0.6, "z_rate": 0.5, "z_age": 0.55}, 0.3,
        353.0 * float(np.exp(-1.6 * 0.524)), 1.6, True, ("high",), "both",
        "low QRS voltage + fast rate (waveform) + older age (metadata)",
    ),
    PlantedRule(
        "Potassium", {"z_k": 1.0}, 0.3, 4.2, 1.05, False, ("low", "high"), "waveform",
        "T-wave shape only: tall narrow (peaked) T = high, flat broad T = low",
    ),
    PlantedRule(
        "Hemoglobin", {"z_sex": 0.65, "z_age": -0.45, "z_weight": 0.5}, 0.3, 15.4, 2.1, False,
        ("low", "high"), "metadata", "male sex, younger age, higher weight (OMR) = higher",
    ),
    PlantedRule(
        "Hematocrit", {"Hemoglobin": 1.0}, 0.15, 46.5, 6.3, False, ("low", "high"), "metadata",
        "follows the hemoglobin score (sex, age, weight)",
    ),
    PlantedRule(
        "Creatinine", {"z_age": 0.5, "z_sex": 0.35, "z_qt": 0.65}, 0.3,
        1.2 * float(np.exp(-0.5 * 0.674)), 0.5, True, ("low", "high"), "both",
        "long QTc (waveform) + older age + male sex (metadata)",
    ),
    PlantedRule(
        "Urea Nitrogen", {"Creatinine": 0.9}, 0.35, 20.0 * float(np.exp(-0.45 * 0.6)), 0.45, True,
        ("high",), "both", "follows the creatinine score (QTc, age, sex)",
    ),
    PlantedRule(
        "White Blood Cells", {"z_inf": 1.0}, 0.3, 11.0 * float(np.exp(-0.5 * 0.95)), 0.5, True,
        ("low", "high"), "metadata", "inflammation seen in the ED vital signs (temperature, resp. rate)",
    ),
)  # fmt: skip

_PLANTED_LABELS = {rule.label for rule in PLANTED_RULES}

LABS: tuple[LabItem, ...] = (
    # chemistry panel
    LabItem(50983, "Sodium", "Blood", "Chemistry", "mEq/L", (133, 145), ((135, 145),), 0, "chem", 1.0, 139, 4.0),
    LabItem(50971, "Potassium", "Blood", "Chemistry", "mEq/L", (3.3, 5.1), ((3.5, 5.3), (3.4, 5.2)), 1, "chem", 1.0, minimum=1.8),
    LabItem(50902, "Chloride", "Blood", "Chemistry", "mEq/L", (96, 108), ((98, 107),), 0, "chem", 1.0, 102, 4.5),
    LabItem(50882, "Bicarbonate", "Blood", "Chemistry", "mEq/L", (22, 32), ((22, 29),), 0, "chem", 1.0, 25, 3.5),
    LabItem(50868, "Anion Gap", "Blood", "Chemistry", "mEq/L", (8, 20), ((10, 18),), 0, "chem", 1.0, 14, 3.5),
    LabItem(51006, "Urea Nitrogen", "Blood", "Chemistry", "mg/dL", (6, 20), ((7, 22),), 0, "chem", 1.0, minimum=2.0),
    LabItem(50912, "Creatinine", "Blood", "Chemistry", "mg/dL", (0.5, 1.2), ((0.4, 1.1),), 1, "chem", 1.0, minimum=0.2),
    LabItem(50931, "Glucose", "Blood", "Chemistry", "mg/dL", (70, 100), ((70, 105),), 0, "chem", 1.0, 118, 0.3, True),
    LabItem(50893, "Calcium, Total", "Blood", "Chemistry", "mg/dL", (8.4, 10.3), ((8.5, 10.5),), 1, "chem", 0.6, 9.2, 0.6),
    LabItem(50960, "Magnesium", "Blood", "Chemistry", "mg/dL", (1.6, 2.6), ((1.7, 2.4),), 1, "chem", 0.6, 2.0, 0.28),
    LabItem(50970, "Phosphate", "Blood", "Chemistry", "mg/dL", (2.7, 4.5), ((2.5, 4.5),), 1, "chem", 0.6, 3.5, 0.25, True),
    # complete blood count
    LabItem(51301, "White Blood Cells", "Blood", "Hematology", "K/uL", (4.0, 11.0), ((4.5, 11.0),), 1, "cbc", 1.0, minimum=0.5),
    LabItem(51222, "Hemoglobin", "Blood", "Hematology", "g/dL", (13.7, 17.5), ((11.2, 15.7), (12.0, 16.0)), 1, "cbc", 1.0, minimum=5.0),
    LabItem(51221, "Hematocrit", "Blood", "Hematology", "%", (40.0, 51.0), ((34.0, 45.0), (36.0, 48.0)), 1, "cbc", 1.0, minimum=15.0),
    LabItem(51265, "Platelet Count", "Blood", "Hematology", "K/uL", (150, 440), ((150, 400),), 0, "cbc", 1.0, 240, 0.35, True),
    LabItem(51133, "Absolute Lymphocyte Count", "Blood", "Hematology", "K/uL", (1.2, 3.7), (), 2, "cbc", 0.3, 1.6, 0.45, True),
    # coagulation
    LabItem(51237, "INR(PT)", "Blood", "Hematology", None, (0.9, 1.1), ((0.8, 1.2),), 1, "coag", 1.0, 1.15, 0.2, True),
    LabItem(51275, "PTT", "Blood", "Hematology", "sec", (25.0, 36.5), ((25.0, 35.0),), 1, "coag", 1.0, 31.0, 0.2, True),
    # cardiac
    LabItem(50963, "NTproBNP", "Blood", "Chemistry", "pg/mL", (0, 353), ((0, 450),), 0, "cardiac", 0.75, minimum=5.0),
    LabItem(51003, "Troponin T", "Blood", "Chemistry", "ng/mL", (0, 0.01), ((0, 0.03),), 2, "cardiac", 0.6, 0.02, 1.2, True),
    # miscellaneous chemistry, blood gas and coagulation add-ons
    LabItem(50862, "Albumin", "Blood", "Chemistry", "g/dL", (3.5, 5.2), ((3.4, 4.8),), 1, "misc", 0.4, 4.1, 0.55),
    LabItem(50889, "C-Reactive Protein", "Blood", "Chemistry", "mg/L", (0, 5.0), ((0, 10.0),), 1, "misc", 0.3, 6.0, 1.2, True),
    LabItem(50813, "Lactate", "Blood", "Blood Gas", "mmol/L", (0.5, 2.0), ((0.5, 2.2),), 1, "misc", 0.35, 1.6, 0.45, True),
    LabItem(51196, "D-Dimer", "Blood", "Hematology", "ng/mL FEU", (0, 500), ((0, 230),), 0, "misc", 0.15, 450, 0.9, True),
    # rows the method drops: another fluid under a blood label, and the serum indices H / I / L
    LabItem(URINE_CREATININE_ITEMID, "Creatinine", "Urine", "Chemistry", "mg/dL", None, (), 0, "urine", 1.0, 95, 0.5, True),
    LabItem(INDEX_ITEMIDS["H"], "H", "Blood", "Chemistry", None, None, (), 0, "chem", 0.2, 12, 0.9, True),
    LabItem(INDEX_ITEMIDS["I"], "I", "Blood", "Chemistry", None, None, (), 0, "chem", 0.2, 1.5, 0.8, True),
    LabItem(INDEX_ITEMIDS["L"], "L", "Blood", "Chemistry", None, None, (), 0, "chem", 0.2, 8, 0.9, True),
)  # fmt: skip

_PANELS = ("chem", "cbc", "coag", "cardiac", "misc", "urine")
_PANEL_PROB = {"chem": 0.92, "cbc": 0.9, "coag": 0.4, "cardiac": 0.85, "misc": 0.8, "urine": 0.0}


@dataclass(frozen=True)
class _Slot:
    """A lab-draw time slot relative to ``ecg_time`` (minutes); ``inside`` = within the windows."""

    name: str
    lo: int
    hi: int
    prob: float
    inside: bool


_SLOTS: tuple[_Slot, ...] = (
    _Slot("pre", -200, -130, 0.35, False),
    _Slot("est_before", -55, -10, 0.45, True),
    _Slot("at", 3, 27, 0.85, True),
    _Slot("mid", 33, 58, 0.35, True),
    _Slot("late", 65, 118, 0.5, True),
    _Slot("post", 150, 240, 0.4, False),
)

RACES = (
    "WHITE", "WHITE - OTHER EUROPEAN", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN",
    "HISPANIC OR LATINO", "ASIAN", "ASIAN - CHINESE", "OTHER", "UNKNOWN", "UNABLE TO OBTAIN",
)  # fmt: skip
_RACE_P = (0.52, 0.06, 0.15, 0.04, 0.03, 0.03, 0.02, 0.05, 0.07, 0.03)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote: counts, planted targets, wall time and bytes on disk."""

    out: Path
    seed: int
    subjects: int
    ecgs: int
    lab_rows: int
    vital_rows: int
    omr_rows: int
    planted_targets: tuple[str, ...]
    seconds: float
    bytes_written: int


def planted_targets() -> list[str]:
    """Target column names (``{label}_{low|high}_{task}``) the planted rules determine."""
    return [f"{r.label}_{d}_{task}" for r in PLANTED_RULES for d in r.directions for task in TASKS]


def generate(
    out: Path,
    subjects: int,
    seed: int,
    *,
    workers: int = 2,
    force: bool = False,
    progress: bool = False,
) -> SynthSummary:
    """Write a synthetic MIMIC-IV / -ED / -ECG / -ECG-ext-ICD data set under ``out``.

    ``out`` must be absent or empty unless ``force`` is set, in which case only the entries this
    command owns (:data:`OWNED_ENTRIES`) are removed first. ``workers`` processes write the WFDB
    records (the slow part); the result does not depend on it.
    """
    started = time.perf_counter()
    out = Path(out)
    _check_args(out, subjects, seed, workers, force)
    rng = np.random.default_rng(seed)

    subj = _draw_subjects(rng, subjects)
    ecg = _draw_ecgs(rng, subj)
    admissions, edstays = _encounters(rng, subj, ecg)
    subj["dod"] = _dates_of_death(rng, subj, ecg)
    scores, states = _planted_states(rng, ecg)
    labevents, d_labitems = _labevents(rng, ecg, states)
    vitals = _vitalsign(rng, ecg)
    omr = _omr(rng, subj, ecg)
    record_list, machine = _ecg_tables(rng, ecg)
    records_w_diag = _records_w_diag(rng, subj, ecg, states)

    _write_csv(subj, out / HOSP_DIR / "patients.csv.gz", PATIENTS_COLUMNS)
    _write_csv(admissions, out / HOSP_DIR / "admissions.csv.gz", ADMISSIONS_COLUMNS)
    _write_csv(d_labitems, out / HOSP_DIR / "d_labitems.csv.gz", D_LABITEMS_COLUMNS)
    _write_csv(labevents, out / HOSP_DIR / "labevents.csv.gz", LABEVENTS_COLUMNS)
    _write_csv(omr, out / HOSP_DIR / "omr.csv.gz", OMR_COLUMNS)
    _write_csv(edstays, out / ED_DIR / "edstays.csv.gz", EDSTAYS_COLUMNS)
    _write_csv(vitals, out / ED_DIR / "vitalsign.csv.gz", VITALSIGN_COLUMNS)
    _write_csv(record_list, out / ECG_DIR / "record_list.csv", RECORD_LIST_COLUMNS)
    _write_csv(machine, out / ECG_DIR / "machine_measurements.csv", MACHINE_MEASUREMENTS_COLUMNS)
    _write_csv(records_w_diag, out / ICD_DIR / "records_w_diag_icd10.csv", RECORDS_W_DIAG_COLUMNS)
    _write_ground_truth(out / GROUND_TRUTH, seed, subjects, ecg, scores, states)
    _write_waveforms(out / ECG_DIR, ecg, seed, workers, progress)

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return SynthSummary(
        out=out,
        seed=seed,
        subjects=subjects,
        ecgs=len(ecg),
        lab_rows=len(labevents),
        vital_rows=len(vitals),
        omr_rows=len(omr),
        planted_targets=tuple(planted_targets()),
        seconds=time.perf_counter() - started,
        bytes_written=size,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``ecglab synth-mimic`` flags."""
    parser.add_argument("out", type=Path, metavar="OUT", help="output folder (created; must be empty)")
    parser.add_argument("--subjects", type=int, default=2000, help="number of patients (>= 20; default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed = identical files)")
    parser.add_argument("--workers", type=int, default=2, help="processes writing WFDB records (default 2)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a previous synthetic data set in OUT (removes only the folders this command writes)",
    )


def run(args: argparse.Namespace) -> int:
    """Generate the data set and print a one-line summary."""
    summary = generate(
        args.out, args.subjects, args.seed, workers=args.workers, force=args.force, progress=True
    )
    print(
        f"synth-mimic: {summary.subjects} subjects, {summary.ecgs} ECGs, {summary.lab_rows} lab rows, "
        f"{len(summary.planted_targets)} planted targets -> {summary.out} "
        f"({summary.bytes_written / 1e6:.0f} MB, {summary.seconds:.1f} s)"
    )
    return 0


# --------------------------------------------------------------------------------------------
# Argument checks and output helpers
# --------------------------------------------------------------------------------------------


def _check_args(out: Path, subjects: int, seed: int, workers: int, force: bool) -> None:
    """Validate the arguments (errors name the flag) and prepare ``out``.

    Below :data:`MIN_SUBJECTS` the validation/test folds would hold one or two patients, so no
    target could pass the method's per-fold filter. A non-empty ``out`` is refused so a typo cannot
    mix two data sets; ``force`` deletes only :data:`OWNED_ENTRIES`, never unrelated files.
    """
    if subjects < MIN_SUBJECTS:
        raise InputError(f"--subjects must be at least {MIN_SUBJECTS} (got {subjects})")
    if seed < 0:
        raise InputError(f"--seed must be a non-negative integer (got {seed})")
    if workers < 1:
        raise InputError(f"--workers must be at least 1 (got {workers})")
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InputError(
                f"OUT {out} exists and is not empty; pass --force to replace a previous data set"
            )
        for name in OWNED_ENTRIES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_csv(df: pd.DataFrame, path: Path, columns: Sequence[str]) -> None:
    """Write ``df[columns]`` as CSV (gzip with mtime 0 when the name ends in .gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    df.loc[:, list(columns)].to_csv(buffer, index=False, lineterminator="\n")
    data = buffer.getvalue().encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    path.write_bytes(data)


def _fmt_times(values: np.ndarray, unit: Literal["s", "D"] = "s") -> np.ndarray:
    """Format datetime64 values like MIMIC (``YYYY-MM-DD HH:MM:SS`` or a date); NaT becomes ''."""
    minutes = np.asarray(values, dtype="datetime64[m]")
    if minutes.size == 0:
        return np.array([], dtype=object)
    iso = np.datetime_as_string(minutes.astype(np.dtype(f"datetime64[{unit}]")), unit=unit)
    return np.where(np.isnat(minutes), "", np.char.replace(iso, "T", " ")).astype(object)


def _num_text(values: np.ndarray, decimals: int) -> np.ndarray:
    """Format numbers as MIMIC's text ``value`` column (fixed decimals)."""
    return np.char.mod(f"%.{decimals}f", np.asarray(values, dtype=float)).astype(object)


def _strip_zero(text: np.ndarray) -> np.ndarray:
    """Drop a trailing ``.0`` (OMR writes whole heights and weights without decimals)."""
    return np.array([t[:-2] if t.endswith(".0") else t for t in text], dtype=object)


def _unique_ids(rng: np.random.Generator, lo: int, hi: int, n: int) -> np.ndarray:
    """``n`` distinct random integers in ``[lo, hi)``."""
    return lo + rng.choice(hi - lo, size=n, replace=False).astype(np.int64)


def _minutes(values: np.ndarray) -> np.ndarray:
    """Whole minutes as ``timedelta64[m]`` (MIMIC times carry no seconds)."""
    return np.asarray(np.rint(values), dtype=np.int64).astype("timedelta64[m]")


# --------------------------------------------------------------------------------------------
# Subjects, ECGs and encounters
# --------------------------------------------------------------------------------------------


def _draw_subjects(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Patients with demographics, body size and per-subject ECG morphology."""
    male = rng.random(n) < 0.52
    age = np.clip(np.rint(rng.normal(60.0, 17.0, n)), 18, 95).astype(int)
    age = np.where(age > 89, 91, age)
    height = np.where(male, rng.normal(176.0, 7.0, n), rng.normal(163.0, 6.5, n))
    z_wt = rng.standard_normal(n)
    weight = np.where(male, 86.0, 74.0) + 15.0 * z_wt
    years = rng.integers(2110, 2181, n)
    groups = np.array(["2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019", "2020 - 2022"])
    return pd.DataFrame(
        {
            "subject_id": np.sort(_unique_ids(rng, 10_000_000, 20_000_000, n)),
            "gender": np.where(male, "M", "F"),
            "male": male,
            "anchor_age": age,
            "anchor_year": years,
            "anchor_year_group": groups[rng.integers(0, len(groups), n)],
            "race": np.array(RACES)[rng.choice(len(RACES), n, p=_RACE_P)],
            "height_cm": np.clip(height, 140, 205),
            "weight_kg": np.clip(weight, 40, 180),
            "has_omr": rng.random(n) > 0.07,
            # per-subject components of the hidden drivers and ECG morphology
            "u_volt": rng.standard_normal(n),
            "u_rate": rng.standard_normal(n),
            "u_qt": rng.standard_normal(n),
            "u_k": rng.standard_normal(n),
            "axis": np.clip(rng.normal(45.0, 25.0, n), -40, 110),
            "pr": np.clip(rng.normal(160.0, 18.0, n), 115, 240),
            "qrs_ms": np.clip(rng.normal(92.0, 9.0, n), 72, 135),
            "p_gain": np.exp(rng.normal(0.0, 0.25, n)),
            "cart_id": rng.integers(6_000_000, 6_999_999, n),
            **{f"lead_gain_{k}": np.exp(rng.normal(0.0, 0.12, n)) for k in range(6)},
        }
    )


def _draw_ecgs(rng: np.random.Generator, subj: pd.DataFrame) -> pd.DataFrame:
    """One row per ECG: time, encounter kind, hidden drivers, ECG parameters, folds."""
    counts = rng.choice([1, 2, 3, 4], size=len(subj), p=[0.35, 0.3, 0.2, 0.15])
    idx = np.repeat(np.arange(len(subj)), counts)
    n = idx.size
    first = np.r_[True, idx[1:] != idx[:-1]]
    gap_days = np.where(first, rng.integers(0, 3 * 365, n), rng.integers(15, 400, n))
    day = np.zeros(n, dtype=np.int64)
    for i in range(n):  # cumulative days within each subject
        day[i] = gap_days[i] if first[i] else day[i - 1] + gap_days[i]
    years = subj["anchor_year"].to_numpy()[idx]
    start = (years - 1970).astype("datetime64[Y]").astype("datetime64[m]")
    ecg_time = start + (day * 1440 + rng.integers(0, 1440, n)).astype("timedelta64[m]")

    s = subj.iloc[idx].reset_index(drop=True)
    z_volt = 0.6 * s["u_volt"].to_numpy() + 0.8 * rng.standard_normal(n)
    z_rate = 0.5 * s["u_rate"].to_numpy() + np.sqrt(0.75) * rng.standard_normal(n)
    z_qt = 0.6 * s["u_qt"].to_numpy() + 0.8 * rng.standard_normal(n)
    z_k = 0.3 * s["u_k"].to_numpy() + np.sqrt(0.91) * rng.standard_normal(n)
    z_inf = rng.standard_normal(n)
    weight_now = s["weight_kg"].to_numpy() + rng.normal(0.0, 1.0, n)
    sex_mean = np.where(s["male"].to_numpy(), 86.0, 74.0)

    kind = rng.choice(np.array(["ed", "inpatient", "outpatient"]), size=n, p=[0.88, 0.07, 0.05])
    fold_of_subject = rng.permutation(len(subj)) % 20
    fold2_of_subject = rng.permutation(len(subj)) % 20
    nan_kind = rng.random(n)
    return pd.DataFrame(
        {
            "subj_idx": idx,
            "subject_id": s["subject_id"].to_numpy(),
            "study_id": _unique_ids(rng, 40_000_000, 50_000_000, n),
            "ecg_time": ecg_time,
            "kind": kind,
            "z_volt": z_volt,
            "z_rate": z_rate,
            "z_k": z_k,
            "z_qt": z_qt,
            "z_inf": z_inf,
            "z_age": (s["anchor_age"].to_numpy() - 60.0) / 17.0,
            "z_sex": np.where(s["male"].to_numpy(), 1.0, -1.0),
            "z_weight": (weight_now - sex_mean) / 15.0,
            "weight_kg": weight_now,
            "rate_bpm": np.clip(76.0 + 16.0 * z_rate, 42.0, 160.0),
            "qrs_gain": np.clip(np.exp(-0.38 * z_volt), 0.3, 2.5),
            "t_gain": np.exp(0.42 * z_k),
            "t_width_ms": 40.0 * np.exp(-0.22 * z_k),
            "qtc_ms": np.clip(425.0 + 32.0 * z_qt, 340.0, 560.0),
            "axis": s["axis"].to_numpy() + rng.normal(0.0, 5.0, n),
            "pr": s["pr"].to_numpy(),
            "qrs_ms": s["qrs_ms"].to_numpy(),
            "p_gain": s["p_gain"].to_numpy(),
            "noise_mv": rng.uniform(0.006, 0.03, n),
            "wander_mv": rng.uniform(0.02, 0.15, n),
            "hrv": rng.uniform(0.01, 0.05, n),
            "nan_group": np.where(nan_kind < 0.015, "limb", np.where(nan_kind < 0.04, "chest", "")),
            "nan_start": rng.integers(0, N_SAMPLES - 400, n),
            "nan_len": rng.integers(5, 400, n),
            "cart_id": s["cart_id"].to_numpy(),
            **{f"lead_gain_{k}": s[f"lead_gain_{k}"].to_numpy() for k in range(6)},
            "strat_fold": fold_of_subject[idx],
            "fold": fold2_of_subject[idx],
        }
    )


def _encounters(
    rng: np.random.Generator, subj: pd.DataFrame, ecg: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ED stays (one per ED ECG), hospital admissions, and the per-ECG encounter ids."""
    n = len(ecg)
    t = ecg["ecg_time"].to_numpy()
    is_ed = ecg["kind"].to_numpy() == "ed"
    is_inp = ecg["kind"].to_numpy() == "inpatient"
    admitted = is_ed & (rng.random(n) < 0.45)
    has_adm = admitted | is_inp

    intime = t - _minutes(rng.uniform(15, 240, n))
    outtime = t + _minutes(rng.uniform(90, 720, n))
    admit_ed = outtime - _minutes(rng.uniform(5, 90, n))
    admit_inp = t - _minutes(rng.uniform(6 * 60, 96 * 60, n))
    admittime = np.where(is_inp, admit_inp, admit_ed)
    dischtime = np.where(is_inp, t, admittime) + _minutes(rng.uniform(12 * 60, 10 * 1440, n))

    last_of_subject = np.r_[ecg["subj_idx"].to_numpy()[1:] != ecg["subj_idx"].to_numpy()[:-1], True]
    died = has_adm & last_of_subject & (rng.random(n) < 0.05)

    stay_id = np.where(is_ed, _unique_ids(rng, 30_000_000, 40_000_000, n), -1)
    hadm_id = np.where(has_adm, _unique_ids(rng, 20_000_000, 30_000_000, n), -1)
    ecg["stay_id"] = stay_id
    ecg["hadm_id"] = hadm_id
    ecg["intime"] = np.where(is_ed, intime, np.datetime64("NaT"))
    ecg["outtime"] = np.where(is_ed, outtime, np.datetime64("NaT"))
    ecg["admittime"] = np.where(has_adm, admittime, np.datetime64("NaT"))
    ecg["dischtime"] = np.where(has_adm, dischtime, np.datetime64("NaT"))
    ecg["died_in_hospital"] = died

    race = subj["race"].to_numpy()[ecg["subj_idx"].to_numpy()]
    gender = subj["gender"].to_numpy()[ecg["subj_idx"].to_numpy()]
    ed_dispo_other = np.array(["HOME", "LEFT WITHOUT BEING SEEN", "TRANSFER", "OTHER", "ELOPED"])
    disposition = np.where(
        admitted, "ADMITTED", ed_dispo_other[rng.choice(5, n, p=[0.86, 0.04, 0.04, 0.03, 0.03])]
    )
    transport = np.array(["WALK IN", "AMBULANCE", "UNKNOWN", "OTHER", "HELICOPTER"])
    ed = pd.DataFrame(
        {
            "subject_id": ecg["subject_id"],
            "hadm_id": pd.array(np.where(admitted, hadm_id, -1), dtype="Int64"),
            "stay_id": stay_id,
            "intime": _fmt_times(intime),
            "outtime": _fmt_times(outtime),
            "gender": gender,
            "race": race,
            "arrival_transport": transport[rng.choice(5, n, p=[0.55, 0.38, 0.04, 0.02, 0.01])],
            "disposition": disposition,
        }
    )[is_ed]
    ed.loc[ed["hadm_id"] == -1, "hadm_id"] = pd.NA

    adm_type = np.where(
        is_inp,
        np.array(["URGENT", "ELECTIVE", "DIRECT EMER.", "SURGICAL SAME DAY ADMISSION"])[rng.choice(4, n)],
        np.array(["EW EMER.", "OBSERVATION ADMIT", "EU OBSERVATION"])[rng.choice(3, n, p=[0.7, 0.2, 0.1])],
    )
    adm_loc = np.where(
        is_inp,
        np.array(["PHYSICIAN REFERRAL", "TRANSFER FROM HOSPITAL", "CLINIC REFERRAL"])[rng.choice(3, n)],
        "EMERGENCY ROOM",
    )
    disch_loc = np.where(
        died,
        "DIED",
        np.array(["HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY", "REHAB", ""])[
            rng.choice(5, n, p=[0.5, 0.25, 0.12, 0.05, 0.08])
        ],
    )
    admissions = pd.DataFrame(
        {
            "subject_id": ecg["subject_id"],
            "hadm_id": hadm_id,
            "admittime": _fmt_times(admittime),
            "dischtime": _fmt_times(dischtime),
            "deathtime": _fmt_times(np.where(died, dischtime, np.datetime64("NaT"))),
            "admission_type": adm_type,
            "admit_provider_id": _provider_ids(rng, n, 0.9),
            "admission_location": adm_loc,
            "discharge_location": disch_loc,
            "insurance": np.array(["Medicare", "Private", "Medicaid", "Other", "No charge"])[
                rng.choice(5, n, p=[0.45, 0.3, 0.17, 0.07, 0.01])
            ],
            "language": np.array(["English", "Spanish", "Chinese", "Russian", "Other"])[
                rng.choice(5, n, p=[0.88, 0.05, 0.02, 0.02, 0.03])
            ],
            "marital_status": np.array(["MARRIED", "SINGLE", "WIDOWED", "DIVORCED", ""])[
                rng.choice(5, n, p=[0.42, 0.33, 0.12, 0.08, 0.05])
            ],
            "race": race,
            "edregtime": np.where(admitted, _fmt_times(intime), ""),
            "edouttime": np.where(admitted, _fmt_times(outtime), ""),
            "hospital_expire_flag": died.astype(int),
        }
    )[has_adm]
    return admissions.reset_index(drop=True), ed.reset_index(drop=True)


def _provider_ids(rng: np.random.Generator, n: int, present: float) -> np.ndarray:
    """Anonymous provider ids like MIMIC's ``P`` + 5 alphanumerics, some missing."""
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    pool = np.array(["P" + "".join(alphabet[rng.integers(0, 36, 5)]) for _ in range(400)])
    ids = pool[rng.integers(0, pool.size, n)]
    return np.where(rng.random(n) < present, ids, "").astype(object)


# --------------------------------------------------------------------------------------------
# Planted states and lab events
# --------------------------------------------------------------------------------------------


def _rule_score(rule: PlantedRule, drivers: dict[str, np.ndarray], eps: np.ndarray) -> np.ndarray:
    """The rule's standardised score: weighted drivers plus noise, divided by the weights' norm."""
    weights = np.array([*rule.weights.values(), rule.noise])
    total = sum(w * drivers[name] for name, w in rule.weights.items()) + rule.noise * eps
    return total / np.linalg.norm(weights)


def oracle_scores(ground_truth: Mapping[str, Any], study_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Per lab with a planted rule, each ECG's noise-free rule score (its weighted drivers).

    This is the best any model could do from the inputs, so evaluation reports the model's AUROC
    next to this oracle's. Read from ``ground_truth.json`` (``rules`` weights, per-record
    ``drivers``); a rule may build on another lab's score (hematocrit follows hemoglobin), which is
    then taken noise-free too. Rank order is all AUROC needs, so the norm is left out.
    """
    rules = ground_truth["rules"]
    records = ground_truth["records"]

    def score(lab: str, drivers: Mapping[str, float]) -> float:
        return float(
            sum(
                w * (drivers[k] if k in drivers else score(k, drivers))
                for k, w in rules[lab]["weights"].items()
            )
        )

    return {
        lab: np.array([score(lab, records[str(int(sid))]["drivers"]) for sid in study_ids], dtype=np.float64)
        for lab in rules
    }


def _rule_value(rule: PlantedRule, score: np.ndarray) -> np.ndarray:
    """Map a score to the lab's value (linear or log-normal around ``centre``)."""
    return rule.centre * np.exp(rule.scale * score) if rule.log else rule.centre + rule.scale * score


def _planted_states(
    rng: np.random.Generator, ecg: pd.DataFrame
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-ECG scores of the planted rules and the true value of every lab at the ECG."""
    n = len(ecg)
    drivers = {
        name: ecg[name].to_numpy()
        for name in ("z_volt", "z_rate", "z_k", "z_qt", "z_inf", "z_age", "z_sex", "z_weight")
    }
    scores: dict[str, np.ndarray] = {}
    states: dict[str, np.ndarray] = {}
    for rule in PLANTED_RULES:
        score = _rule_score(rule, {**drivers, **scores}, rng.standard_normal(n))
        scores[rule.label] = score
        lab = next(x for x in LABS if x.label == rule.label and x.fluid == "Blood")
        states[rule.label] = np.maximum(_rule_value(rule, score), lab.minimum)
    for lab in LABS:
        if lab.label in _PLANTED_LABELS and lab.fluid == "Blood":
            continue
        z = rng.standard_normal(n)
        value = lab.centre * np.exp(lab.spread * z) if lab.log else lab.centre + lab.spread * z
        states[_state_key(lab)] = np.maximum(value, lab.minimum)
    return scores, states


def _state_key(lab: LabItem) -> str:
    """Key of a lab's state: its label, qualified by fluid when it is not blood."""
    return lab.label if lab.fluid == "Blood" else f"{lab.label} ({lab.fluid})"


def _drifted(lab: LabItem, state: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A value away from the ECG: correlated with the state but re-drawn (r = 0.4)."""
    rule = next((r for r in PLANTED_RULES if r.label == lab.label and lab.fluid == "Blood"), None)
    z = rng.standard_normal(state.size)
    if rule is not None:
        base = np.log(state / rule.centre) / rule.scale if rule.log else (state - rule.centre) / rule.scale
        return _rule_value(rule, 0.4 * base + 0.92 * z)
    if lab.log:
        return state**0.4 * lab.centre**0.6 * np.exp(0.92 * lab.spread * z)
    return 0.4 * state + 0.6 * lab.centre + 0.92 * lab.spread * z


def _labevents(
    rng: np.random.Generator, ecg: pd.DataFrame, states: dict[str, np.ndarray]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Lab draws before, inside and after each ECG's windows, with the dirty rows the method drops."""
    n = len(ecg)
    t = ecg["ecg_time"].to_numpy()
    kind = ecg["kind"].to_numpy()
    slot_scale = np.where(kind == "outpatient", 0.5, 1.0)
    parts: list[dict[str, np.ndarray]] = []
    # one distinct specimen id per (slot, panel, ECG), drawn together so none repeats
    specimens = _unique_ids(rng, 10_000_000, 100_000_000, len(_SLOTS) * len(_PANELS) * n)
    specimens = specimens.reshape(len(_SLOTS), len(_PANELS), n)
    for s_index, slot in enumerate(_SLOTS):
        present = rng.random(n) < slot.prob * slot_scale
        offset = rng.integers(slot.lo, slot.hi + 1, n)
        when = t + offset.astype("timedelta64[m]")
        for p_index, panel in enumerate(_PANELS):
            p = 0.12 if (panel == "urine" and slot.name == "at") else _PANEL_PROB[panel]
            drawn = present & (rng.random(n) < p)
            specimen = specimens[s_index, p_index]
            store = when + _minutes(rng.uniform(15, 150, n))
            for lab in (x for x in LABS if x.panel == panel):
                take = drawn & (rng.random(n) < lab.draw_prob)
                if not take.any():
                    continue
                state = states[_state_key(lab)]
                inside_value = state * (1.0 + 0.015 * rng.standard_normal(n))
                value = inside_value if slot.inside else _drifted(lab, state, rng)
                rows = np.flatnonzero(take)
                parts.append(
                    {
                        "ecg_row": rows,
                        "itemid": np.full(rows.size, lab.itemid),
                        "charttime": when[rows],
                        "storetime": store[rows],
                        "specimen_id": specimen[rows],
                        "raw": np.maximum(value[rows], lab.minimum),
                    }
                )
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    lab_by_id = {lab.itemid: lab for lab in LABS}
    m = cols["ecg_row"].size
    itemids = cols["itemid"]

    valuenum = np.empty(m)
    value = np.empty(m, dtype=object)
    unit = np.empty(m, dtype=object)
    lower = np.full(m, np.nan)
    upper = np.full(m, np.nan)
    u = rng.random(m)
    for itemid, lab in lab_by_id.items():
        sel = itemids == itemid
        if not sel.any():
            continue
        v = np.round(cols["raw"][sel], lab.decimals)
        valuenum[sel] = v
        value[sel] = _num_text(v, lab.decimals)
        unit[sel] = lab.unit if lab.unit is not None else ""
        if lab.ref is not None:
            refs = np.array((lab.ref, *lab.ref_variants), dtype=float)
            pick = np.where(u[sel] < 0.85, 0, 1 + (u[sel] * 1000).astype(int) % max(len(lab.ref_variants), 1))
            pick = np.minimum(pick, len(refs) - 1)
            lower[sel], upper[sel] = refs[pick, 0], refs[pick, 1]

    dirty = rng.random(m)
    # NaN valuenum: failed measurements on every lab, "<0.01" troponins
    failed = dirty < 0.012
    valuenum[failed] = np.nan
    value[failed] = "UNABLE TO REPORT"
    trop = (itemids == 51003) & (valuenum < 0.01)
    valuenum[trop] = np.nan
    value[trop] = "<0.01"
    # de-identified text value with a numeric valuenum (as MIMIC does for some glucose rows)
    value[(itemids == 50931) & (dirty > 0.8)] = "___"
    # reference ranges recorded as 0/0 (no usable range)
    zero_ref = (dirty > 0.5) & (dirty < 0.512) & ~np.isnan(lower)
    lower[zero_ref] = 0.0
    upper[zero_ref] = 0.0
    # unit variants the method names: D-Dimer in ng/mL DDU, lymphocytes in #/uL
    ddu = (itemids == 51196) & (u > 0.9)
    unit[ddu] = "ng/mL DDU"
    valuenum[ddu] = np.round(valuenum[ddu] / 2.0)
    value[ddu] = _num_text(valuenum[ddu], 0)
    per_ul = (itemids == 51133) & (u > 0.94)
    unit[per_ul] = "#/uL"
    valuenum[per_ul] = np.round(valuenum[per_ul] * 1000.0)
    value[per_ul] = _num_text(valuenum[per_ul], 0)
    lower[per_ul] *= 1000.0
    upper[per_ul] *= 1000.0

    has_ref = ~np.isnan(lower) & ~((lower == 0) & (upper == 0))
    abnormal = has_ref & ~np.isnan(valuenum) & ((valuenum < lower) | (valuenum > upper))
    e = cols["ecg_row"]
    ed_like = kind[e] == "ed"
    hadm = ecg["hadm_id"].to_numpy()[e]
    comments = np.where(
        (itemids == 50931) & (dirty > 0.8), "IF FASTING, 70-100 NORMAL, >125 PROVISIONAL DIABETES.", ""
    )
    labs = pd.DataFrame(
        {
            "subject_id": ecg["subject_id"].to_numpy()[e],
            "hadm_id": pd.array(np.where(hadm > 0, hadm, -1), dtype="Int64"),
            "specimen_id": cols["specimen_id"],
            "itemid": itemids,
            "order_provider_id": _provider_ids(rng, m, 0.35),
            "charttime_raw": cols["charttime"],
            "storetime": _fmt_times(cols["storetime"]),
            "value": value,
            "valuenum": valuenum,
            "valueuom": unit,
            "ref_range_lower": lower,
            "ref_range_upper": upper,
            "flag": np.where(abnormal, "abnormal", ""),
            "priority": np.where(ed_like, "STAT", "ROUTINE"),
            "comments": comments,
        }
    )
    labs.loc[labs["hadm_id"] == -1, "hadm_id"] = pd.NA
    labs = labs.sort_values(["subject_id", "charttime_raw", "specimen_id", "itemid"], kind="stable")
    labs["charttime"] = _fmt_times(labs["charttime_raw"].to_numpy())
    labs = labs.drop(columns="charttime_raw").reset_index(drop=True)
    labs.insert(0, "labevent_id", np.arange(1, len(labs) + 1))

    items = pd.DataFrame(
        [(lab.itemid, lab.label, lab.fluid, lab.category) for lab in LABS], columns=list(D_LABITEMS_COLUMNS)
    ).sort_values("itemid")
    return labs, items.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# ED vital signs and OMR
# --------------------------------------------------------------------------------------------


def _vitalsign(rng: np.random.Generator, ecg: pd.DataFrame) -> pd.DataFrame:
    """ED vital signs: state-following rows within ±30 min of the ECG, drifted rows elsewhere."""
    ed = ecg[ecg["kind"] == "ed"]
    n = len(ed)
    t = ed["ecg_time"].to_numpy()
    rate = ed["rate_bpm"].to_numpy()
    z_inf = ed["z_inf"].to_numpy()
    temp_state = 98.3 + 0.9 * z_inf + rng.normal(0.0, 0.25, n)
    resp_state = 17.0 + 2.2 * z_inf + rng.normal(0.0, 1.0, n)
    spo2_state = np.clip(97.5 - 0.6 * np.maximum(z_inf, 0) + rng.normal(0.0, 1.0, n), 82, 100)
    sbp_state = 132.0 + rng.normal(0.0, 18.0, n)
    dbp_state = 76.0 + rng.normal(0.0, 11.0, n)

    blocks: list[pd.DataFrame] = []

    def block(rows: np.ndarray, when: np.ndarray, inside: bool, temp_missing: float) -> None:
        k = rows.size
        if not k:
            return
        if inside:
            hr = rate[rows] + rng.normal(0.0, 4.0, k)
            temp = temp_state[rows] + rng.normal(0.0, 0.1, k)
            resp = resp_state[rows] + rng.normal(0.0, 0.5, k)
            spo2 = spo2_state[rows]
            sbp, dbp = sbp_state[rows] + rng.normal(0, 4, k), dbp_state[rows] + rng.normal(0, 3, k)
        else:
            hr = rate[rows] + rng.normal(0.0, 14.0, k)
            temp = 98.2 + rng.normal(0.0, 0.7, k)
            resp = 17.0 + rng.normal(0.0, 2.5, k)
            spo2 = np.clip(97.5 + rng.normal(0.0, 1.5, k), 80, 100)
            sbp, dbp = sbp_state[rows] + rng.normal(0, 15, k), dbp_state[rows] + rng.normal(0, 9, k)
        df = pd.DataFrame(
            {
                "ed_row": rows,
                "when": when,
                "temperature": np.where(rng.random(k) < temp_missing, np.nan, np.round(temp, 1)),
                "heartrate": np.round(np.clip(hr, 30, 220)),
                "resprate": np.round(np.clip(resp, 6, 50)),
                "o2sat": np.round(spo2),
                "sbp": np.round(np.clip(sbp, 60, 260)),
                "dbp": np.round(np.clip(dbp, 30, 160)),
            }
        )
        for col in ("heartrate", "resprate", "o2sat", "sbp", "dbp"):
            df.loc[rng.random(k) < 0.03, col] = np.nan
        blocks.append(df)

    near = rng.random(n) < 0.95
    block(np.flatnonzero(near), t[near] + _minutes(rng.uniform(-20, 20, near.sum())), True, 0.15)
    second = rng.random(n) < 0.5
    sign = np.where(rng.random(second.sum()) < 0.5, -1, 1)
    block(np.flatnonzero(second), t[second] + _minutes(sign * rng.uniform(22, 29, second.sum())), True, 0.0)
    # regular observations through the stay, keeping clear of the ±30 min window
    intime, outtime = ed["intime"].to_numpy(), ed["outtime"].to_numpy()
    for k in range(8):
        when = intime + _minutes(rng.uniform(0, 30, n) + k * rng.uniform(50, 140, n))
        keep = (when <= outtime) & (np.abs((when - t) / np.timedelta64(1, "m")) > 35)
        block(np.flatnonzero(keep), when[keep], False, 0.25)
    # implausible rows closest to the ECG (°C temperature, SBP > 500); a valid in-window row exists
    bad = near & (rng.random(n) < 0.015)
    rows = np.flatnonzero(bad)
    if rows.size:
        blk = pd.DataFrame(
            {
                "ed_row": rows,
                "when": t[bad],
                "temperature": np.round(36.0 + rng.uniform(0, 2, rows.size), 1),
                "heartrate": np.round(rate[rows]),
                "resprate": np.round(resp_state[rows]),
                "o2sat": np.round(spo2_state[rows]),
                "sbp": np.where(rng.random(rows.size) < 0.5, 1200.0, np.round(sbp_state[rows])),
                "dbp": np.round(dbp_state[rows]),
            }
        )
        blocks.append(blk)
        block(rows, t[bad] + _minutes(rng.uniform(5, 15, rows.size)), True, 0.0)

    vit = pd.concat(blocks, ignore_index=True)
    r = vit["ed_row"].to_numpy()
    k = len(vit)
    pain_values = np.array(["0", "2", "4", "5", "6", "7", "8", "10", "uta", ""])
    vit["subject_id"] = ed["subject_id"].to_numpy()[r]
    vit["stay_id"] = ed["stay_id"].to_numpy()[r]
    vit["rhythm"] = np.where(rng.random(k) < 0.08, "Sinus Rhythm", "")
    vit["pain"] = pain_values[rng.choice(pain_values.size, k)]
    vit = vit.sort_values(["subject_id", "stay_id", "when"], kind="stable").reset_index(drop=True)
    vit["charttime"] = _fmt_times(vit["when"].to_numpy())
    return vit


def _omr(rng: np.random.Generator, subj: pd.DataFrame, ecg: pd.DataFrame) -> pd.DataFrame:
    """Outpatient measurements: a visit within ±25 days of most ECGs, older/newer visits further away."""
    idx = ecg["subj_idx"].to_numpy()
    has = subj["has_omr"].to_numpy()[idx]
    day = ecg["ecg_time"].to_numpy().astype("datetime64[D]")
    weight = ecg["weight_kg"].to_numpy()
    height = subj["height_cm"].to_numpy()[idx]
    visits: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    near = has & (rng.random(len(ecg)) < 0.88)
    rows = np.flatnonzero(near)
    when = day[rows] + rng.integers(-25, 26, rows.size).astype("timedelta64[D]")
    visits.append((rows, when, weight[rows] + rng.normal(0, 0.4, rows.size), height[rows]))
    for _ in range(2):
        far = has & (rng.random(len(ecg)) < 0.6)
        rows = np.flatnonzero(far)
        sign = np.where(rng.random(rows.size) < 0.5, -1, 1)
        when = day[rows] + (sign * rng.integers(60, 400, rows.size)).astype("timedelta64[D]")
        drifted = np.maximum(weight[rows] + rng.normal(0, 7, rows.size), 38.0)
        visits.append((rows, when, drifted, height[rows]))

    frames = []
    for rows, when, w, h in visits:
        k = rows.size
        w_lbs = np.round(w / 0.453592, 1)
        w_lbs = np.where(rng.random(k) < 0.004, 1.5, w_lbs)  # implausible (< 20 kg) entries
        h_in = np.round(h / 2.54 * 2) / 2
        bmi = np.round(w / (h / 100.0) ** 2, 1)
        subject = ecg["subject_id"].to_numpy()[rows]
        sbp = np.round(rng.normal(128, 16, k)).astype(int)
        dbp = np.round(rng.normal(78, 10, k)).astype(int)
        with_h = rng.random(k) < 0.6
        with_bp = rng.random(k) < 0.9
        bp = np.char.add(np.char.add(sbp.astype(str), "/"), dbp.astype(str)).astype(object)
        everyone = np.ones(k, dtype=bool)
        for name, mask, text in (
            ("Weight (Lbs)", everyone, _strip_zero(_num_text(w_lbs, 1))),
            ("BMI (kg/m2)", everyone, _num_text(bmi, 1)),
            ("Height (Inches)", with_h, _strip_zero(_num_text(h_in, 1))),
            ("Blood Pressure", with_bp, bp),
        ):
            frames.append(
                pd.DataFrame(
                    {
                        "subject_id": subject[mask],
                        "date": when[mask],
                        "result_name": name,
                        "result_value": text[mask],
                    }
                )
            )
    omr = pd.concat(frames, ignore_index=True)
    omr = omr.sort_values(["subject_id", "date", "result_name"], kind="stable").reset_index(drop=True)
    omr["seq_num"] = omr.groupby(["subject_id", "date", "result_name"]).cumcount() + 1
    omr["chartdate"] = _fmt_times(omr["date"].to_numpy().astype("datetime64[D]"), unit="D")
    return omr


# --------------------------------------------------------------------------------------------
# ECG tables, ext-ICD labels, waveforms, ground truth
# --------------------------------------------------------------------------------------------


def _record_path(subject_id: int, study_id: int) -> str:
    """MIMIC-IV-ECG record path: ``files/p<first 4 digits>/p<subject>/s<study>/<study>``."""
    s = str(subject_id)
    return f"files/p{s[:4]}/p{s}/s{study_id}/{study_id}"


def _ecg_tables(rng: np.random.Generator, ecg: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``record_list.csv`` and ``machine_measurements.csv`` consistent with the waveform parameters."""
    n = len(ecg)
    paths = [_record_path(s, st) for s, st in zip(ecg["subject_id"], ecg["study_id"], strict=True)]
    times = _fmt_times(ecg["ecg_time"].to_numpy())
    records = pd.DataFrame(
        {
            "subject_id": ecg["subject_id"],
            "study_id": ecg["study_id"],
            "file_name": ecg["study_id"],
            "ecg_time": times,
            "path": paths,
        }
    )
    rate = ecg["rate_bpm"].to_numpy()
    rr = 60000.0 / rate
    qt = ecg["qtc_ms"].to_numpy() * np.sqrt(rr / 1000.0)
    p_on = np.round(rng.normal(40, 6, n))
    qrs_on = p_on + np.round(ecg["pr"].to_numpy())
    report: dict[str, np.ndarray] = {f"report_{i}": np.full(n, "", dtype=object) for i in range(18)}
    report["report_0"] = np.where(
        rate > 100, "Sinus tachycardia", np.where(rate < 60, "Sinus bradycardia", "Sinus rhythm")
    ).astype(object)
    low_v = ecg["qrs_gain"].to_numpy() < 0.6
    long_qt = ecg["qtc_ms"].to_numpy() > 470
    report["report_1"] = np.where(
        low_v, "Low QRS voltages in limb leads", np.where(long_qt, "Prolonged QT interval", "")
    ).astype(object)
    abnormal = low_v | long_qt | (rate > 100) | (rate < 60)
    verdict = np.where(
        abnormal, "Abnormal ECG", np.where(rng.random(n) < 0.2, "Borderline ECG", "Normal ECG")
    )
    report["report_2"] = np.where(report["report_1"] == "", "", verdict).astype(object)
    report["report_1"] = np.where(report["report_1"] == "", verdict, report["report_1"]).astype(object)
    machine = pd.DataFrame(
        {
            "subject_id": ecg["subject_id"],
            "study_id": ecg["study_id"],
            "cart_id": ecg["cart_id"],
            "ecg_time": times,
            **report,
            "bandwidth": np.array(["0.005-150 Hz", "0.0005-150 Hz", "0.05-150 Hz"])[
                rng.choice(3, n, p=[0.8, 0.14, 0.06])
            ],
            "filtering": np.array(["60 Hz notch Baseline filter", "Baseline filter", "<not specified>"])[
                rng.choice(3, n, p=[0.85, 0.02, 0.13])
            ],
            "rr_interval": np.round(rr).astype(int),
            "p_onset": p_on.astype(int),
            "p_end": (p_on + np.round(rng.normal(105, 10, n))).astype(int),
            "qrs_onset": qrs_on.astype(int),
            "qrs_end": (qrs_on + np.round(ecg["qrs_ms"].to_numpy())).astype(int),
            "t_end": (qrs_on + np.round(qt)).astype(int),
            "p_axis": np.round(rng.normal(55, 20, n)).astype(int),
            "qrs_axis": np.round(ecg["axis"].to_numpy()).astype(int),
            "t_axis": np.round(ecg["axis"].to_numpy() - 15 + rng.normal(0, 15, n)).astype(int),
        }
    )
    missing_p = rng.random(n) < 0.01  # the machine reports 29999 when it finds no P wave
    machine.loc[missing_p, ["p_onset", "p_end", "p_axis"]] = 29999
    return records, machine


def _icd_list(codes: Iterable[str]) -> str:
    """A diagnosis cell as the ext-ICD file stores it: a Python list literal."""
    return repr([str(code) for code in codes])


def _records_w_diag(
    rng: np.random.Generator, subj: pd.DataFrame, ecg: pd.DataFrame, states: dict[str, np.ndarray]
) -> pd.DataFrame:
    """``records_w_diag_icd10.csv``: linkage ids, ICD-10 lists, demographics and the 20-fold split."""
    n = len(ecg)
    kind = ecg["kind"].to_numpy()
    is_ed, is_inp = kind == "ed", kind == "inpatient"
    admitted_ed = is_ed & (ecg["hadm_id"].to_numpy() > 0)
    common = np.array(["I10", "E785", "Z87891", "E119", "K219", "F329", "J449", "I2510", "N390", "Z794"])
    ed_codes = np.array(["R079", "R0602", "R55", "R42", "R1110", "R0789", "R531"])
    hosp, ed_list = [], []
    for i in range(n):
        codes = []
        if states["NTproBNP"][i] > 900:
            codes.append("I509")
        if states["Creatinine"][i] > 1.5:
            codes.append("N179")
        if states["Potassium"][i] > 5.3:
            codes.append("E875")
        if states["Potassium"][i] < 3.1:
            codes.append("E876")
        if states["Hemoglobin"][i] < 12.0:
            codes.append("D649")
        if states["White Blood Cells"][i] > 13.0:
            codes.append("A419")
        codes += list(common[rng.choice(common.size, rng.integers(0, 4), replace=False)])
        hosp.append(codes)
        ed_list.append(list(ed_codes[rng.choice(ed_codes.size, rng.integers(1, 3), replace=False)]))
    ed_diag_ed = [_icd_list(ed_list[i]) if is_ed[i] else "[]" for i in range(n)]
    ed_diag_hosp = [_icd_list(hosp[i]) if admitted_ed[i] else "[]" for i in range(n)]
    hosp_diag_hosp = [_icd_list(hosp[i]) if is_inp[i] else "[]" for i in range(n)]
    all_diag_hosp = [_icd_list(hosp[i]) if (admitted_ed[i] or is_inp[i]) else "[]" for i in range(n)]
    all_diag_all = [h if h != "[]" else e for h, e in zip(all_diag_hosp, ed_diag_ed, strict=True)]

    s = subj.iloc[ecg["subj_idx"].to_numpy()].reset_index(drop=True)
    ecg_year = ecg["ecg_time"].to_numpy().astype("datetime64[Y]").astype(int) + 1970
    hadm = ecg["hadm_id"].to_numpy().astype(float)
    stay = ecg["stay_id"].to_numpy().astype(float)
    return pd.DataFrame(
        {
            "file_name": [
                f"{ZIP_PREFIX}/{_record_path(a, b)}"
                for a, b in zip(ecg["subject_id"], ecg["study_id"], strict=True)
            ],
            "study_id": ecg["study_id"],
            "subject_id": ecg["subject_id"],
            "ecg_time": _fmt_times(ecg["ecg_time"].to_numpy()),
            "ed_stay_id": np.where(is_ed, stay, np.nan),
            "ed_hadm_id": np.where(admitted_ed, hadm, np.nan),
            "hosp_hadm_id": np.where(is_inp, hadm, np.nan),
            "ed_diag_ed": ed_diag_ed,
            "ed_diag_hosp": ed_diag_hosp,
            "hosp_diag_hosp": hosp_diag_hosp,
            "all_diag_hosp": all_diag_hosp,
            "all_diag_all": all_diag_all,
            "gender": s["gender"],
            "age": ecg_year - s["anchor_year"].to_numpy() + s["anchor_age"].to_numpy(),
            "anchor_year": s["anchor_year"],
            "anchor_age": s["anchor_age"],
            "dod": s["dod"],
            "ecg_no_within_stay": np.where(is_ed | is_inp, 0, -1),
            "ecg_taken_in_ed": is_ed,
            "ecg_taken_in_hosp": is_inp,
            "ecg_taken_in_ed_or_hosp": is_ed | is_inp,
            "fold": ecg["fold"],
            "strat_fold": ecg["strat_fold"],
        }
    )


def _dates_of_death(rng: np.random.Generator, subj: pd.DataFrame, ecg: pd.DataFrame) -> np.ndarray:
    """Date of death per subject ('' if alive): the in-hospital death, or a later one for ~6 %."""
    dod = np.full(len(subj), "", dtype=object)
    died = ecg[ecg["died_in_hospital"]]
    dod[died["subj_idx"].to_numpy()] = _fmt_times(died["dischtime"].to_numpy(), unit="D")
    last = ecg.groupby("subj_idx")["ecg_time"].max().to_numpy()
    later = (rng.random(len(subj)) < 0.06) & (dod == "")
    when = last + rng.integers(10, 900, len(subj)).astype("timedelta64[D]")
    dod[later] = _fmt_times(when[later], unit="D")
    return dod


def _ecg_params(row: pd.Series) -> EcgParams:
    """The waveform parameters of one ECG row, including its optional NaN span."""
    spans: tuple[tuple[str, int, int], ...] = ()
    if row["nan_group"] == "limb":
        spans = (("limb", int(row["nan_start"]), int(row["nan_len"])),)
    elif row["nan_group"] == "chest":
        lead = f"V{1 + int(row['nan_start']) % 6}"
        spans = ((lead, int(row["nan_start"]), int(row["nan_len"])),)
    gains = tuple(float(row[f"lead_gain_{k}"]) for k in range(6))
    return EcgParams(
        rate_bpm=float(row["rate_bpm"]),
        qrs_gain=float(row["qrs_gain"]),
        t_gain=float(row["t_gain"]),
        t_width_ms=float(row["t_width_ms"]),
        qtc_ms=float(row["qtc_ms"]),
        pr_ms=float(row["pr"]),
        qrs_ms=float(row["qrs_ms"]),
        p_gain=float(row["p_gain"]),
        axis_deg=float(row["axis"]),
        noise_mv=float(row["noise_mv"]),
        wander_mv=float(row["wander_mv"]),
        hrv=float(row["hrv"]),
        lead_gains=gains,  # type: ignore[arg-type]
        nan_spans=spans,
    )


def _write_waveforms(ecg_root: Path, ecg: pd.DataFrame, seed: int, workers: int, progress: bool) -> None:
    """Write every WFDB record, in a pool of ``workers`` processes, with a progress bar."""
    from tqdm import tqdm

    tasks = []
    for _, row in ecg.iterrows():
        rel = _record_path(int(row["subject_id"]), int(row["study_id"]))
        when = pd.Timestamp(row["ecg_time"]).to_pydatetime()
        tasks.append(
            RecordTask(
                directory=str(ecg_root / Path(rel).parent),
                record_name=Path(rel).name,
                params=_ecg_params(row),
                seed=(seed, int(row["study_id"])),
                base_datetime=when,
            )
        )
    if workers == 1:
        with tqdm(
            total=len(tasks), desc="WFDB records", unit="rec", disable=not progress, file=sys.stderr
        ) as bar:
            for task in tasks:
                write_record(task)
                bar.update()
        return
    # the pool is forked before tqdm starts its monitor thread
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.imap_unordered(write_record, tasks, chunksize=16)
        with tqdm(
            total=len(tasks), desc="WFDB records", unit="rec", disable=not progress, file=sys.stderr
        ) as bar:
            for _ in results:
                bar.update()


def _write_ground_truth(
    path: Path,
    seed: int,
    subjects: int,
    ecg: pd.DataFrame,
    scores: dict[str, np.ndarray],
    states: dict[str, np.ndarray],
) -> None:
    """``ground_truth.json``: planted targets, the rules, and each ECG's hidden state."""
    rules = {
        r.label: {
            "directions": list(r.directions),
            "positive_rate": _positive_rates(r.label, states[r.label]),
            "branch": r.branch,
            "weights": r.weights,
            "noise": r.noise,
            "value": (
                f"{r.centre:.4g} * exp({r.scale} * score)" if r.log else f"{r.centre:.4g} + {r.scale} * score"
            ),
            "thresholds": _paper_thresholds(r.label),
            "description": r.description,
        }
        for r in PLANTED_RULES
    }
    driver_cols = ("z_volt", "z_rate", "z_k", "z_qt", "z_inf", "z_age", "z_sex", "z_weight")
    wave_cols = ("rate_bpm", "qrs_gain", "t_gain", "t_width_ms", "qtc_ms")
    records = {}
    for i, row in enumerate(ecg.itertuples(index=False)):
        records[str(row.study_id)] = {
            "subject_id": int(row.subject_id),
            "kind": str(row.kind),
            "strat_fold": int(row.strat_fold),
            "drivers": {c: round(float(getattr(row, c)), 4) for c in driver_cols},
            "waveform": {c: round(float(getattr(row, c)), 4) for c in wave_cols},
            "weight_kg": round(float(row.weight_kg), 2),
            "scores": {k: round(float(v[i]), 4) for k, v in scores.items()},
            "labs": {k: round(float(v[i]), 4) for k, v in states.items()},
        }
    doc = {
        "seed": seed,
        "subjects": subjects,
        "planted_targets": planted_targets(),
        "rules": rules,
        "records": records,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n", encoding="utf-8")


def _positive_rates(label: str, values: np.ndarray) -> dict[str, float]:
    """Share of ECGs whose true value is below / above the lab's thresholds."""
    th = _paper_thresholds(label)
    return {
        "low": round(float(np.mean(values < th["low"])), 4),
        "high": round(float(np.mean(values > th["high"])), 4),
    }


def _paper_thresholds(label: str) -> dict[str, float]:
    """The median reference range the method derives for a planted lab (the main range here)."""
    lab = next(x for x in LABS if x.label == label and x.fluid == "Blood")
    low, high = lab.ref if lab.ref is not None else (float("nan"), float("nan"))
    return {"low": float(low), "high": float(high)}

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

Modules, one per table or concern: :mod:`.generator` (the command, argument checks and the order
of the draws), :mod:`.constants` (paths and column lists), :mod:`.catalogue` (lab items and planted
rules), :mod:`.population` (patients, ECG draws, admissions, ED stays), :mod:`.labs` (planted
states, ``labevents``, ``d_labitems``), :mod:`.vitals` (ED ``vitalsign``), :mod:`.omr`,
:mod:`.ecg` (record list, machine measurements, ext-ICD labels, WFDB records),
:mod:`.ground_truth` (``ground_truth.json`` and the oracle scores) and :mod:`.formats` (value
formats, ids, the CSV writer).
"""

from model_training.synthetic.catalogue import LABS, PLANTED_RULES, LabItem, PlantedRule, planted_targets
from model_training.synthetic.constants import (
    ECG_DIR,
    ED_DIR,
    GROUND_TRUTH,
    HOSP_DIR,
    ICD_DIR,
    MIN_SUBJECTS,
    OWNED_ENTRIES,
)
from model_training.synthetic.generator import SynthSummary, add_arguments, generate, run
from model_training.synthetic.ground_truth import oracle_scores

__all__ = [
    "ECG_DIR",
    "ED_DIR",
    "GROUND_TRUTH",
    "HOSP_DIR",
    "ICD_DIR",
    "LABS",
    "MIN_SUBJECTS",
    "OWNED_ENTRIES",
    "PLANTED_RULES",
    "LabItem",
    "PlantedRule",
    "SynthSummary",
    "add_arguments",
    "generate",
    "oracle_scores",
    "planted_targets",
    "run",
]

"""Where ``ecglab synth-mimic`` writes each file and which columns, in which order, each holds.

The folder names and column lists are those of the PhysioNet releases (MIMIC-IV 3.1 ``hosp``,
MIMIC-IV-ED 2.2, MIMIC-IV-ECG 1.0, MIMIC-IV-ECG-ext-ICD 1.0.1), so the same pipeline reads the
synthetic and the real files; see the package docstring for the sources.
"""

from __future__ import annotations

from pathlib import Path

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

"""``ecglab synth-mimic``: the fake MIMIC-IV data set has the real layout, the dirty rows the
method drops, and planted signal that the hidden state determines.

Method references are to ``docs/method.md`` (§1.2 label construction, §2.2 waveforms, §2.3
metadata windows, §2.4 label windows, §2.5 folds).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb
from scipy.signal import butter, find_peaks, sosfiltfilt

from cds_service.cli import main
from fhir_mappings.errors import InputError
from model_training import synthetic
from model_training.synth_waveforms import STORED_LEADS

SUBJECTS = 60
SEED = 7
HOSP = Path("mimic-iv/3.1/hosp")
ED = Path("mimic-iv-ed/2.2/ed")
ECG = Path("mimic-iv-ecg/1.0")
ICD = Path("mimic-iv-ecg-ext-icd-labels/1.0.1")

# The real files' column lists, spelled out here (not imported) so the test pins the schema.
EXPECTED_COLUMNS: dict[Path, list[str]] = {
    HOSP / "patients.csv.gz": ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
    HOSP / "admissions.csv.gz": [
        "subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
        "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
        "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag",
    ],
    HOSP / "d_labitems.csv.gz": ["itemid", "label", "fluid", "category"],
    HOSP / "labevents.csv.gz": [
        "labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id",
        "charttime", "storetime", "value", "valuenum", "valueuom", "ref_range_lower",
        "ref_range_upper", "flag", "priority", "comments",
    ],
    HOSP / "omr.csv.gz": ["subject_id", "chartdate", "seq_num", "result_name", "result_value"],
    ED / "edstays.csv.gz": [
        "subject_id", "hadm_id", "stay_id", "intime", "outtime", "gender", "race",
        "arrival_transport", "disposition",
    ],
    ED / "vitalsign.csv.gz": [
        "subject_id", "stay_id", "charttime", "temperature", "heartrate", "resprate", "o2sat",
        "sbp", "dbp", "rhythm", "pain",
    ],
    ECG / "record_list.csv": ["subject_id", "study_id", "file_name", "ecg_time", "path"],
    ECG / "machine_measurements.csv": [
        "subject_id", "study_id", "cart_id", "ecg_time", *(f"report_{i}" for i in range(18)),
        "bandwidth", "filtering", "rr_interval", "p_onset", "p_end", "qrs_onset", "qrs_end",
        "t_end", "p_axis", "qrs_axis", "t_axis",
    ],
    ICD / "records_w_diag_icd10.csv": [
        "file_name", "study_id", "subject_id", "ecg_time", "ed_stay_id", "ed_hadm_id",
        "hosp_hadm_id", "ed_diag_ed", "ed_diag_hosp", "hosp_diag_hosp", "all_diag_hosp",
        "all_diag_all", "gender", "age", "anchor_year", "anchor_age", "dod", "ecg_no_within_stay",
        "ecg_taken_in_ed", "ecg_taken_in_hosp", "ecg_taken_in_ed_or_hosp", "fold", "strat_fold",
    ],
}  # fmt: skip

DATETIME_COLUMNS: dict[Path, list[str]] = {
    HOSP / "admissions.csv.gz": ["admittime", "dischtime", "deathtime", "edregtime", "edouttime"],
    HOSP / "labevents.csv.gz": ["charttime", "storetime"],
    ED / "edstays.csv.gz": ["intime", "outtime"],
    ED / "vitalsign.csv.gz": ["charttime"],
    ECG / "record_list.csv": ["ecg_time"],
    ECG / "machine_measurements.csv": ["ecg_time"],
    ICD / "records_w_diag_icd10.csv": ["ecg_time"],
}
DATE_COLUMNS: dict[Path, list[str]] = {
    HOSP / "patients.csv.gz": ["dod"],
    HOSP / "omr.csv.gz": ["chartdate"],
    ICD / "records_w_diag_icd10.csv": ["dod"],
}
DATETIME_RE = re.compile(r"^2(1[1-9]\d)-[01]\d-[0-3]\d [0-2]\d:[0-5]\d:[0-5]\d$")
DATE_RE = re.compile(r"^2(1[1-9]\d|2\d\d)-[01]\d-[0-3]\d$")


def _read(root: Path, rel: Path) -> pd.DataFrame:
    return pd.read_csv(root / rel, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small data set (two writer processes) shared by the read-only tests."""
    out = tmp_path_factory.mktemp("synth") / "out"
    synthetic.generate(out, SUBJECTS, SEED, workers=2)
    return out


@pytest.fixture(scope="module")
def labs(data: Path) -> pd.DataFrame:
    items = pd.read_csv(data / HOSP / "d_labitems.csv.gz")
    return pd.read_csv(data / HOSP / "labevents.csv.gz").merge(items, on="itemid")


@pytest.fixture(scope="module")
def truth(data: Path) -> dict:
    return json.loads((data / "ground_truth.json").read_text())


def test_every_mimic_file_is_written_in_the_physionet_layout(data: Path) -> None:
    """§2.1: the source tables sit at their PhysioNet paths (module/version/table)."""
    for rel in EXPECTED_COLUMNS:
        assert (data / rel).is_file(), rel
    assert (data / "ground_truth.json").is_file()


@pytest.mark.parametrize("rel", list(EXPECTED_COLUMNS), ids=lambda p: p.name)
def test_columns_match_the_real_files(data: Path, rel: Path) -> None:
    """Each table has exactly the real file's columns, in the real order."""
    assert list(_read(data, rel).columns) == EXPECTED_COLUMNS[rel]


def test_gzip_files_have_no_timestamp_or_name(data: Path) -> None:
    """Byte-identical output needs gzip headers without mtime or file name."""
    gzipped = [rel for rel in EXPECTED_COLUMNS if rel.suffix == ".gz"]
    assert len(gzipped) == 7  # patients, admissions, d_labitems, labevents, omr, edstays, vitalsign
    for rel in gzipped:
        head = (data / rel).read_bytes()[:10]
        assert head[:2] == b"\x1f\x8b"
        assert head[4:8] == b"\x00\x00\x00\x00", rel  # MTIME
        assert head[3] & 0x08 == 0, rel  # FNAME flag
        gzip.decompress((data / rel).read_bytes())


def test_times_use_mimic_format_and_shifted_years(data: Path) -> None:
    """Datetimes are 'YYYY-MM-DD HH:MM:SS' and dates 'YYYY-MM-DD', in shifted future years."""
    for rel, cols in DATETIME_COLUMNS.items():
        df = _read(data, rel)
        for col in cols:
            values = df[col][df[col] != ""]
            assert len(values) > 0 or col == "deathtime", (rel, col)
            assert values.str.match(DATETIME_RE).all(), (
                rel,
                col,
                values[~values.str.match(DATETIME_RE)].head(),
            )
    for rel, cols in DATE_COLUMNS.items():
        df = _read(data, rel)
        for col in cols:
            values = df[col][df[col] != ""]
            assert values.str.match(DATE_RE).all(), (rel, col)


def test_identifiers_lie_in_mimic_ranges(data: Path) -> None:
    """subject_id 1e7-2e7, hadm_id 2e7-3e7, ED stay_id 3e7-4e7, study_id 4e7-5e7."""
    rec = pd.read_csv(data / ECG / "record_list.csv")
    adm = pd.read_csv(data / HOSP / "admissions.csv.gz")
    ed = pd.read_csv(data / ED / "edstays.csv.gz")
    assert rec["subject_id"].between(10_000_000, 19_999_999).all()
    assert rec["study_id"].between(40_000_000, 49_999_999).all()
    assert rec["study_id"].is_unique
    assert adm["hadm_id"].between(20_000_000, 29_999_999).all()
    assert ed["stay_id"].between(30_000_000, 39_999_999).all()


def test_record_paths_follow_mimic_ecg_layout(data: Path) -> None:
    """``path`` is files/pNNNN/pNNNNNNNN/sNNNNNNNN/NNNNNNNN and both WFDB files exist."""
    rec = pd.read_csv(data / ECG / "record_list.csv")
    icd = pd.read_csv(data / ICD / "records_w_diag_icd10.csv")
    assert len(rec) > 0 and len(icd) == len(rec)
    for row in rec.itertuples():
        s = str(row.subject_id)
        assert row.path == f"files/p{s[:4]}/p{s}/s{row.study_id}/{row.study_id}"
        assert str(row.file_name) == str(row.study_id)
        assert (data / ECG / f"{row.path}.hea").is_file()
        assert (data / ECG / f"{row.path}.dat").is_file()
    prefixed = icd.set_index("study_id")["file_name"]
    for row in rec.itertuples():
        assert (
            prefixed[row.study_id]
            == f"mimic-iv-ecg-diagnostic-electrocardiogram-matched-subset-1.0/{row.path}"
        )


def test_wfdb_header_matches_mimic_ecg(data: Path) -> None:
    """§2.2: 12 leads in stored order (aVF before aVL), 500 Hz, 5000 samples, fmt 16, mV,
    gain 1000, and the header's base date/time is the ECG time."""
    rec = pd.read_csv(data / ECG / "record_list.csv").head(5)
    assert len(rec) == 5
    for row in rec.itertuples():
        header = wfdb.rdheader(str(data / ECG / row.path))
        assert header.sig_name == list(STORED_LEADS)
        assert header.sig_name[4:6] == ["aVF", "aVL"]
        assert header.fs == 500
        assert header.sig_len == 5000
        assert set(header.fmt) == {"16"}
        assert set(header.units) == {"mV"}
        assert set(header.adc_gain) == {1000.0}
        assert f"{header.base_date} {header.base_time}" == row.ecg_time


def test_limb_leads_obey_einthoven_and_goldberger(data: Path) -> None:
    """III = II - I, aVR = -(I+II)/2, aVL = I - II/2, aVF = II - I/2 on records read back with wfdb."""
    rec = pd.read_csv(data / ECG / "record_list.csv").head(8)
    assert len(rec) == 8
    for row in rec.itertuples():
        record = wfdb.rdrecord(str(data / ECG / row.path))
        x = {name: record.p_signal[:, k] for k, name in enumerate(record.sig_name)}
        tol = 0.0011  # half an ADC unit (1 µV) of rounding on the derived leads, plus float slack
        np.testing.assert_allclose(x["III"], x["II"] - x["I"], atol=tol)
        np.testing.assert_allclose(x["aVR"], -(x["I"] + x["II"]) / 2, atol=tol)
        np.testing.assert_allclose(x["aVL"], x["I"] - x["II"] / 2, atol=tol)
        np.testing.assert_allclose(x["aVF"], x["II"] - x["I"] / 2, atol=tol)
        assert 0.3 < np.nanmax(np.ptp(record.p_signal, axis=0)) < 10.0  # plausible mV amplitudes


def test_some_records_contain_nan_samples(data: Path) -> None:
    """§2.2 interpolates NaNs, so a few records carry NaN samples (WFDB invalid value)."""
    rec = pd.read_csv(data / ECG / "record_list.csv")
    with_nan = sum(np.isnan(wfdb.rdrecord(str(data / ECG / p)).p_signal).any() for p in rec["path"])
    assert 0 < with_nan < len(rec) / 4


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-subject set written by two processes, for the determinism tests."""
    out = tmp_path_factory.mktemp("small") / "out"
    synthetic.generate(out, 20, 3, workers=2)
    return out


def test_same_seed_gives_identical_bytes(small: Path, tmp_path: Path) -> None:
    """Determinism: same seed → identical labevents and .dat bytes, whatever the worker count."""
    again = tmp_path / "again"
    synthetic.generate(again, 20, 3, workers=1)
    rel_labs = HOSP / "labevents.csv.gz"
    assert (again / rel_labs).read_bytes() == (small / rel_labs).read_bytes()
    for path in pd.read_csv(small / ECG / "record_list.csv")["path"].iloc[:3]:
        for ext in (".dat", ".hea"):
            assert (again / ECG / f"{path}{ext}").read_bytes() == (small / ECG / f"{path}{ext}").read_bytes()
    assert (again / "ground_truth.json").read_bytes() == (small / "ground_truth.json").read_bytes()


def test_different_seed_gives_different_data(small: Path, tmp_path: Path) -> None:
    """Determinism: another seed → other labevents bytes and other studies."""
    other = tmp_path / "other"
    synthetic.generate(other, 20, 4, workers=1)
    rel_labs = HOSP / "labevents.csv.gz"
    assert (other / rel_labs).read_bytes() != (small / rel_labs).read_bytes()
    a = set(pd.read_csv(small / ECG / "record_list.csv")["study_id"])
    b = set(pd.read_csv(other / ECG / "record_list.csv")["study_id"])
    assert a != b


def test_strat_fold_is_patient_grouped_over_0_to_19(data: Path) -> None:
    """§2.5: strat_fold (and fold) run 0-19 and every ECG of a subject shares one fold."""
    icd = pd.read_csv(data / ICD / "records_w_diag_icd10.csv")
    for col in ("strat_fold", "fold"):
        assert set(icd[col]) == set(range(20))
        assert (icd.groupby("subject_id")[col].nunique() == 1).all()
    rec = pd.read_csv(data / ECG / "record_list.csv")
    assert set(icd["study_id"]) == set(rec["study_id"])


def test_ext_icd_diagnosis_columns_are_python_lists(data: Path) -> None:
    """The five diagnosis columns hold Python list literals of ICD-10 codes ('[]' when none)."""
    icd = _read(data, ICD / "records_w_diag_icd10.csv")
    for col in ("ed_diag_ed", "ed_diag_hosp", "hosp_diag_hosp", "all_diag_hosp", "all_diag_all"):
        assert icd[col].str.match(r"^\[('[A-Z]\d[0-9A-Z]*'(, )?)*\]$").all(), col
    assert set(icd["ecg_taken_in_ed"]) <= {"True", "False"}


def test_labevents_contain_the_rows_the_method_drops(labs: pd.DataFrame) -> None:
    """§1.2 steps 1-4: NaN valuenum, 0/0 reference ranges, labels H/I/L, another fluid under a
    blood label, D-Dimer in ng/mL DDU and lymphocytes in #/uL are all present to be removed."""
    assert labs["valuenum"].isna().any()
    assert ((labs["ref_range_lower"] == 0) & (labs["ref_range_upper"] == 0)).any()
    assert {"H", "I", "L"} <= set(labs["label"])
    creat = labs[labs["label"] == "Creatinine"]
    assert set(creat["fluid"]) == {"Blood", "Urine"}
    assert (creat["fluid"] == "Blood").sum() > (creat["fluid"] == "Urine").sum()
    assert ((labs["label"] == "D-Dimer") & (labs["valueuom"] == "ng/mL DDU")).any()
    assert ((labs["label"] == "Absolute Lymphocyte Count") & (labs["valueuom"] == "#/uL")).any()


def test_reference_ranges_vary_so_the_median_matters(labs: pd.DataFrame) -> None:
    """§1.2 step 5: per-row ranges mostly equal the main range; variants exist; the median is the
    paper's threshold (NTproBNP 353, Hemoglobin 17.5, Hematocrit 51, Creatinine 0.5, BUN 6)."""
    blood = labs[
        (labs["fluid"] == "Blood") & ~((labs["ref_range_lower"] == 0) & (labs["ref_range_upper"] == 0))
    ]
    med = blood.groupby("label")[["ref_range_lower", "ref_range_upper"]].median()
    assert med.loc["NTproBNP", "ref_range_upper"] == 353
    assert med.loc["Hemoglobin", "ref_range_upper"] == 17.5
    assert med.loc["Hematocrit", "ref_range_upper"] == 51
    assert med.loc["Creatinine", "ref_range_lower"] == 0.5
    assert med.loc["Urea Nitrogen", "ref_range_lower"] == 6
    for label in ("Potassium", "Hemoglobin", "Creatinine"):
        assert blood[blood["label"] == label]["ref_range_upper"].nunique() >= 2


def test_labs_are_drawn_before_inside_and_after_the_windows(data: Path, labs: pd.DataFrame) -> None:
    """§2.4: draws fall before -60 min, inside [-60, 60] and [0, 120], and after +120 min."""
    rec = pd.read_csv(data / ECG / "record_list.csv", parse_dates=["ecg_time"])
    m = labs.assign(charttime=pd.to_datetime(labs["charttime"])).merge(rec, on="subject_id")
    dt = (m["charttime"] - m["ecg_time"]).dt.total_seconds() / 60
    near = dt.abs() < 24 * 60
    assert (near & (dt < -60)).any()
    assert (near & dt.between(-60, 0)).any()
    assert (near & dt.between(0, 30)).any()
    assert (near & dt.between(60, 120)).any()
    assert (near & (dt > 120)).any()


def test_vitals_and_omr_carry_missing_and_out_of_window_rows(data: Path) -> None:
    """§2.3: NaN vitals, implausible vitals, rows outside ±30 min; OMR outside ±30 days,
    subjects without OMR; BP stored as text 'sbp/dbp'."""
    rec = pd.read_csv(data / ECG / "record_list.csv", parse_dates=["ecg_time"])
    vit = pd.read_csv(data / ED / "vitalsign.csv.gz", parse_dates=["charttime"])
    assert vit[["temperature", "heartrate", "o2sat"]].isna().any().all()
    mv = vit.merge(rec, on="subject_id")
    dt = ((mv["charttime"] - mv["ecg_time"]).dt.total_seconds() / 60).abs()
    assert (dt <= 30).any() and ((dt > 30) & (dt < 24 * 60)).any()
    omr = _read(data, HOSP / "omr.csv.gz").astype({"subject_id": int})
    assert {"Weight (Lbs)", "Height (Inches)", "BMI (kg/m2)", "Blood Pressure"} <= set(omr["result_name"])
    assert omr.loc[omr["result_name"] == "Blood Pressure", "result_value"].str.match(r"^\d+/\d+$").all()
    mo = omr.assign(chartdate=pd.to_datetime(omr["chartdate"])).merge(rec, on="subject_id")
    days = ((mo["chartdate"] - mo["ecg_time"]).dt.total_seconds() / 86400).abs()
    assert (days <= 30).any() and (days > 30).any()
    assert set(rec["subject_id"]) - set(omr["subject_id"])


def test_in_window_metadata_follows_the_hidden_state(data: Path, truth: dict) -> None:
    """§2.3 windows: vitals within ±30 min show the ECG's rate; the closest OMR weight within
    ±30 days is the weight the planted rules used."""
    rec = pd.read_csv(data / ECG / "record_list.csv", parse_dates=["ecg_time"])
    state = {int(k): v for k, v in truth["records"].items()}
    vit = pd.read_csv(data / ED / "vitalsign.csv.gz", parse_dates=["charttime"]).merge(rec, on="subject_id")
    vit = vit[((vit["charttime"] - vit["ecg_time"]).dt.total_seconds() / 60).abs() <= 30].dropna(
        subset=["heartrate"]
    )
    rate = vit["study_id"].map(lambda s: state[s]["waveform"]["rate_bpm"])
    assert len(vit) > 50
    assert ((vit["heartrate"] - rate).abs() < 15).mean() > 0.99
    omr = pd.read_csv(data / HOSP / "omr.csv.gz", parse_dates=["chartdate"])
    weight = omr[omr["result_name"] == "Weight (Lbs)"].merge(rec, on="subject_id")
    weight["days"] = ((weight["chartdate"] - weight["ecg_time"]).dt.total_seconds() / 86400).abs()
    closest = weight[weight["days"] <= 30].sort_values("days").groupby("study_id").first()
    kg = pd.to_numeric(closest["result_value"]) * 0.453592
    expected = closest.index.map(lambda s: state[s]["weight_kg"])
    assert ((kg - expected).abs() < 3).mean() > 0.9


def test_ground_truth_lists_planted_targets(data: Path, truth: dict) -> None:
    """ground_truth.json names planted targets as the preprocess output does and keeps every ECG's state."""
    items = pd.read_csv(data / HOSP / "d_labitems.csv.gz")
    blood_labels = set(items.loc[items["fluid"] == "Blood", "label"])
    assert truth["seed"] == SEED and truth["subjects"] == SUBJECTS
    targets = truth["planted_targets"]
    assert targets == synthetic.planted_targets()
    pattern = re.compile(r"^(?P<label>.+)_(low|high)_(est|mon30|mon60|mon120)$")
    for name in targets:
        match = pattern.match(name)
        assert match and match["label"] in blood_labels, name
        assert match["label"] in truth["rules"]
    assert "NTproBNP_high_est" in targets and "Potassium_high_mon30" in targets
    rec = pd.read_csv(data / ECG / "record_list.csv")
    assert set(truth["records"]) == {str(s) for s in rec["study_id"]}
    branches = {rule["branch"] for rule in truth["rules"].values()}
    assert branches == {"waveform", "metadata", "both"}


def test_planted_rule_determines_the_est_label(data: Path, labs: pd.DataFrame, truth: dict) -> None:
    """§2.4 est label (closest draw in ±60 min, median thresholds) agrees with the hidden state.

    Draws measure the state with 1.5 % noise and MIMIC's rounding, so values right at a threshold
    may flip; at least 90 % must agree.
    """
    rec = pd.read_csv(data / ECG / "record_list.csv", parse_dates=["ecg_time"])
    clean = labs.dropna(subset=["valuenum"])
    clean = clean[
        (clean["fluid"] == "Blood") & ~((clean["ref_range_lower"] == 0) & (clean["ref_range_upper"] == 0))
    ]
    m = clean.assign(charttime=pd.to_datetime(clean["charttime"])).merge(rec, on="subject_id")
    m["adt"] = ((m["charttime"] - m["ecg_time"]).dt.total_seconds() / 60).abs()
    closest = m[m["adt"] <= 60].sort_values("adt").groupby(["study_id", "label"]).first()
    assert len(truth["rules"]) == 7  # one rule per planted lab
    for label, rule in truth["rules"].items():
        got = closest.xs(label, level="label")["valuenum"]
        state = pd.Series({int(k): v["labs"][label] for k, v in truth["records"].items()}).loc[got.index]
        for direction in rule["directions"]:
            th = rule["thresholds"][direction]
            y_lab = got > th if direction == "high" else got < th
            y_state = state > th if direction == "high" else state < th
            assert (y_lab == y_state).mean() > 0.9, (label, direction)


def test_waveform_reflects_the_hidden_state(data: Path, truth: dict) -> None:
    """The waveform carries the planted drivers: R-R interval gives the rate, QRS size the voltage."""
    rec = pd.read_csv(data / ECG / "record_list.csv").head(30)
    qrs_band = butter(3, [15, 40], btype="bandpass", fs=500, output="sos")  # keeps QRS, not T
    rates, gains, hidden_rate, hidden_gain = [], [], [], []
    for row in rec.itertuples():
        x = np.nan_to_num(wfdb.rdrecord(str(data / ECG / row.path)).p_signal)
        energy = np.abs(sosfiltfilt(qrs_band, x, axis=0)).sum(axis=1)
        peaks, _ = find_peaks(energy, distance=150, height=0.4 * energy.max())
        rates.append(60.0 * 500 / np.median(np.diff(peaks)))
        gains.append(np.median([np.ptp(x[max(p - 30, 0) : p + 30], axis=0).sum() for p in peaks]))
        wave = truth["records"][str(row.study_id)]["waveform"]
        hidden_rate.append(wave["rate_bpm"])
        hidden_gain.append(wave["qrs_gain"])
    np.testing.assert_allclose(rates, hidden_rate, rtol=0.08)
    assert np.corrcoef(np.log(gains), np.log(hidden_gain))[0, 1] > 0.8


def test_cli_refuses_a_non_empty_out_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OUT exists and is non-empty → error exit 2 naming --force; with --force the set is replaced."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["synth-mimic", str(out), "--subjects", "20", "--seed", "3", "--workers", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (
        main(["synth-mimic", str(out), "--subjects", "20", "--seed", "3", "--workers", "1", "--force"]) == 0
    )
    assert (out / "keep.txt").read_text() == "mine"  # --force removes only what synth-mimic writes
    assert (out / ECG / "record_list.csv").is_file()


def test_cli_rejects_too_few_subjects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--subjects below 20 is a one-line error naming the flag, exit status 2."""
    assert main(["synth-mimic", str(tmp_path / "x"), "--subjects", "5"]) == 2
    assert "--subjects" in capsys.readouterr().err
    with pytest.raises(InputError, match="--subjects"):
        synthetic.generate(tmp_path / "y", 19, 0)


def test_oracle_scores_are_the_noise_free_planted_rules(truth: dict) -> None:
    """The evaluation's oracle: weighted drivers without noise, rank-correlated with the noisy score."""
    from model_training.synthetic import oracle_scores

    ids = [int(s) for s in truth["records"]]
    oracle = oracle_scores(truth, ids)
    assert set(oracle) == set(truth["rules"])
    for lab, values in oracle.items():
        noisy = np.array([truth["records"][str(i)]["scores"][lab] for i in ids])
        assert values.shape == noisy.shape
        assert np.corrcoef(values, noisy)[0, 1] > 0.8, lab  # the noise is small beside the drivers
    # Hematocrit's rule builds on hemoglobin's score: its oracle follows hemoglobin's exactly
    weight = truth["rules"]["Hematocrit"]["weights"]["Hemoglobin"]
    np.testing.assert_allclose(oracle["Hematocrit"], weight * oracle["Hemoglobin"])

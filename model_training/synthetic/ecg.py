"""MIMIC-IV-ECG: ``record_list.csv``, ``machine_measurements.csv``, the ext-ICD labels and WFDB records.

The machine measurements and ICD codes agree with each ECG's waveform parameters and lab state;
the WFDB records are written by worker processes (:mod:`model_training.synth_waveforms`), each
from a seed derived from ``(seed, study_id)`` so the output does not depend on the worker count.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from model_training.synth_waveforms import EcgParams, RecordTask, write_record
from model_training.synthetic.constants import ZIP_PREFIX
from model_training.synthetic.formats import fmt_times


def record_path(subject_id: int, study_id: int) -> str:
    """MIMIC-IV-ECG record path: ``files/p<first 4 digits>/p<subject>/s<study>/<study>``."""
    s = str(subject_id)
    return f"files/p{s[:4]}/p{s}/s{study_id}/{study_id}"


def draw_ecg_tables(rng: np.random.Generator, ecg: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``record_list.csv`` and ``machine_measurements.csv`` consistent with the waveform parameters."""
    n = len(ecg)
    paths = [record_path(s, st) for s, st in zip(ecg["subject_id"], ecg["study_id"], strict=True)]
    times = fmt_times(ecg["ecg_time"].to_numpy())
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


def draw_records_w_diag(
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
                f"{ZIP_PREFIX}/{record_path(a, b)}"
                for a, b in zip(ecg["subject_id"], ecg["study_id"], strict=True)
            ],
            "study_id": ecg["study_id"],
            "subject_id": ecg["subject_id"],
            "ecg_time": fmt_times(ecg["ecg_time"].to_numpy()),
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


def write_waveforms(ecg_root: Path, ecg: pd.DataFrame, seed: int, workers: int, progress: bool) -> None:
    """Write every WFDB record, in a pool of ``workers`` processes, with a progress bar."""
    from tqdm import tqdm

    tasks = []
    for _, row in ecg.iterrows():
        rel = record_path(int(row["subject_id"]), int(row["study_id"]))
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

"""Patients, their ECGs and the encounters around them (``patients``, ``admissions``, ``edstays``).

Each subject gets demographics, body size and a per-subject ECG morphology; each ECG a time, an
encounter kind (ED, inpatient, outpatient), the hidden standard-normal drivers and its waveform
parameters; ED ECGs an ED stay, some of them and every inpatient ECG a hospital admission.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from model_training.synth_waveforms import N_SAMPLES
from model_training.synthetic.formats import fmt_times, minutes, provider_ids, unique_ids

RACES = (
    "WHITE", "WHITE - OTHER EUROPEAN", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN",
    "HISPANIC OR LATINO", "ASIAN", "ASIAN - CHINESE", "OTHER", "UNKNOWN", "UNABLE TO OBTAIN",
)  # fmt: skip
_RACE_P = (0.52, 0.06, 0.15, 0.04, 0.03, 0.03, 0.02, 0.05, 0.07, 0.03)


def draw_subjects(rng: np.random.Generator, n: int) -> pd.DataFrame:
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
            "subject_id": np.sort(unique_ids(rng, 10_000_000, 20_000_000, n)),
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


def draw_ecgs(rng: np.random.Generator, subj: pd.DataFrame) -> pd.DataFrame:
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
            "study_id": unique_ids(rng, 40_000_000, 50_000_000, n),
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


def draw_encounters(
    rng: np.random.Generator, subj: pd.DataFrame, ecg: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ED stays (one per ED ECG), hospital admissions, and the per-ECG encounter ids."""
    n = len(ecg)
    t = ecg["ecg_time"].to_numpy()
    is_ed = ecg["kind"].to_numpy() == "ed"
    is_inp = ecg["kind"].to_numpy() == "inpatient"
    admitted = is_ed & (rng.random(n) < 0.45)
    has_adm = admitted | is_inp

    intime = t - minutes(rng.uniform(15, 240, n))
    outtime = t + minutes(rng.uniform(90, 720, n))
    admit_ed = outtime - minutes(rng.uniform(5, 90, n))
    admit_inp = t - minutes(rng.uniform(6 * 60, 96 * 60, n))
    admittime = np.where(is_inp, admit_inp, admit_ed)
    dischtime = np.where(is_inp, t, admittime) + minutes(rng.uniform(12 * 60, 10 * 1440, n))

    last_of_subject = np.r_[ecg["subj_idx"].to_numpy()[1:] != ecg["subj_idx"].to_numpy()[:-1], True]
    died = has_adm & last_of_subject & (rng.random(n) < 0.05)

    stay_id = np.where(is_ed, unique_ids(rng, 30_000_000, 40_000_000, n), -1)
    hadm_id = np.where(has_adm, unique_ids(rng, 20_000_000, 30_000_000, n), -1)
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
            "intime": fmt_times(intime),
            "outtime": fmt_times(outtime),
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
            "admittime": fmt_times(admittime),
            "dischtime": fmt_times(dischtime),
            "deathtime": fmt_times(np.where(died, dischtime, np.datetime64("NaT"))),
            "admission_type": adm_type,
            "admit_provider_id": provider_ids(rng, n, 0.9),
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
            "edregtime": np.where(admitted, fmt_times(intime), ""),
            "edouttime": np.where(admitted, fmt_times(outtime), ""),
            "hospital_expire_flag": died.astype(int),
        }
    )[has_adm]
    return admissions.reset_index(drop=True), ed.reset_index(drop=True)


def draw_dates_of_death(rng: np.random.Generator, subj: pd.DataFrame, ecg: pd.DataFrame) -> np.ndarray:
    """Date of death per subject ('' if alive): the in-hospital death, or a later one for ~6 %."""
    dod = np.full(len(subj), "", dtype=object)
    died = ecg[ecg["died_in_hospital"]]
    dod[died["subj_idx"].to_numpy()] = fmt_times(died["dischtime"].to_numpy(), unit="D")
    last = ecg.groupby("subj_idx")["ecg_time"].max().to_numpy()
    later = (rng.random(len(subj)) < 0.06) & (dod == "")
    when = last + rng.integers(10, 900, len(subj)).astype("timedelta64[D]")
    dod[later] = fmt_times(when[later], unit="D")
    return dod

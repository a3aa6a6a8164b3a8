"""MIMIC-IV ``omr``: weight, BMI, height and blood pressure from outpatient visits.

Most ECGs get a visit within ±25 days (inside the method's ±30-day window), and older or newer
visits further away carry a drifted weight; a few weights are implausible.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from model_training.synthetic.formats import fmt_times, num_text, strip_zero


def draw_omr(rng: np.random.Generator, subj: pd.DataFrame, ecg: pd.DataFrame) -> pd.DataFrame:
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
            ("Weight (Lbs)", everyone, strip_zero(num_text(w_lbs, 1))),
            ("BMI (kg/m2)", everyone, num_text(bmi, 1)),
            ("Height (Inches)", with_h, strip_zero(num_text(h_in, 1))),
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
    omr["chartdate"] = fmt_times(omr["date"].to_numpy().astype("datetime64[D]"), unit="D")
    return omr

"""MIMIC-IV-ED ``vitalsign``: rows that follow the hidden state within ±30 min of the ECG.

Heart rate follows the ECG rate, temperature and respiratory rate the inflammation driver; rows
further away are drifted, and a few rows are missing or implausible (°C temperatures, SBP > 500).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from model_training.synthetic.formats import fmt_times, minutes


def draw_vitalsign(rng: np.random.Generator, ecg: pd.DataFrame) -> pd.DataFrame:
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
    block(np.flatnonzero(near), t[near] + minutes(rng.uniform(-20, 20, near.sum())), True, 0.15)
    second = rng.random(n) < 0.5
    sign = np.where(rng.random(second.sum()) < 0.5, -1, 1)
    block(np.flatnonzero(second), t[second] + minutes(sign * rng.uniform(22, 29, second.sum())), True, 0.0)
    # regular observations through the stay, keeping clear of the ±30 min window
    intime, outtime = ed["intime"].to_numpy(), ed["outtime"].to_numpy()
    for k in range(8):
        when = intime + minutes(rng.uniform(0, 30, n) + k * rng.uniform(50, 140, n))
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
        block(rows, t[bad] + minutes(rng.uniform(5, 15, rows.size)), True, 0.0)

    vit = pd.concat(blocks, ignore_index=True)
    r = vit["ed_row"].to_numpy()
    k = len(vit)
    pain_values = np.array(["0", "2", "4", "5", "6", "7", "8", "10", "uta", ""])
    vit["subject_id"] = ed["subject_id"].to_numpy()[r]
    vit["stay_id"] = ed["stay_id"].to_numpy()[r]
    vit["rhythm"] = np.where(rng.random(k) < 0.08, "Sinus Rhythm", "")
    vit["pain"] = pain_values[rng.choice(pain_values.size, k)]
    vit = vit.sort_values(["subject_id", "stay_id", "when"], kind="stable").reset_index(drop=True)
    vit["charttime"] = fmt_times(vit["when"].to_numpy())
    return vit

"""``ground_truth.json``: the planted rules and each ECG's hidden state, written and read back.

Not part of MIMIC: evaluation reads it to report planted and noise targets apart and to compare
the model with the oracle (the noise-free rule scores).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model_training.synthetic.catalogue import PLANTED_RULES, paper_thresholds, planted_targets


def write_ground_truth(
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
            "thresholds": paper_thresholds(r.label),
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
    th = paper_thresholds(label)
    return {
        "low": round(float(np.mean(values < th["low"])), 4),
        "high": round(float(np.mean(values > th["high"])), 4),
    }


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

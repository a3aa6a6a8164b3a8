"""Performance by subgroup (sex, age band, …) with bootstrap CIs: the fairness figures of the model card.

ONC HTI-1 asks a predictive intervention's developer to state its *fairness in test data*
(45 CFR 170.315(b)(11)(iv)(B)(7)(ii)); the model card (:mod:`cds_service.model_card`) reads it from
``metrics.json["subgroups"]``, which ``ecglab evaluate`` fills by calling :func:`subgroup_metrics`
on the test fold with the sex and age-band labels of each ECG.

For every attribute (``sex``, ``age_band``) and every group of it, per target:

* AUROC with an empirical bootstrap CI (resampling the group's ECGs, the same estimator and CI
  convention as :func:`model_training.metrics.bootstrap_auroc`), the macro AUROC over targets;
* sensitivity, specificity and PPV at the deployed decision threshold (when thresholds are given),
  each with a bootstrap CI from the same kind of resamples;
* positive and negative counts, so a reader sees when a figure rests on a handful of cases.

Targets with fewer than ``min_class`` positives or negatives in a group get ``None`` instead of an
AUROC (a number from three positives is noise, not a fairness finding). ``gaps`` summarises each
attribute: per target, the largest difference in AUROC between its groups.

Plain numpy: the module imports nothing from torch, so it is cheap to call and to test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fhir_mappings.subgroups import AGE_BAND_EDGES, SEX_NAMES, age_band, sex_name
from model_training.metrics import bootstrap_auroc, empirical_ci

__all__ = ["AGE_BAND_EDGES", "SEX_NAMES", "age_band", "sex_name", "subgroup_metrics"]

SUBGROUPS_FORMAT = "ecglab-subgroups/1"


def subgroup_metrics(
    y_true: NDArray[np.floating],
    y_prob: NDArray[np.floating],
    groups: Mapping[str, Sequence[str | None]] | Sequence[str | None],
    *,
    targets: Sequence[str] | None = None,
    thresholds: Mapping[str, float] | Sequence[float] | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    min_class: int = 5,
) -> dict[str, Any]:
    """Per-group AUROC (and threshold metrics) with bootstrap CIs; see the module docstring.

    ``y_true`` is (N,) or (N, K) holding 1/0/NaN (NaN = lab not measured), ``y_prob`` the same
    shape. ``groups`` maps an attribute name to one label per sample (``None`` = unknown, left out),
    or is a single label sequence (attribute ``"group"``). ``targets`` names the K columns
    (default ``target_0`` …); ``thresholds`` gives each target's decision threshold by name or by
    column. Deterministic for a given ``seed``. Returns a JSON-ready dict.
    """
    y, p = _as_matrix(y_true), _as_matrix(y_prob)
    if y.shape != p.shape:
        raise ValueError(f"targets {y.shape} and probabilities {p.shape} differ in shape")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_boot < 0 or min_class < 1:
        raise ValueError("n_boot must be >= 0 and min_class >= 1")
    n, k = y.shape
    names = list(targets) if targets is not None else [f"target_{j}" for j in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} target names for {k} columns")
    cuts = _thresholds(thresholds, names)
    attributes = {"group": groups} if not isinstance(groups, Mapping) else groups
    out_attributes: dict[str, Any] = {}
    gaps: dict[str, Any] = {}
    for attribute, labels in attributes.items():
        column = list(labels)
        if len(column) != n:
            raise ValueError(f"groups[{attribute!r}] has {len(column)} labels for {n} samples")
        present = sorted({g for g in column if g is not None}, key=_group_order)
        per_group: dict[str, Any] = {}
        for offset, group in enumerate(present):
            rows = np.flatnonzero(np.array([g == group for g in column], dtype=bool))
            per_group[group] = _group_entry(
                y[rows], p[rows], names, cuts, n_boot, confidence, seed + 7919 * offset, min_class
            )
        out_attributes[attribute] = per_group
        gaps[attribute] = _gaps(per_group, names)
    return {
        "format": SUBGROUPS_FORMAT,
        "n_records": n,
        "bootstrap": n_boot,
        "confidence": confidence,
        "seed": seed,
        "min_class": min_class,
        "age_band_edges": list(AGE_BAND_EDGES),
        "attributes": out_attributes,
        "gaps": gaps,
    }


def _as_matrix(values: NDArray[np.floating]) -> NDArray[np.float64]:
    """(N,) or (N, K) input as a float64 (N, K) matrix."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        return array[:, None]
    if array.ndim != 2:
        raise ValueError(f"expected (N,) or (N, K) arrays, got shape {array.shape}")
    return array


def _thresholds(
    thresholds: Mapping[str, float] | Sequence[float] | None, names: Sequence[str]
) -> list[float | None]:
    """Each column's decision threshold, or ``None`` when not given."""
    if thresholds is None:
        return [None] * len(names)
    if isinstance(thresholds, Mapping):
        return [float(thresholds[t]) if t in thresholds else None for t in names]
    values = [float(t) for t in thresholds]
    if len(values) != len(names):
        raise ValueError(f"{len(values)} thresholds for {len(names)} targets")
    return list(values)


def _group_order(label: str) -> tuple[int, str]:
    """Age bands in age order, everything else alphabetically."""
    digits = label.lstrip("<").split("-")[0].rstrip("+")
    if digits.isdigit():
        return (int(digits) - (1 if label.startswith("<") else 0), label)
    return (10_000, label)


def _num(value: float) -> float | None:
    """A finite float, or ``None`` for NaN/inf (JSON has no NaN)."""
    return float(value) if math.isfinite(value) else None


def _group_entry(
    y: NDArray[np.float64],
    p: NDArray[np.float64],
    names: Sequence[str],
    cuts: Sequence[float | None],
    n_boot: int,
    confidence: float,
    seed: int,
    min_class: int,
) -> dict[str, Any]:
    """Every target's figures for one group's rows."""
    result = bootstrap_auroc(y, p, n_boot=n_boot, seed=seed)
    lows, highs = result.target_ci(confidence)
    n_pos = np.nansum(y == 1.0, axis=0).astype(int)
    n_neg = np.nansum(y == 0.0, axis=0).astype(int)
    enough = (n_pos >= min_class) & (n_neg >= min_class)
    counts = _resample_counts(np.random.default_rng(seed + 1), len(y), n_boot)
    per_target: dict[str, Any] = {}
    for j, name in enumerate(names):
        entry: dict[str, Any] = {
            "n_pos": int(n_pos[j]),
            "n_neg": int(n_neg[j]),
            "auroc": _num(result.point[j]) if enough[j] else None,
            "ci_low": _num(lows[j]) if enough[j] else None,
            "ci_high": _num(highs[j]) if enough[j] else None,
        }
        cut = cuts[j]
        if cut is not None:
            entry["decision_threshold"] = cut
            entry.update(_threshold_metrics(y[:, j], p[:, j], cut, counts, confidence))
        per_target[name] = entry
    usable = np.flatnonzero(enough)
    macro = result.macro(usable, confidence) if usable.size else (math.nan, math.nan, math.nan)
    return {
        "n": len(y),
        "n_targets_evaluable": int(usable.size),
        "macro_auroc": _num(macro[0]),
        "ci_low": _num(macro[1]),
        "ci_high": _num(macro[2]),
        "targets": per_target,
    }


def _resample_counts(rng: np.random.Generator, n_rows: int, n_boot: int) -> NDArray[np.float64]:
    """Multiplicities (n_rows, n_boot) of ``n_boot`` resamples with replacement."""
    if n_rows == 0 or n_boot == 0:
        return np.zeros((n_rows, n_boot))
    draws = rng.integers(0, n_rows, size=(n_boot, n_rows))
    counts = np.zeros((n_rows, n_boot))
    for b in range(n_boot):
        counts[:, b] = np.bincount(draws[b], minlength=n_rows)
    return counts


def _threshold_metrics(
    y: NDArray[np.float64], p: NDArray[np.float64], cut: float, counts: NDArray[np.float64], confidence: float
) -> dict[str, float | None]:
    """Sensitivity, specificity and PPV of ``p >= cut`` with bootstrap CIs (resample weights ``counts``)."""
    valid = ~np.isnan(y)
    pos = (y == 1.0) & valid
    neg = (y == 0.0) & valid
    flagged = p >= cut
    weights = np.concatenate([np.ones((len(y), 1)), counts], axis=1)
    tp = (pos & flagged).astype(float) @ weights
    fn = (pos & ~flagged).astype(float) @ weights
    tn = (neg & ~flagged).astype(float) @ weights
    fp = (neg & flagged).astype(float) @ weights
    out: dict[str, float | None] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
        }
    for name, values in ratios.items():
        point = float(values[0])
        low, high = empirical_ci(point, values[1:], confidence) if values.size > 1 else (math.nan, math.nan)
        out[name] = _num(point)
        out[f"{name}_ci_low"] = _num(low)
        out[f"{name}_ci_high"] = _num(high)
    return out


def _gaps(per_group: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Per target: the largest AUROC difference between groups that have an AUROC, and which groups."""
    out: dict[str, Any] = {}
    for name in names:
        scored = {g: e["targets"][name]["auroc"] for g, e in per_group.items()}
        scored = {g: v for g, v in scored.items() if v is not None}
        if len(scored) < 2:
            out[name] = None
            continue
        best = max(scored, key=lambda g: scored[g])
        worst = min(scored, key=lambda g: scored[g])
        out[name] = {"auroc_gap": scored[best] - scored[worst], "highest": best, "lowest": worst}
    return out

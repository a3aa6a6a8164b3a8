"""Fitting one calibration map per target on the validation fold: temperature, Platt or isotonic.

The focal-loss network ranks well but its outputs are not probabilities (issue 15 measured a median
per-target ECE of 0.18 on the bundled model's test fold). ``ecglab evaluate`` calls
:func:`fit_calibrations` on the **validation fold's** raw, window-averaged probabilities; the maps
are stored in ``metrics.json``, written into the manifest by ``ecglab export`` and applied by
:mod:`fhir_mappings.calibration` wherever the model is run. The test fold is never touched.

Candidates (all non-decreasing, so the ranking is kept):

* ``identity``: no change (kept when nothing beats the raw outputs);
* ``temperature``: ``sigmoid(logit(p) / T)``, one parameter;
* ``platt``: ``sigmoid(a·logit(p) + b)``, two parameters with ``a ≥ 0``; fitted, as Platt
  proposed, against the smoothed targets ``(n₊ + 1)/(n₊ + 2)`` and ``1/(n₋ + 2)`` so that a
  small fold cannot push it to 0 or 1;
* ``isotonic``: pool-adjacent-violators on the sorted probabilities, stored as breakpoints and
  interpolated linearly between them; its values are kept inside ``[1/(n+2), (n+1)/(n+2)]`` so it
  never states certainty.

**Choice.** Fitting and scoring on the same fold would always favour the most flexible map
(isotonic is the maximum-likelihood monotone map), so each candidate is scored by its
**cross-validated** log-loss: stratified ``CV_FOLDS``-fold, fitted on four fifths of the validation
fold and scored on the fifth, summed over the folds. The lowest wins (ties: the simpler map); the
winner is then refitted on the whole validation fold. **Small folds:** isotonic has one free value
per block and overfits a few dozen cases, so it is only a candidate when the fold holds at least
``isotonic_min_class`` (default 30) positives *and* negatives; below that the choice is among
identity, temperature and Platt. A target with one class in the fold keeps ``identity``; one with
too few cases of a class for cross-validation (fewer than 2) gets temperature scaling, the
one-parameter map.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize

from fhir_mappings.calibration import Calibration, logit, sigmoid

CV_FOLDS = 5
ISOTONIC_MIN_CLASS = 30
CANDIDATES: tuple[str, ...] = ("identity", "temperature", "platt", "isotonic")
"""Candidate maps, simplest first (the order that breaks ties)."""
_LOSS_EPS = 1e-6
_SLOPE_BOUNDS = (1e-3, 1e3)

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class CalibrationFit:
    """The map chosen for one target, the cross-validated log-loss of each candidate and why."""

    calibration: Calibration
    cv_log_loss: dict[str, float | None]
    reason: str

    def to_json(self) -> dict[str, object]:
        """A JSON-able record for ``metrics.json``."""
        return {
            "method": self.calibration.method,
            "calibration": self.calibration.model_dump(mode="json"),
            "cv_log_loss": self.cv_log_loss,
            "reason": self.reason,
        }


def log_loss(y: FloatArray, q: FloatArray) -> float:
    """Mean binary cross-entropy of probabilities ``q`` (clipped to [1e-6, 1 − 1e-6]) for 0/1 ``y``."""
    q = np.clip(q, _LOSS_EPS, 1.0 - _LOSS_EPS)
    return float(-np.mean(y * np.log(q) + (1.0 - y) * np.log1p(-q)))


def _logistic_fit(y: FloatArray, p: FloatArray, *, with_intercept: bool) -> tuple[float, float]:
    """(a, b) minimising the cross-entropy of ``sigmoid(a·logit(p) + b)`` against Platt's smoothed targets."""
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    target = np.where(y > 0.5, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    z = logit(p)

    def loss(theta: FloatArray) -> tuple[float, FloatArray]:
        a = theta[0]
        b = theta[1] if with_intercept else 0.0
        s = a * z + b
        value = float(np.sum(target * np.logaddexp(0.0, -s) + (1.0 - target) * np.logaddexp(0.0, s)))
        residual = sigmoid(s) - target
        grad = [float(np.sum(residual * z))] + ([float(np.sum(residual))] if with_intercept else [])
        return value, np.asarray(grad)

    start = np.array([1.0, 0.0] if with_intercept else [1.0])
    bounds = [_SLOPE_BOUNDS, (None, None)] if with_intercept else [_SLOPE_BOUNDS]
    result = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    theta = result.x
    return float(theta[0]), float(theta[1]) if with_intercept else 0.0


def fit_temperature(y: FloatArray, p: FloatArray) -> Calibration:
    """Temperature scaling: the one slope ``1/T`` on the logit, no intercept."""
    a, _ = _logistic_fit(y, p, with_intercept=False)
    return Calibration(method="temperature", params={"temperature": 1.0 / a})


def fit_platt(y: FloatArray, p: FloatArray) -> Calibration:
    """Platt scaling: slope ``a`` (≥ 0) and intercept ``b`` on the logit."""
    a, b = _logistic_fit(y, p, with_intercept=True)
    return Calibration(method="platt", params={"a": max(a, 0.0), "b": b})


def fit_isotonic(y: FloatArray, p: FloatArray) -> Calibration:
    """Pool-adjacent-violators fit, stored as breakpoints (first and last raw value of every block)."""
    order = np.argsort(p, kind="mergesort")
    xs, ys = p[order], y[order]
    unique, start = np.unique(xs, return_index=True)
    counts = np.diff(np.r_[start, len(xs)]).astype(np.float64)
    sums = np.add.reduceat(ys, start)
    # blocks: [value sum, weight, first unique index, last unique index]
    blocks: list[list[float]] = []
    for i in range(len(unique)):
        blocks.append([sums[i], counts[i], float(i), float(i)])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            merged = blocks.pop()
            blocks[-1][0] += merged[0]
            blocks[-1][1] += merged[1]
            blocks[-1][3] = merged[3]
    n = len(y)
    low, high = 1.0 / (n + 2.0), (n + 1.0) / (n + 2.0)
    x_points: list[float] = []
    y_points: list[float] = []
    for total, weight, first, last in blocks:
        value = float(np.clip(total / weight, low, high))
        for index in sorted({int(first), int(last)}):
            x_points.append(float(unique[index]))
            y_points.append(value)
    return Calibration(method="isotonic", params={"x": x_points, "y": y_points})


def _fit(method: str, y: FloatArray, p: FloatArray) -> Calibration:
    """Fit one candidate map."""
    if method == "identity":
        return Calibration(method="identity")
    if method == "temperature":
        return fit_temperature(y, p)
    if method == "platt":
        return fit_platt(y, p)
    if method == "isotonic":
        return fit_isotonic(y, p)
    raise ValueError(f"unknown calibration method {method!r}")


def cv_log_loss(method: str, y: FloatArray, p: FloatArray, folds: int, seed: int) -> float:
    """Stratified ``folds``-fold cross-validated log-loss of ``method`` (every case scored once)."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(y), dtype=np.int64)
    for cls in (0.0, 1.0):
        rows = np.flatnonzero(y == cls)
        assignment[rng.permutation(rows)] = np.arange(len(rows)) % folds
    predicted = np.empty(len(y), dtype=np.float64)
    for fold in range(folds):
        held = assignment == fold
        calibration = _fit(method, y[~held], p[~held])
        predicted[held] = calibration.apply(p[held])
    return log_loss(y, predicted)


def fit_calibration(
    y_true: NDArray[np.floating],
    y_prob: NDArray[np.floating],
    *,
    method: str = "auto",
    isotonic_min_class: int = ISOTONIC_MIN_CLASS,
    folds: int = CV_FOLDS,
    seed: int = 0,
) -> CalibrationFit:
    """Choose and fit one target's calibration on its non-NaN entries (see the module docstring).

    ``method`` other than ``auto`` fits that map directly (no choice). Deterministic for a seed.
    """
    y_all = np.asarray(y_true, dtype=np.float64)
    valid = ~np.isnan(y_all)
    y = (y_all[valid] > 0.5).astype(np.float64)
    p = np.asarray(y_prob, dtype=np.float64)[valid]
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    counts: dict[str, Any] = {"fold": "val", "n_pos": n_pos, "n_neg": n_neg}
    scores: dict[str, float | None] = dict.fromkeys(CANDIDATES)
    if n_pos == 0 or n_neg == 0:
        identity = Calibration(method="identity", fold="val", n_pos=n_pos, n_neg=n_neg)
        return CalibrationFit(identity, scores, "one class in the val fold")
    if method != "auto":
        fitted = _fit(method, y, p)
        return CalibrationFit(fitted.model_copy(update=counts), scores, f"fixed by config ({method})")
    k = min(folds, n_pos, n_neg)
    if k < 2:
        fitted = fit_temperature(y, p)
        return CalibrationFit(fitted.model_copy(update=counts), scores, "too few cases to cross-validate")
    allowed = [m for m in CANDIDATES if m != "isotonic" or min(n_pos, n_neg) >= isotonic_min_class]
    for candidate in allowed:
        scores[candidate] = cv_log_loss(candidate, y, p, k, seed)
    chosen = min(allowed, key=lambda m: (scores[m], CANDIDATES.index(m)))
    reason = f"lowest {k}-fold cross-validated log-loss"
    if "isotonic" not in allowed:
        reason += f" (isotonic not tried: fewer than {isotonic_min_class} positives or negatives)"
    fitted = _fit(chosen, y, p)
    return CalibrationFit(fitted.model_copy(update=counts), scores, reason)


def fit_calibrations(
    y_true: NDArray[np.floating],
    y_prob: NDArray[np.floating],
    targets: Sequence[str],
    *,
    method: str = "auto",
    isotonic_min_class: int = ISOTONIC_MIN_CLASS,
    seed: int = 0,
) -> dict[str, CalibrationFit]:
    """:func:`fit_calibration` for every column of (N, K) labels and raw probabilities."""
    y, p = np.asarray(y_true), np.asarray(y_prob)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(targets):
        raise ValueError(f"labels {y.shape}, probabilities {p.shape} and {len(targets)} targets disagree")
    return {
        target: fit_calibration(
            y[:, j], p[:, j], method=method, isotonic_min_class=isotonic_min_class, seed=seed + j
        )
        for j, target in enumerate(targets)
    }


def summarise_calibration(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median and mean ECE and mean Brier score before (``*_raw``) and after calibration over targets.

    ``entries`` are per-target dicts holding ``ece``, ``ece_raw``, ``brier`` and ``brier_raw``
    (``None`` where a target has no labelled case); the ``methods`` count says which maps were used.
    """

    def values(key: str) -> list[float]:
        return [float(e[key]) for e in entries if e.get(key) is not None]

    def stat(key: str, how: Callable[[list[float]], float]) -> float | None:
        found = values(key)
        return float(how(found)) if found else None

    methods: dict[str, int] = {}
    for entry in entries:
        method = str(entry.get("calibration", "identity"))
        methods[method] = methods.get(method, 0) + 1
    return {
        "n_targets": len(entries),
        "ece_median_before": stat("ece_raw", np.median),
        "ece_median_after": stat("ece", np.median),
        "ece_mean_before": stat("ece_raw", np.mean),
        "ece_mean_after": stat("ece", np.mean),
        "brier_mean_before": stat("brier_raw", np.mean),
        "brier_mean_after": stat("brier", np.mean),
        "methods": dict(sorted(methods.items())),
    }

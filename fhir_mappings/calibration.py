"""Per-target probability calibration: the manifest's schema, its arithmetic, fitting and composition.

The network is trained with a focal loss, whose sigmoid outputs rank patients well but are not
probabilities (they are pulled towards 0.5 and ignore each target's prevalence). ``ecglab
evaluate`` therefore fits one monotone map per target on the **validation fold**
(:func:`fit_calibration`, called through :mod:`model_training.calibration`), ``ecglab export``
writes it into the manifest's label entry, and every consumer of the model applies it after the
window average: the service's runtime (cards, ``ecglab score``) and the evaluation itself. ``ecglab
recalibrate`` refits it on a site's own outcomes (fold ``local``) with the same code. This module
is that shared contract: the schema (:class:`Calibration`), the arithmetic
(:meth:`Calibration.apply`, :class:`Calibrator`), the fitting and the composition of two maps
(:func:`compose`, :func:`preimage`). It needs only numpy and pydantic, so the service can use it
without torch, scipy or scikit-learn.

Methods (``z = logit(p)``, with ``p`` clipped to [1e-7, 1 − 1e-7] so 0 and 1 stay finite):

* ``identity``: ``p`` unchanged (a target the fit could not calibrate, e.g. one class only);
* ``temperature``: ``sigmoid(z / T)``, params ``{"temperature": T}`` with T > 0;
* ``platt``: ``sigmoid(a·z + b)``, params ``{"a": a, "b": b}`` with a ≥ 0, so the map never
  reverses the ranking (a = 0 is "every patient gets the prevalence");
* ``isotonic``: the piecewise-linear interpolation through the breakpoints ``params["x"]`` (raw
  probabilities, non-decreasing) → ``params["y"]`` (calibrated, non-decreasing, in [0, 1]);
  inputs outside [x₀, x_last] take the end values.

All three are non-decreasing in ``p``, so the ranking (and hence the AUROC, up to isotonic ties) is
kept and a decision threshold chosen on calibrated probabilities is a threshold on the raw ones too.

**Fitting** (:func:`fit_calibration`), on one target's 0/1 outcomes and probabilities:

* ``temperature`` and ``platt`` minimise the cross-entropy, as Platt proposed, against the
  smoothed targets ``(n₊ + 1)/(n₊ + 2)`` and ``1/(n₋ + 2)`` so that a small fold cannot push the
  map to 0 or 1; the slope is kept in [1e-3, 1e3]. The problem is convex in (slope, intercept) and
  is solved by Newton's method with a backtracking line search (a bound slope is held fixed while
  the intercept is solved);
* ``isotonic`` is pool-adjacent-violators on the sorted probabilities, stored as the first and last
  probability of every block, its values kept inside ``[1/(n+2), (n+1)/(n+2)]`` so it never states
  certainty.

**Choice.** Fitting and scoring on the same cases would always favour the most flexible map
(isotonic is the maximum-likelihood monotone map), so each candidate is scored by its
**cross-validated** log-loss: stratified ``CV_FOLDS``-fold, fitted on four fifths and scored on the
fifth, summed over the folds. The lowest wins (ties: the simpler map, in :data:`CANDIDATES` order);
the winner is then refitted on all the cases. **Small samples:** isotonic has one free value per
block and overfits a few dozen cases, so it is only a candidate with at least
``isotonic_min_class`` (default 30) positives *and* negatives. A target with one class keeps
``identity``; one with too few cases of a class for cross-validation (fewer than 2) gets
temperature scaling, the one-parameter map.

**Composition.** A site's monitor run sees the probabilities the service served, i.e. already
calibrated by the parent model's map ``f``; a local map ``g`` is fitted on those, and the new
manifest stores the single map ``g∘f`` over raw network outputs (:func:`compose`). It is exact when
both maps are logistic (a logistic map again, up to the logit's clipping) or both isotonic
(piecewise linear, with a breakpoint wherever either bends). When one is isotonic and the other
logistic the result is isotonic, exact at its breakpoints (the isotonic map's, pulled back through
a logistic ``f`` where needed) and on every flat block, with breakpoints added by bisection until
linear interpolation is within :data:`COMPOSE_TOLERANCE` of the composition. :func:`preimage` gives
a raw probability that ``f`` maps to a served one, so the composed map's output for an audited
prediction is computed as the service would compute it, without the raw value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, model_validator

LOGIT_EPS = 1e-7
"""Probabilities are clipped to [LOGIT_EPS, 1 − LOGIT_EPS] before the logit."""

CalibrationMethod = Literal["identity", "temperature", "platt", "isotonic"]


def logit(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``log(p / (1 − p))`` of ``p`` clipped to [LOGIT_EPS, 1 − LOGIT_EPS], as float64."""
    q = np.clip(np.asarray(p, dtype=np.float64), LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(q) - np.log1p(-q)


def sigmoid(z: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The logistic function, computed without overflow for large ``|z|``."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out


class Calibration(BaseModel):
    """One target's calibration map: method, parameters and the fold (and counts) it was fitted on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: CalibrationMethod
    params: dict[str, float | list[float]] = {}
    fold: str = "val"
    n_pos: int | None = None
    n_neg: int | None = None

    @model_validator(mode="after")
    def _params_fit_method(self) -> Calibration:
        expected = {
            "identity": set(),
            "temperature": {"temperature"},
            "platt": {"a", "b"},
            "isotonic": {"x", "y"},
        }[self.method]
        if set(self.params) != expected:
            raise ValueError(
                f"{self.method} calibration needs params {sorted(expected)}, got {sorted(self.params)}"
            )
        if self.method == "isotonic":
            self._check_breakpoints()
            return self
        for key in expected:
            value = self.params[key]
            if isinstance(value, list) or not math.isfinite(float(value)):
                raise ValueError(f"{self.method} calibration param {key!r} must be a finite number")
        if self.method == "temperature" and not self.number("temperature") > 0.0:
            raise ValueError("temperature must be > 0")
        if self.method == "platt" and self.number("a") < 0.0:
            raise ValueError("platt slope 'a' must be >= 0 (a calibration never reverses the ranking)")
        return self

    def number(self, key: str) -> float:
        """A scalar parameter (``temperature``, ``a``, ``b``) as a float."""
        value = self.params[key]
        if isinstance(value, list):
            raise TypeError(f"calibration param {key!r} is a list, not a number")
        return float(value)

    def breakpoints(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The isotonic breakpoints ``(x, y)`` as float64 arrays."""
        return np.asarray(self.params["x"], dtype=np.float64), np.asarray(self.params["y"], dtype=np.float64)

    def _check_breakpoints(self) -> None:
        x, y = self.params["x"], self.params["y"]
        if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y) or not x:
            raise ValueError("isotonic calibration needs equally long, non-empty lists 'x' and 'y'")
        xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
            raise ValueError("isotonic breakpoints must be finite")
        if (np.diff(xs) < 0).any() or (np.diff(ys) < 0).any():
            raise ValueError("isotonic breakpoints 'x' and 'y' must be non-decreasing")
        if xs.min() < 0 or xs.max() > 1 or ys.min() < 0 or ys.max() > 1:
            raise ValueError("isotonic breakpoints must lie in [0, 1]")

    def apply(self, p: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Calibrated probabilities of raw probabilities ``p`` (any shape), as float64."""
        raw = np.asarray(p, dtype=np.float64)
        if self.method == "identity":
            return raw.copy()
        if self.method == "isotonic":
            return np.interp(raw, *self.breakpoints())
        a, b = _slope_intercept(self)
        return sigmoid(a * logit(raw) + b)


def _slope_intercept(calibration: Calibration) -> tuple[float, float]:
    """(a, b) of a logistic calibration: ``temperature`` is a = 1/T, b = 0."""
    if calibration.method == "temperature":
        return 1.0 / calibration.number("temperature"), 0.0
    return calibration.number("a"), calibration.number("b")


class Calibrator:
    """Apply one :class:`Calibration` per column of (N, K) probabilities, vectorised.

    Built once per model (the runtime keeps one), it stacks the logistic maps into slope and
    intercept vectors so a prediction costs one numpy expression for them plus one interpolation
    per isotonic column. A column without calibration (``None`` or ``identity``) passes through
    bit for bit, so a manifest written before calibration existed serves exactly what it did.
    """

    def __init__(self, calibrations: Sequence[Calibration | None]) -> None:
        self.n_columns = len(calibrations)
        logistic = [
            (j, _slope_intercept(c))
            for j, c in enumerate(calibrations)
            if c is not None and c.method in ("temperature", "platt")
        ]
        self._logistic = np.asarray([j for j, _ in logistic], dtype=np.int64)
        self._a = np.asarray([a for _, (a, _) in logistic], dtype=np.float64)
        self._b = np.asarray([b for _, (_, b) in logistic], dtype=np.float64)
        self._isotonic = [
            (j, *c.breakpoints())
            for j, c in enumerate(calibrations)
            if c is not None and c.method == "isotonic"
        ]

    @property
    def is_identity(self) -> bool:
        """True when no column is changed."""
        return self._logistic.size == 0 and not self._isotonic

    def __call__(self, probs: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Calibrated copy of ``probs`` (shape (K,) or (N, K)) as float64."""
        p = np.asarray(probs, dtype=np.float64)
        if p.shape[-1] != self.n_columns:
            raise ValueError(f"{p.shape[-1]} probability columns for {self.n_columns} calibrations")
        out = p.copy()
        if self._logistic.size:
            out[..., self._logistic] = sigmoid(self._a * logit(p[..., self._logistic]) + self._b)
        for j, x, y in self._isotonic:
            out[..., j] = np.interp(p[..., j], x, y)
        return out


# -- fitting ------------------------------------------------------------------------------------------

CV_FOLDS = 5
ISOTONIC_MIN_CLASS = 30
CANDIDATES: tuple[str, ...] = ("identity", "temperature", "platt", "isotonic")
"""Candidate maps, simplest first (the order that breaks ties)."""
_LOSS_EPS = 1e-6
_SLOPE_BOUNDS = (1e-3, 1e3)
_NEWTON_STEPS = 100
COMPOSE_TOLERANCE = 1e-4
"""Largest gap (probability units, at interval midpoints) :func:`compose` leaves between its isotonic
result and the exact composition of an isotonic and a logistic map."""
_REFINE_DEPTH = 16
_LINE_SEARCH_HALVINGS = 60

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CalibrationFit:
    """The map chosen for one target, the cross-validated log-loss of each candidate and why."""

    calibration: Calibration
    cv_log_loss: dict[str, float | None]
    reason: str

    def to_json(self) -> dict[str, object]:
        """A JSON-able record (``metrics.json``, the recalibration provenance)."""
        return {
            "method": self.calibration.method,
            "calibration": self.calibration.model_dump(mode="json"),
            "cv_log_loss": self.cv_log_loss,
            "reason": self.reason,
        }


def log_loss(y: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Mean binary cross-entropy of probabilities ``q`` (clipped to [1e-6, 1 − 1e-6]) for 0/1 ``y``."""
    yy = np.asarray(y, dtype=np.float64)
    qq = np.clip(np.asarray(q, dtype=np.float64), _LOSS_EPS, 1.0 - _LOSS_EPS)
    return float(-np.mean(yy * np.log(qq) + (1.0 - yy) * np.log1p(-qq)))


def _logistic_fit(y: FloatArray, p: FloatArray, *, with_intercept: bool) -> tuple[float, float]:
    """(a, b) minimising the cross-entropy of ``sigmoid(a·logit(p) + b)`` against Platt's smoothed targets.

    Newton's method on the convex loss; the slope ``a`` is kept in :data:`_SLOPE_BOUNDS` by
    projection, and held fixed (only ``b`` moves) while it sits on a bound its gradient pushes against.
    """
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    target = np.where(y > 0.5, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    z = logit(p)
    design = np.column_stack([z, np.ones_like(z)]) if with_intercept else z[:, None]
    low, high = _SLOPE_BOUNDS

    def loss(theta: FloatArray) -> float:
        s = design @ theta
        return float(np.sum(target * np.logaddexp(0.0, -s) + (1.0 - target) * np.logaddexp(0.0, s)))

    theta = np.array([1.0, 0.0] if with_intercept else [1.0])
    current = loss(theta)
    for _ in range(_NEWTON_STEPS):
        q = sigmoid(design @ theta)
        grad = design.T @ (q - target)
        hessian = (design * (q * (1.0 - q))[:, None]).T @ design
        free = np.ones(len(theta), dtype=bool)
        free[0] = not ((theta[0] <= low and grad[0] > 0) or (theta[0] >= high and grad[0] < 0))
        if not free.any():
            break
        step = np.zeros_like(theta)
        step[free] = -np.linalg.lstsq(hessian[np.ix_(free, free)], grad[free], rcond=None)[0]
        size, accepted = 1.0, False
        for _ in range(_LINE_SEARCH_HALVINGS):
            candidate = theta + size * step
            candidate[0] = min(max(candidate[0], low), high)
            value = loss(candidate)
            if value <= current:
                accepted = True
                break
            size /= 2.0
        if not accepted:
            break
        gain = current - value
        theta, current = candidate, value
        if gain <= 1e-12 * max(1.0, current):
            break
    return float(theta[0]), float(theta[1]) if with_intercept else 0.0


def fit_temperature(y: npt.ArrayLike, p: npt.ArrayLike) -> Calibration:
    """Temperature scaling: the one slope ``1/T`` on the logit, no intercept."""
    a, _ = _logistic_fit(_as_float(y), _as_float(p), with_intercept=False)
    return Calibration(method="temperature", params={"temperature": 1.0 / a})


def fit_platt(y: npt.ArrayLike, p: npt.ArrayLike) -> Calibration:
    """Platt scaling: slope ``a`` (≥ 0) and intercept ``b`` on the logit."""
    a, b = _logistic_fit(_as_float(y), _as_float(p), with_intercept=True)
    return Calibration(method="platt", params={"a": max(a, 0.0), "b": b})


def fit_isotonic(y: npt.ArrayLike, p: npt.ArrayLike) -> Calibration:
    """Pool-adjacent-violators fit, stored as breakpoints (first and last raw value of every block)."""
    yy, pp = _as_float(y), _as_float(p)
    order = np.argsort(pp, kind="mergesort")
    xs, ys = pp[order], yy[order]
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
    n = len(yy)
    low, high = 1.0 / (n + 2.0), (n + 1.0) / (n + 2.0)
    x_points: list[float] = []
    y_points: list[float] = []
    for total, weight, first, last in blocks:
        value = float(np.clip(total / weight, low, high))
        for index in sorted({int(first), int(last)}):
            x_points.append(float(unique[index]))
            y_points.append(value)
    return Calibration(method="isotonic", params={"x": x_points, "y": y_points})


def fit_map(method: str, y: npt.ArrayLike, p: npt.ArrayLike) -> Calibration:
    """Fit one named candidate map (:data:`CANDIDATES`)."""
    if method == "identity":
        return Calibration(method="identity")
    if method == "temperature":
        return fit_temperature(y, p)
    if method == "platt":
        return fit_platt(y, p)
    if method == "isotonic":
        return fit_isotonic(y, p)
    raise ValueError(f"unknown calibration method {method!r}")


def cv_log_loss(method: str, y: npt.ArrayLike, p: npt.ArrayLike, folds: int, seed: int) -> float:
    """Stratified ``folds``-fold cross-validated log-loss of ``method`` (every case scored once)."""
    yy, pp = _as_float(y), _as_float(p)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(yy), dtype=np.int64)
    for cls in (0.0, 1.0):
        rows = np.flatnonzero(yy == cls)
        assignment[rng.permutation(rows)] = np.arange(len(rows)) % folds
    predicted = np.empty(len(yy), dtype=np.float64)
    for fold in range(folds):
        held = assignment == fold
        predicted[held] = fit_map(method, yy[~held], pp[~held]).apply(pp[held])
    return log_loss(yy, predicted)


def fit_calibration(
    y_true: npt.ArrayLike,
    y_prob: npt.ArrayLike,
    *,
    method: str = "auto",
    isotonic_min_class: int = ISOTONIC_MIN_CLASS,
    folds: int = CV_FOLDS,
    seed: int = 0,
    fold: str = "val",
) -> CalibrationFit:
    """Choose and fit one target's calibration on its non-NaN entries (see the module docstring).

    ``method`` other than ``auto`` fits that map directly (no choice); ``fold`` names the data the
    fit saw (``val`` in training, ``local`` for a site) and is recorded in the map with the class
    counts. Deterministic for a seed.
    """
    y_all = np.asarray(y_true, dtype=np.float64)
    valid = ~np.isnan(y_all)
    y = (y_all[valid] > 0.5).astype(np.float64)
    p = np.asarray(y_prob, dtype=np.float64)[valid]
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    counts: dict[str, Any] = {"fold": fold, "n_pos": n_pos, "n_neg": n_neg}
    scores: dict[str, float | None] = dict.fromkeys(CANDIDATES)
    if n_pos == 0 or n_neg == 0:
        identity = Calibration(method="identity", **counts)
        return CalibrationFit(identity, scores, f"one class in the {fold} fold")
    if method != "auto":
        fitted = fit_map(method, y, p)
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
    fitted = fit_map(chosen, y, p)
    return CalibrationFit(fitted.model_copy(update=counts), scores, reason)


def _as_float(values: npt.ArrayLike) -> FloatArray:
    return np.asarray(values, dtype=np.float64)


# -- composition --------------------------------------------------------------------------------------


def compose(outer: Calibration, inner: Calibration | None) -> Calibration:
    """One map over raw probabilities equal to ``outer(inner(p))`` (see the module docstring).

    The result carries ``outer``'s ``fold`` and class counts: it is the map the outer fit produced,
    expressed on the network's raw output.
    """

    def made(method: CalibrationMethod, params: dict[str, float | list[float]]) -> Calibration:
        return Calibration(
            method=method, params=params, fold=outer.fold, n_pos=outer.n_pos, n_neg=outer.n_neg
        )

    if inner is None or inner.method == "identity":
        return outer
    if outer.method == "identity":
        return made(inner.method, dict(inner.params))
    if inner.method != "isotonic":
        a1, b1 = _slope_intercept(inner)
        if outer.method != "isotonic":
            a2, b2 = _slope_intercept(outer)
            if inner.method == outer.method == "temperature":
                t = inner.number("temperature") * outer.number("temperature")
                return made("temperature", {"temperature": t})
            return made("platt", {"a": a2 * a1, "b": a2 * b1 + b2})
        if a1 == 0.0:  # inner is a constant: so is the composition
            return made("isotonic", {"x": [0.5], "y": [float(outer.apply(sigmoid(b1)))]})
        xg, _ = outer.breakpoints()  # pulled back through the inner map
        points = [sigmoid((logit(xg) - b1) / a1)]
    else:
        xf, yf = inner.breakpoints()
        points = [xf]
        if outer.method == "isotonic":  # the raw values where the inner map reaches an outer breakpoint
            xg, _ = outer.breakpoints()
            for i in range(len(xf) - 1):
                lo, hi = yf[i], yf[i + 1]
                if hi > lo:
                    inside = xg[(xg > lo) & (xg < hi)]
                    points.append(xf[i] + (inside - lo) * (xf[i + 1] - xf[i]) / (hi - lo))

    def composed(p: FloatArray) -> FloatArray:
        return outer.apply(inner.apply(p))

    x_new = np.unique(np.clip(np.concatenate(points), 0.0, 1.0))
    if (outer.method == "isotonic") != (inner.method == "isotonic"):  # curved between breakpoints
        x_new = _refine(composed, x_new)
    y_new = np.clip(np.maximum.accumulate(composed(x_new)), 0.0, 1.0)
    return made("isotonic", {"x": x_new.tolist(), "y": y_new.tolist()})


def _refine(fn: Callable[[FloatArray], FloatArray], x: FloatArray) -> FloatArray:
    """Breakpoints ``x`` plus midpoints, by bisection, wherever linear interpolation of the
    monotone ``fn`` misses it by more than :data:`COMPOSE_TOLERANCE` at an interval's midpoint."""
    for _ in range(_REFINE_DEPTH):
        y = fn(x)
        mids = (x[:-1] + x[1:]) / 2.0
        miss = np.abs(fn(mids) - (y[:-1] + y[1:]) / 2.0)
        split = (y[1:] != y[:-1]) & (miss > COMPOSE_TOLERANCE)
        if not split.any():
            break
        x = np.unique(np.r_[x, mids[split]])
    return x


def preimage(calibration: Calibration | None, q: npt.ArrayLike) -> FloatArray:
    """A raw probability that ``calibration`` maps to each ``q`` (``q`` outside its range: the nearest end).

    Where the map is flat (an isotonic block, a Platt slope of 0) any raw value of the flat part
    does; the first is returned. ``calibration.apply(preimage(calibration, q)) == q`` for ``q`` in
    the map's range, up to rounding (and the logit's clipping at 1e-7).
    """
    served = np.asarray(q, dtype=np.float64)
    if calibration is None or calibration.method == "identity":
        return served.copy()
    if calibration.method != "isotonic":
        a, b = _slope_intercept(calibration)
        if a == 0.0:
            return np.full_like(served, 0.5)
        return sigmoid((logit(served) - b) / a)
    x, y = calibration.breakpoints()
    flat = served.ravel()
    j = np.searchsorted(y, flat, side="left")
    out = np.empty_like(flat)
    below, above = j == 0, j == len(y)
    out[below] = x[0]
    out[above] = x[-1]
    mid = ~(below | above)
    jm = j[mid]
    hit = y[jm] == flat[mid]
    lo = np.maximum(jm - 1, 0)
    span = np.where(hit, 1.0, y[jm] - y[lo])
    between = x[lo] + (flat[mid] - y[lo]) * (x[jm] - x[lo]) / span
    out[mid] = np.where(hit, x[jm], between)
    return out.reshape(served.shape)

"""Per-target probability calibration as the manifest stores it, applied in plain numpy.

The network is trained with a focal loss, whose sigmoid outputs rank patients well but are not
probabilities (they are pulled towards 0.5 and ignore each target's prevalence). ``ecglab
evaluate`` therefore fits one monotone map per target on the **validation fold**
(:mod:`model_training.calibration`), ``ecglab export`` writes it into the manifest's label entry,
and every consumer of the model applies it after the window average: the service's runtime
(cards, ``ecglab score``) and the evaluation itself. This module is that shared contract: the
schema (:class:`Calibration`) and the arithmetic (:meth:`Calibration.apply`, :class:`Calibrator`).
It needs only numpy and pydantic, so the service can use it without torch.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

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

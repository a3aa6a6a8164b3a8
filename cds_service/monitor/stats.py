"""The monitor's statistics in plain numpy: AUROC with bootstrap CI, PPV/sensitivity, calibration, PSI.

The service environment has no scikit-learn, and these few estimators are short enough to own:

* AUROC is the Mann-Whitney statistic with ties counted one half (as ``sklearn.metrics.roc_auc_score``
  and the training side's ``model_training.metrics``); its CI is the empirical bootstrap the
  project uses everywhere, ``point + percentile(boot - point, [2.5, 97.5])``. A resample is a
  vector of multiplicities (:func:`weighted_auroc`), so one sort per target serves every resample
  and the caller decides what is resampled (the monitor resamples whole hook calls).
* PPV, sensitivity and specificity at the deployed threshold ("positive when p >= threshold") with
  Wilson score intervals.
* Calibration is the contract's (:mod:`fhir_mappings.reliability`), shared with training.
* Population stability index between two binned distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

#: Floor for empty bins in the PSI (ln(0) is undefined); the usual choice.
PSI_EPSILON = 1e-4


def weighted_auroc(y: NDArray[np.bool_], p: FloatArray, weights: FloatArray) -> FloatArray:
    """AUROC for each column of ``weights`` (n, B): weight = how often a prediction is drawn."""
    neg_rows = np.flatnonzero(~y)
    pos_rows = np.flatnonzero(y)
    order = neg_rows[np.argsort(p[neg_rows], kind="mergesort")]
    neg_sorted = p[order]
    below = np.searchsorted(neg_sorted, p[pos_rows], side="left")
    upto = np.searchsorted(neg_sorted, p[pos_rows], side="right")
    cum = np.vstack([np.zeros((1, weights.shape[1])), np.cumsum(weights[order], axis=0)])
    w_pos = weights[pos_rows]
    wins = (w_pos * (cum[below] + 0.5 * (cum[upto] - cum[below]))).sum(axis=0)
    total = w_pos.sum(axis=0) * weights[neg_rows].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, wins / np.maximum(total, 1e-300), np.nan)


def auroc(y_true: NDArray[np.integer] | NDArray[np.floating], y_prob: FloatArray) -> float:
    """AUROC of 1/0 outcomes; NaN when only one class is present."""
    y = np.asarray(y_true) == 1
    p = np.asarray(y_prob, dtype=np.float64)
    if y.all() or not y.any():
        return math.nan
    return float(weighted_auroc(y, p, np.ones((len(p), 1)))[0])


def empirical_ci(point: float, boot: FloatArray, confidence: float = 0.95) -> tuple[float, float]:
    """``point + percentile(boot - point, tails)``; NaN when the point or every replicate is undefined."""
    values = np.asarray(boot, dtype=np.float64)
    if not math.isfinite(point) or not np.isfinite(values).any():
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.nanpercentile(values - point, [tail, 100.0 - tail])
    return float(point + low), float(point + high)


def wilson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (NaN, NaN) for zero trials."""
    if trials == 0:
        return math.nan, math.nan
    z = _normal_quantile(0.5 + confidence / 2.0)
    phat = successes / trials
    denom = 1.0 + z * z / trials
    centre = (phat + z * z / (2 * trials)) / denom
    half = z * math.sqrt(phat * (1 - phat) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(q: float) -> float:
    """Standard normal quantile (scipy is a core dependency; imported here only)."""
    from scipy.stats import norm

    return float(norm.ppf(q))


@dataclass(frozen=True)
class Confusion:
    """Counts of "positive when p >= threshold" against observed outcomes."""

    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def at(cls, y_true: NDArray[np.integer], y_prob: FloatArray, threshold: float | FloatArray) -> Confusion:
        """The confusion counts at ``threshold`` (a number, or one threshold per prediction)."""
        y = np.asarray(y_true) == 1
        flagged = np.asarray(y_prob, dtype=np.float64) >= np.asarray(threshold, dtype=np.float64)
        return cls(
            tp=int((y & flagged).sum()),
            fp=int((~y & flagged).sum()),
            fn=int((y & ~flagged).sum()),
            tn=int((~y & ~flagged).sum()),
        )

    def ratios(self, confidence: float = 0.95) -> dict[str, float]:
        """PPV, sensitivity and specificity with Wilson intervals (NaN where undefined)."""
        out: dict[str, float] = {}
        for name, hits, total in (
            ("ppv", self.tp, self.tp + self.fp),
            ("sensitivity", self.tp, self.tp + self.fn),
            ("specificity", self.tn, self.tn + self.fp),
        ):
            low, high = wilson(hits, total, confidence)
            out[name] = hits / total if total else math.nan
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
        return out


def psi(expected: FloatArray, actual: FloatArray) -> float:
    """Population stability index Σ (a - e) ln(a / e) of two distributions over the same bins."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_EPSILON)
    a = np.maximum(np.asarray(actual, dtype=np.float64), PSI_EPSILON)
    e, a = e / e.sum(), a / a.sum()
    return float(((a - e) * np.log(a / e)).sum())

"""Reliability bins and the expected calibration error, for training's evaluation and the monitor.

Both sides report calibration the same way, so the binning lives once here in the contract:
``n_bins`` equal-width bins on [0, 1]; bin ``b`` holds ``edges[b] <= p < edges[b+1]`` and the
last bin also holds ``p == 1``. Probabilities are clipped to [0, 1] and entries whose label is NaN
(a target not measured for that sample) are left out. The ECE is the count-weighted mean of
``|observed rate - mean predicted probability|`` over the non-empty bins (NaN with no entries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Reliability:
    """Equal-width probability bins: mean predicted probability, observed rate and count per bin.

    ``mean_prob`` and ``observed`` are NaN for empty bins.
    """

    edges: FloatArray  # (n_bins + 1,)
    mean_prob: FloatArray  # (n_bins,)
    observed: FloatArray  # (n_bins,)
    count: NDArray[np.int64]  # (n_bins,)

    @property
    def ece(self) -> float:
        """Expected calibration error: count-weighted mean |observed - predicted| (NaN if empty)."""
        total = int(self.count.sum())
        if total == 0:
            return math.nan
        used = self.count > 0
        gaps = np.abs(self.observed[used] - self.mean_prob[used])
        return float((self.count[used] / total * gaps).sum())


def reliability(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10) -> Reliability:
    """Bin the predictions ``y_prob`` of the labels ``y_true`` (1-D, same length) into ``n_bins``."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be 1 or more, got {n_bins}")
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.size} vs {p.size}")
    labelled = ~np.isnan(y) & ~np.isnan(p)
    y, p = y[labelled], np.clip(p[labelled], 0.0, 1.0)
    which = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(np.int64)
    sum_p = np.bincount(which, weights=p, minlength=n_bins)
    sum_y = np.bincount(which, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.where(count > 0, sum_p / np.maximum(count, 1), np.nan)
        observed = np.where(count > 0, sum_y / np.maximum(count, 1), np.nan)
    return Reliability(np.linspace(0.0, 1.0, n_bins + 1), mean_prob, observed, count)

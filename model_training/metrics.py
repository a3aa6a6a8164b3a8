"""Evaluation metrics: AUROC (per target, macro, micro), bootstrap CIs, calibration error and Brier score.

Everything here is plain numpy so that it is fast, testable and usable from the service side
of the project (``ecglab score``) without torch. Conventions follow the paper's code (method.md
§3.5, §3.6):

* Targets are columns of a (N, K) matrix holding 1.0 / 0.0 / NaN; NaN means "lab not measured"
  and the sample is left out of that target only.
* Per-target AUROC is the Mann-Whitney statistic with ties counted one half (identical to
  ``sklearn.metrics.roc_auc_score``); it is NaN when a target has only one class.
* The macro AUROC is the plain mean over targets with a NaN AUROC counted as 0.5, as in the
  reference ``multiclass_roc_curve``; the micro AUROC pools every non-NaN (sample, target) pair.
* Confidence intervals come from an empirical bootstrap that resamples whole samples (rows), so
  the per-target, per-task and micro intervals all use the same resamples:
  ``CI = point + nanpercentile(boot - point, [2.5, 97.5])``.

The bootstrap is vectorised: a resample is a vector of multiplicities (how often each sample was
drawn), and a weighted Mann-Whitney statistic over the pre-sorted scores of a target gives the
AUROC of many resamples with a handful of array operations. 1000 resamples x dozens of targets
therefore take seconds, not minutes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fhir_mappings.reliability import Reliability, reliability

FloatArray = NDArray[np.float64]

#: Upper bound on the number of float64 cells one vectorised bootstrap block may hold (~40 MB).
_BLOCK_CELLS = 5_000_000


# --------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SortedTarget:
    """One target's non-NaN samples split into negatives (sorted by score) and positives.

    For every positive we precompute where its score falls among the sorted negatives: ``below``
    negatives score strictly lower and ``upto`` negatives score lower or equal. Sorting once and
    reusing these positions for every bootstrap block is what makes the bootstrap cheap: a
    resample only changes the weights (multiplicities) of the samples, never their order.
    """

    neg_rows: NDArray[np.int64]  # sample (row) index of each negative, sorted by score
    pos_rows: NDArray[np.int64]  # sample (row) index of each positive
    below: NDArray[np.int64]  # per positive: number of negatives with a strictly lower score
    upto: NDArray[np.int64]  # per positive: number of negatives with a lower or equal score

    @classmethod
    def build(
        cls, y: NDArray[np.floating], p: NDArray[np.floating], rows: NDArray[np.int64]
    ) -> _SortedTarget:
        """Sort negatives by score and locate every positive among them."""
        positive = y > 0.5
        neg_p, pos_p = p[~positive], p[positive]
        order = np.argsort(neg_p, kind="mergesort")
        neg_sorted = neg_p[order]
        return cls(
            neg_rows=rows[~positive][order],
            pos_rows=rows[positive],
            below=np.searchsorted(neg_sorted, pos_p, side="left").astype(np.int64),
            upto=np.searchsorted(neg_sorted, pos_p, side="right").astype(np.int64),
        )

    @property
    def size(self) -> int:
        """Number of non-NaN entries of the target."""
        return int(self.neg_rows.size + self.pos_rows.size)

    def weighted_auc(self, weights: FloatArray) -> FloatArray:
        """AUROC for each column of ``weights`` (N_rows, R): weight = multiplicity of a sample.

        AUROC = sum over positive i, negative j of w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j]),
        divided by (sum of positive weights) x (sum of negative weights). With the cumulative
        negative weight ``c`` along the sorted negatives, positive i contributes
        ``w_i (c[below_i] + c[upto_i]) / 2``.
        """
        n_res = weights.shape[1]
        if self.neg_rows.size == 0 or self.pos_rows.size == 0:
            return np.full(n_res, np.nan)
        cum_neg = np.zeros((self.neg_rows.size + 1, n_res))
        np.cumsum(weights[self.neg_rows], axis=0, out=cum_neg[1:])
        w_pos = weights[self.pos_rows]
        numerator = 0.5 * np.einsum("ir,ir->r", w_pos, cum_neg[self.below] + cum_neg[self.upto])
        denominator = w_pos.sum(axis=0) * cum_neg[-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def _check_pair(y_true: NDArray[np.floating], y_prob: NDArray[np.floating]) -> tuple[FloatArray, FloatArray]:
    """Both arrays as float64; ValueError when their shapes differ."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"targets {y.shape} and probabilities {p.shape} differ in shape")
    return y, p


def roc_auc(
    y_true: Sequence[float] | NDArray[np.floating], y_prob: Sequence[float] | NDArray[np.floating]
) -> float:
    """AUROC of one target over its non-NaN entries; NaN when only one class is present."""
    y, p = _check_pair(np.asarray(y_true), np.asarray(y_prob))
    valid = ~np.isnan(y)
    y, p = y[valid], p[valid]
    target = _SortedTarget.build(y, p, np.arange(len(y), dtype=np.int64))
    return float(target.weighted_auc(np.ones((len(y), 1)))[0])


def auroc_per_target(y_true: NDArray[np.floating], y_prob: NDArray[np.floating]) -> FloatArray:
    """Per-column AUROC of (N, K) targets (1/0/NaN) and probabilities; NaN for one-class columns."""
    y, p = _check_pair(y_true, y_prob)
    return np.array([roc_auc(y[:, k], p[:, k]) for k in range(y.shape[1])], dtype=np.float64)


def macro_auroc(aurocs: Sequence[float] | NDArray[np.floating]) -> float:
    """Mean of per-target AUROCs with NaN counted as 0.5 (the reference's convention, §3.5)."""
    values = np.asarray(aurocs, dtype=np.float64)
    if values.size == 0:
        return float("nan")
    return float(np.nan_to_num(values, nan=0.5).mean())


def micro_auroc(y_true: NDArray[np.floating], y_prob: NDArray[np.floating]) -> float:
    """AUROC over every non-NaN (sample, target) pair pooled together."""
    y, p = _check_pair(y_true, y_prob)
    valid = ~np.isnan(y)
    return roc_auc(y[valid], p[valid])


def roc_curve(
    y_true: NDArray[np.floating], y_prob: NDArray[np.floating]
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """ROC curve over the non-NaN entries: (fpr, tpr, thresholds), thresholds decreasing.

    Point ``i`` is the rule "positive when prob >= thresholds[i]"; the first point is
    (0, 0) with threshold +inf. Every distinct score is a point (no intermediate dropping),
    which the threshold rules need.
    """
    y_all, p_all = _check_pair(y_true, y_prob)
    valid = ~np.isnan(y_all)
    order = np.argsort(-p_all[valid], kind="mergesort")
    p = p_all[valid][order]
    positive = y_all[valid][order] > 0.5
    last_of_group = np.r_[np.flatnonzero(p[1:] != p[:-1]), len(p) - 1] if len(p) else np.zeros(0, np.int64)
    tps = np.cumsum(positive)[last_of_group].astype(np.float64)
    fps = (last_of_group + 1 - tps).astype(np.float64)
    n_pos, n_neg = float(positive.sum()), float((~positive).sum())
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.r_[0.0, np.full(len(tps), np.nan)]
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.r_[0.0, np.full(len(fps), np.nan)]
    return fpr, tpr, np.r_[np.inf, p[last_of_group]]


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BootstrapResult:
    """Point estimates and bootstrap replicates of per-target and micro AUROC on one split.

    ``boot`` is (n_boot, K); row ``b`` holds every target's AUROC on resample ``b`` (NaN where a
    resample lost one class). Group macros are derived from the same rows, so a task's macro CI
    reflects the correlation between its targets.
    """

    point: FloatArray  # (K,)
    boot: FloatArray  # (n_boot, K)
    micro_point: float
    micro_boot: FloatArray  # (n_boot,)

    def target_ci(self, confidence: float = 0.95) -> tuple[FloatArray, FloatArray]:
        """Per-target (low, high) empirical CI; NaN where the point AUROC is NaN."""
        lows, highs = (
            zip(
                *(empirical_ci(self.point[k], self.boot[:, k], confidence) for k in range(len(self.point))),
                strict=True,
            )
            if len(self.point)
            else ((), ())
        )
        return np.asarray(lows, dtype=np.float64), np.asarray(highs, dtype=np.float64)

    def macro(
        self, columns: Sequence[int] | NDArray[np.int64], confidence: float = 0.95
    ) -> tuple[float, float, float]:
        """Macro AUROC (NaN → 0.5) over ``columns`` with its CI: (point, low, high)."""
        cols = np.asarray(columns, dtype=np.int64)
        if cols.size == 0:
            return float("nan"), float("nan"), float("nan")
        point = macro_auroc(self.point[cols])
        boot = np.nan_to_num(self.boot[:, cols], nan=0.5).mean(axis=1)
        low, high = empirical_ci(point, boot, confidence)
        return point, low, high

    def micro(self, confidence: float = 0.95) -> tuple[float, float, float]:
        """Micro AUROC with its CI: (point, low, high)."""
        low, high = empirical_ci(self.micro_point, self.micro_boot, confidence)
        return self.micro_point, low, high


def empirical_ci(point: float, boot: NDArray[np.floating], confidence: float = 0.95) -> tuple[float, float]:
    """``point + nanpercentile(boot - point, [(1-c)/2, (1+c)/2])`` as in the reference (§3.6)."""
    boot = np.asarray(boot, dtype=np.float64)
    if not np.isfinite(point) or not np.isfinite(boot).any():
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.nanpercentile(boot - point, [tail, 100.0 - tail])
    return float(point + low), float(point + high)


def _resample_counts(rng: np.random.Generator, n_rows: int, n_draws: int) -> FloatArray:
    """Multiplicities (n_rows, n_draws) of ``n_draws`` resamples-with-replacement of n_rows rows.

    Sample-major layout: gathering a target's rows then copies contiguous blocks.
    """
    idx = rng.integers(0, n_rows, size=(n_draws, n_rows))
    flat = idx * n_draws + np.arange(n_draws)[:, None]
    return np.bincount(flat.ravel(), minlength=n_draws * n_rows).reshape(n_rows, n_draws).astype(np.float64)


def bootstrap_auroc(
    y_true: NDArray[np.floating], y_prob: NDArray[np.floating], n_boot: int = 1000, seed: int = 0
) -> BootstrapResult:
    """Bootstrap per-target and micro AUROC of (N, K) targets by resampling whole samples.

    Deterministic for a given ``seed`` and data. Resamples are drawn in blocks whose size
    depends only on N, so the draws do not change with the number of targets.
    """
    y, p = _check_pair(y_true, y_prob)
    if y.ndim != 2:
        raise ValueError(f"expected (N, K) targets, got shape {y.shape}")
    n, k = y.shape
    rng = np.random.default_rng(seed)
    targets = []
    for j in range(k):
        rows = np.flatnonzero(~np.isnan(y[:, j]))
        targets.append(_SortedTarget.build(y[rows, j], p[rows, j], rows))
    valid_r, valid_c = np.nonzero(~np.isnan(y))
    micro = _SortedTarget.build(y[valid_r, valid_c], p[valid_r, valid_c], valid_r.astype(np.int64))

    ones = np.ones((n, 1))
    point = np.array([t.weighted_auc(ones)[0] for t in targets], dtype=np.float64)
    micro_point = float(micro.weighted_auc(ones)[0])
    boot = np.full((n_boot, k), np.nan)
    micro_boot = np.full(n_boot, np.nan)
    if n == 0 or n_boot == 0:
        return BootstrapResult(point, boot, micro_point, micro_boot)

    block = max(1, min(n_boot, _BLOCK_CELLS // n))
    micro_block = max(1, _BLOCK_CELLS // max(1, micro.size))
    for start in range(0, n_boot, block):
        stop = min(n_boot, start + block)
        counts = _resample_counts(rng, n, stop - start)
        for j, target in enumerate(targets):
            boot[start:stop, j] = target.weighted_auc(counts)
        for s in range(0, stop - start, micro_block):
            e = min(stop - start, s + micro_block)
            micro_boot[start + s : start + e] = micro.weighted_auc(counts[:, s:e])
    return BootstrapResult(point, boot, micro_point, micro_boot)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------
ReliabilityBins = Reliability
"""Training's name for the contract's reliability bins (:mod:`fhir_mappings.reliability`)."""


def reliability_bins(
    y_true: NDArray[np.floating], y_prob: NDArray[np.floating], n_bins: int = 10
) -> Reliability:
    """Bin non-NaN entries by probability into ``n_bins`` equal-width bins on [0, 1].

    Bin ``b`` holds ``edges[b] <= p < edges[b+1]``; the last bin also holds p == 1.
    """
    y, p = _check_pair(y_true, y_prob)
    return reliability(y, p, n_bins)


def expected_calibration_error(
    y_true: NDArray[np.floating], y_prob: NDArray[np.floating], n_bins: int = 10
) -> float:
    """ECE = sum over bins of (n_b / n) |observed rate_b - mean probability_b|; NaN if no entries."""
    return reliability_bins(y_true, y_prob, n_bins).ece


def brier_score(y_true: NDArray[np.floating], y_prob: NDArray[np.floating]) -> float:
    """Mean squared difference between probability and outcome over non-NaN entries; NaN if none."""
    y, p = _check_pair(y_true, y_prob)
    valid = ~np.isnan(y)
    return float(np.mean((p[valid] - y[valid]) ** 2)) if valid.any() else float("nan")


# --------------------------------------------------------------------------------------------
# Operating points and groups (threshold rules: model_training.thresholds)
# --------------------------------------------------------------------------------------------


def sensitivity_specificity(
    y_true: NDArray[np.floating], y_prob: NDArray[np.floating], threshold: float
) -> tuple[float, float]:
    """Sensitivity and specificity of "positive when prob >= threshold" on non-NaN entries."""
    y, p = _check_pair(y_true, y_prob)
    valid = ~np.isnan(y)
    positive, pred = y[valid] > 0.5, p[valid] >= threshold
    sens = float((pred & positive).sum() / positive.sum()) if positive.any() else float("nan")
    spec = float((~pred & ~positive).sum() / (~positive).sum()) if (~positive).any() else float("nan")
    return sens, spec


def group_columns(names: Sequence[str], group_of: Mapping[str, str]) -> dict[str, list[int]]:
    """Column indices per group, groups in first-appearance order (e.g. task or organ system)."""
    groups: dict[str, list[int]] = {}
    for j, name in enumerate(names):
        groups.setdefault(group_of[name], []).append(j)
    return groups

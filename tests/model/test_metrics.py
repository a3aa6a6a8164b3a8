"""Evaluation metrics and the training loss: each test pins one rule of method.md §3.3, §3.5, §3.6."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from model_training.losses import binary_focal_loss
from model_training.metrics import (
    bootstrap_auroc,
    empirical_ci,
    expected_calibration_error,
    macro_auroc,
    micro_auroc,
    roc_auc,
    roc_curve,
)
from model_training.thresholds import choose_threshold, validate_threshold_rule


# --------------------------------------------------------------------------------------------
# Focal loss (§3.3)
# --------------------------------------------------------------------------------------------
def test_focal_loss_with_gamma_zero_is_binary_cross_entropy() -> None:
    """§3.3: γ = 0 removes the focal factor, leaving BCE (one label: mean over the batch)."""
    logits = torch.tensor([[0.3], [-1.2], [2.0], [0.0]])
    targets = torch.tensor([[1.0], [0.0], [0.0], [1.0]])
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(binary_focal_loss(logits, targets, gamma=0.0), expected)


def test_focal_loss_sums_per_label_means_over_observed_targets() -> None:
    """§3.3: per label the mean over non-NaN entries, then the sum over labels (hand-computed)."""
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [-1.0, 0.5]])
    targets = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), 0.0]])

    def focal(z: float, t: float, gamma: float = 2.0) -> float:
        """Focal BCE of one entry, computed by hand."""
        p = 1.0 / (1.0 + math.exp(-z))
        p_t = p if t == 1.0 else 1.0 - p
        return -((1.0 - p_t) ** gamma) * math.log(p_t)

    label0 = (focal(0.0, 1.0) + focal(1.0, 0.0)) / 2  # row 2 missing
    label1 = (focal(-1.0, 1.0) + focal(0.5, 0.0)) / 2  # row 0 missing
    assert binary_focal_loss(logits, targets).item() == pytest.approx(label0 + label1, rel=1e-6)


def test_focal_loss_ignores_missing_targets_and_their_gradients() -> None:
    """§3.3 ``ignore_nans``: a NaN target adds no loss and no gradient; all-NaN gives 0, not NaN."""
    logits = torch.tensor([[0.7, -0.3], [5.0, 1.0]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")]])
    loss = binary_focal_loss(logits, targets)
    loss.backward()
    assert logits.grad is not None
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0, 1] == 0 and logits.grad[0, 0] != 0
    empty = binary_focal_loss(logits, torch.full_like(logits, float("nan")))
    assert empty.item() == 0.0 and empty.requires_grad


def test_focal_loss_down_weights_easy_examples() -> None:
    """§3.3: with γ = 2 a confident correct prediction costs much less than under BCE."""
    logits, targets = torch.tensor([[4.0]]), torch.tensor([[1.0]])
    bce = binary_focal_loss(logits, targets, gamma=0.0)
    assert binary_focal_loss(logits, targets, gamma=2.0) < bce * 1e-3


# --------------------------------------------------------------------------------------------
# AUROC (§3.5)
# --------------------------------------------------------------------------------------------
def test_auroc_is_one_for_perfect_and_zero_for_inverted_ranking() -> None:
    """§3.5: AUROC of a perfect ranking is 1, of the reversed ranking 0."""
    y = np.array([0, 0, 1, 1], dtype=float)
    p = np.array([0.1, 0.2, 0.8, 0.9])
    assert roc_auc(y, p) == 1.0
    assert roc_auc(y, 1 - p) == 0.0


def test_auroc_counts_ties_as_one_half() -> None:
    """§3.5: tied scores between a positive and a negative count 0.5 (all tied → 0.5)."""
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert roc_auc([0, 0, 1, 1], [0.2, 0.6, 0.6, 0.9]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def test_auroc_matches_sklearn_with_ties_and_skips_nan_targets() -> None:
    """§3.5: per-label AUROC on the non-NaN targets equals sklearn's roc_auc_score."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300).astype(float)
    p = np.round(rng.random(300) + 0.3 * y, 1)  # rounding creates many ties
    y_missing = y.copy()
    y_missing[rng.random(300) < 0.3] = np.nan
    keep = ~np.isnan(y_missing)
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert roc_auc(y_missing, p) == pytest.approx(roc_auc_score(y[keep], p[keep]), abs=1e-12)


def test_auroc_is_nan_for_a_single_class() -> None:
    """§3.5: a target with only one class in the split has no AUROC."""
    assert math.isnan(roc_auc([1, 1, np.nan], [0.2, 0.4, 0.9]))


def test_macro_auroc_counts_nan_as_one_half() -> None:
    """§3.5: macro = plain mean with an undefined per-label AUROC counted as 0.5."""
    assert macro_auroc([0.9, float("nan"), 0.7]) == pytest.approx((0.9 + 0.5 + 0.7) / 3)


def test_micro_auroc_pools_all_observed_pairs() -> None:
    """§3.5: micro AUROC is the AUROC of every non-NaN (sample, target) pair pooled."""
    y = np.array([[1, 0], [0, np.nan], [1, 1]], dtype=float)
    p = np.array([[0.9, 0.2], [0.4, 0.99], [0.3, 0.8]])
    keep = ~np.isnan(y)
    assert micro_auroc(y, p) == pytest.approx(roc_auc_score(y[keep], p[keep]))


def test_roc_curve_matches_rule_prob_at_least_threshold() -> None:
    """Each ROC point is "positive when prob >= threshold", starting at (0, 0)."""
    fpr, tpr, thr = roc_curve(np.array([0, 1, 1, 0.0]), np.array([0.1, 0.4, 0.8, 0.4]))
    assert list(thr) == [np.inf, 0.8, 0.4, 0.1]
    assert list(tpr) == [0.0, 0.5, 1.0, 1.0]
    assert list(fpr) == [0.0, 0.0, 0.5, 1.0]


# --------------------------------------------------------------------------------------------
# Bootstrap (§3.6)
# --------------------------------------------------------------------------------------------
def _noisy_targets(seed: int = 0, n: int = 400, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) labels with missing entries and informative but noisy probabilities."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(float)
    p = 1 / (1 + np.exp(-(1.5 * y + rng.normal(size=(n, k)))))
    y[rng.random((n, k)) < 0.25] = np.nan
    return y, p


def test_bootstrap_ci_covers_point_estimate() -> None:
    """§3.6: the 95 % empirical CI of each AUROC, the macro and the micro contains the point."""
    y, p = _noisy_targets()
    result = bootstrap_auroc(y, p, n_boot=300, seed=1)
    lows, highs = result.target_ci()
    assert np.all(lows < result.point) and np.all(result.point < highs)
    macro, low, high = result.macro([0, 1, 2])
    assert low < macro < high
    micro, low, high = result.micro()
    assert low < micro < high


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    """§3.6: the same seed gives identical replicates; another seed gives different ones."""
    y, p = _noisy_targets()
    a = bootstrap_auroc(y, p, n_boot=50, seed=7)
    b = bootstrap_auroc(y, p, n_boot=50, seed=7)
    c = bootstrap_auroc(y, p, n_boot=50, seed=8)
    assert np.array_equal(a.boot, b.boot) and np.array_equal(a.micro_boot, b.micro_boot)
    assert not np.array_equal(a.boot, c.boot)


def test_bootstrap_replicate_equals_auroc_of_resampled_rows() -> None:
    """§3.6: a replicate is the AUROC of whole rows resampled with replacement (vectorised form)."""
    y, p = _noisy_targets(n=60, k=2)
    result = bootstrap_auroc(y, p, n_boot=3, seed=5)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 60, size=(3, 60))
    for b in range(3):
        for j in range(2):
            assert result.boot[b, j] == pytest.approx(roc_auc(y[idx[b], j], p[idx[b], j]), abs=1e-12)
        assert result.micro_boot[b] == pytest.approx(micro_auroc(y[idx[b]], p[idx[b]]), abs=1e-12)


def test_empirical_ci_is_point_plus_percentiles_of_deviation() -> None:
    """§3.6: CI = point + nanpercentile(boot - point, [2.5, 97.5]); NaN replicates are ignored."""
    boot = np.array([0.6, 0.7, 0.8, np.nan, 0.9, 0.5])
    low, high = empirical_ci(0.72, boot)
    dev = np.array([0.6, 0.7, 0.8, 0.9, 0.5]) - 0.72
    assert low == pytest.approx(0.72 + np.percentile(dev, 2.5))
    assert high == pytest.approx(0.72 + np.percentile(dev, 97.5))


def test_macro_bootstrap_counts_nan_replicates_as_one_half() -> None:
    """§3.5/§3.6: a resample where a target has one class contributes 0.5 to that macro replicate."""
    y = np.array([[1.0, 1.0], [0.0, np.nan], [1.0, 0.0], [0.0, np.nan]])
    p = np.array([[0.9, 0.3], [0.1, 0.5], [0.8, 0.6], [0.2, 0.5]])
    result = bootstrap_auroc(y, p, n_boot=200, seed=0)
    expected = np.nan_to_num(result.boot, nan=0.5).mean(axis=1)
    point, low, high = result.macro([0, 1])
    assert point == pytest.approx(macro_auroc(result.point))
    assert (low, high) == pytest.approx(empirical_ci(point, expected))


# --------------------------------------------------------------------------------------------
# Calibration and thresholds (beyond the paper)
# --------------------------------------------------------------------------------------------
def test_ece_known_case() -> None:
    """ECE = Σ (n_b / n) |observed rate − mean probability| over equal-width bins."""
    y = np.array([0, 1, 1, 1, np.nan])
    p = np.array([0.15, 0.15, 0.95, 0.95, 0.5])
    # bin [0.1, 0.2): mean p 0.15, rate 0.5 → 0.35; bin [0.9, 1]: mean 0.95, rate 1 → 0.05
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.5 * 0.35 + 0.5 * 0.05)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.0


def test_youden_threshold_known_case() -> None:
    """Youden's J = sens + spec − 1 is maximal at 0.6 here (sens 1, spec 2/3)."""
    y = np.array([0, 0, 0, 1, 1, 1], dtype=float)
    p = np.array([0.1, 0.3, 0.7, 0.6, 0.8, 0.9])
    assert choose_threshold(y, p, "youden") == pytest.approx(0.6)


def test_sensitivity_rule_picks_highest_threshold_reaching_target() -> None:
    """``sens:X`` returns the highest cut-off whose sensitivity is at least X."""
    y = np.array([0, 0, 1, 1, 1, 1], dtype=float)
    p = np.array([0.1, 0.5, 0.2, 0.6, 0.7, 0.9])
    assert choose_threshold(y, p, "sens:0.75") == pytest.approx(0.6)
    assert choose_threshold(y, p, "sens:1.0") == pytest.approx(0.2)


def test_f1_rule_maximises_f1() -> None:
    """``f1`` picks the cut-off with the best F1 of the abnormal class."""
    y = np.array([0, 0, 1, 1, 0, 1], dtype=float)
    p = np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.9])
    # cut 0.3 → tp 3, fp 1, fn 0: F1 = 6/7, the best of all cut-offs
    assert choose_threshold(y, p, "f1") == pytest.approx(0.3)


def test_threshold_is_nan_for_single_class_and_rule_is_validated() -> None:
    """One class → NaN (the caller falls back); an unknown rule raises a clear ValueError."""
    assert math.isnan(choose_threshold(np.array([1.0, 1.0]), np.array([0.3, 0.4])))
    with pytest.raises(ValueError, match="unknown threshold rule 'sens:2'"):
        validate_threshold_rule("sens:2")

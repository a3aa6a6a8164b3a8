"""Reliability bins and ECE (:mod:`fhir_mappings.reliability`): one binning for training and the monitor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fhir_mappings.reliability import reliability


def test_equal_width_bins_with_the_last_one_closed() -> None:
    """Bin b holds edges[b] <= p < edges[b+1]; p == 1 falls in the last bin; p is clipped to [0, 1]."""
    bins = reliability([0, 1, 1, 0, 1], [0.0, 0.1, 0.95, 1.0, 1.7], n_bins=10)
    assert bins.edges.tolist() == pytest.approx(np.linspace(0, 1, 11).tolist())
    assert bins.count.tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2 + 1]
    assert bins.mean_prob[9] == pytest.approx((0.95 + 1.0 + 1.0) / 3)
    assert bins.observed[9] == pytest.approx(2 / 3)
    assert math.isnan(bins.mean_prob[5]) and math.isnan(bins.observed[5])


def test_unmeasured_labels_are_left_out_and_ece_is_count_weighted() -> None:
    """NaN labels (target not measured) do not count; ECE = Σ n_b/n |observed_b - mean_b|."""
    y = np.array([1.0, 0.0, np.nan, 1.0])
    p = np.array([0.15, 0.15, 0.9, 0.85])
    bins = reliability(y, p, n_bins=10)
    assert int(bins.count.sum()) == 3
    assert bins.ece == pytest.approx(2 / 3 * abs(0.5 - 0.15) + 1 / 3 * abs(1.0 - 0.85))
    assert math.isnan(reliability([np.nan], [0.5]).ece)


def test_training_and_the_monitor_share_it() -> None:
    """model_training.metrics and the monitor's report read the same function (no second copy)."""
    from cds_service.monitor import report
    from model_training import metrics

    assert report.reliability is reliability
    y, p = np.array([0.0, 1.0, 1.0]), np.array([0.2, 0.7, 0.9])
    assert metrics.expected_calibration_error(y, p) == reliability(y, p).ece


def test_bad_shapes_and_bin_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        reliability([0, 1], [0.5])
    with pytest.raises(ValueError, match="n_bins"):
        reliability([0], [0.5], n_bins=0)

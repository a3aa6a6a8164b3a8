"""Performance by subgroup (model_training.subgroups): the fairness figures the model card shows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cds_service.monitor import outcomes as service_outcomes
from fhir_mappings import subgroups as contract
from model_training.subgroups import AGE_BAND_EDGES, age_band, sex_name, subgroup_metrics


def _data(n: int = 400, seed: int = 3) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Two targets; the model is informative for women and useless for men on target 0."""
    rng = np.random.default_rng(seed)
    sex = ["female" if i % 2 == 0 else "male" for i in range(n)]
    ages = rng.uniform(20, 95, n)
    y = (rng.random((n, 2)) < 0.3).astype(float)
    p = rng.random((n, 2))
    female = np.array([s == "female" for s in sex])
    p[female, 0] = np.clip(0.3 * y[female, 0] + 0.7 * rng.random(female.sum()), 0, 1)
    y[::7, 1] = np.nan  # lab not measured
    bands = [age_band(a) or "unknown" for a in ages]
    return y, p, sex, bands


def test_age_bands_and_sex_names() -> None:
    assert [age_band(a) for a in (5, 18, 39.9, 40, 59, 60, 79.5, 80, 101)] == [
        "<18",
        "18-39",
        "18-39",
        "40-59",
        "40-59",
        "60-79",
        "60-79",
        "80+",
        "80+",
    ]
    assert age_band(None) is None and age_band(math.nan) is None
    assert (sex_name(0.0), sex_name(1.0), sex_name(None), sex_name(2.0)) == ("female", "male", None, None)


def test_service_uses_the_same_age_bands() -> None:
    """Evaluate and the monitor band ages with the one definition in the contract (fhir_mappings)."""
    assert service_outcomes.age_band is contract.age_band is age_band
    assert AGE_BAND_EDGES == contract.AGE_BAND_EDGES == (18, 40, 60, 80)
    assert [age_band(float(a)) for a in (17.9, 18, 39.9, 40, 79, 80, 104)] == [
        "<18",
        "18-39",
        "18-39",
        "40-59",
        "60-79",
        "80+",
        "80+",
    ]


def test_points_match_sklearn_and_gap_shows_the_unfair_target() -> None:
    y, p, sex, bands = _data()
    result = subgroup_metrics(
        y,
        p,
        {"sex": sex, "age_band": bands},
        targets=["a_high_est", "b_low_est"],
        thresholds=[0.5, 0.5],
        n_boot=200,
    )
    json.dumps(result, allow_nan=False)  # JSON-ready: no NaN anywhere
    female = result["attributes"]["sex"]["female"]
    male = result["attributes"]["sex"]["male"]
    rows = np.array([s == "female" for s in sex])
    expected = roc_auc_score(y[rows, 0], p[rows, 0])
    assert female["targets"]["a_high_est"]["auroc"] == pytest.approx(expected)
    assert female["n"] == rows.sum() and male["n"] == (~rows).sum()
    entry = female["targets"]["a_high_est"]
    assert entry["ci_low"] < entry["auroc"] < entry["ci_high"]
    flagged = p[rows, 0] >= 0.5
    positive = y[rows, 0] == 1
    assert entry["sensitivity"] == pytest.approx((flagged & positive).sum() / positive.sum())
    assert entry["ppv"] == pytest.approx((flagged & positive).sum() / flagged.sum())
    assert entry["sensitivity_ci_low"] <= entry["sensitivity"] <= entry["sensitivity_ci_high"]
    gap = result["gaps"]["sex"]["a_high_est"]
    assert gap["highest"] == "female" and gap["lowest"] == "male" and gap["auroc_gap"] > 0.2
    measured = ~np.isnan(y[:, 1]) & rows
    assert female["targets"]["b_low_est"]["n_pos"] + female["targets"]["b_low_est"]["n_neg"] == measured.sum()
    assert list(result["attributes"]["age_band"]) == sorted(
        result["attributes"]["age_band"], key=lambda b: int(b.split("-")[0].rstrip("+"))
    )


def test_too_few_cases_give_no_auroc_and_seed_makes_it_deterministic() -> None:
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=float)
    p = np.linspace(0.1, 0.9, 10)
    groups = ["a"] * 10
    result = subgroup_metrics(y, p, groups, n_boot=50, min_class=5)
    entry = result["attributes"]["group"]["a"]["targets"]["target_0"]
    assert entry["auroc"] is None and entry["n_pos"] == 2
    assert result["attributes"]["group"]["a"]["macro_auroc"] is None
    again = subgroup_metrics(y, p, groups, n_boot=50, min_class=1)
    assert again == subgroup_metrics(y, p, groups, n_boot=50, min_class=1)


def test_unknown_group_labels_are_left_out_and_shapes_checked() -> None:
    y = np.array([1.0, 0.0, 1.0, 0.0])
    p = np.array([0.9, 0.1, 0.8, 0.2])
    result = subgroup_metrics(y, p, {"sex": ["female", None, "female", "female"]}, n_boot=10, min_class=1)
    assert list(result["attributes"]["sex"]) == ["female"] and result["attributes"]["sex"]["female"]["n"] == 3
    with pytest.raises(ValueError, match="labels for"):
        subgroup_metrics(y, p, {"sex": ["female"]})
    with pytest.raises(ValueError, match="differ in shape"):
        subgroup_metrics(y, p[:3], ["a"] * 4)

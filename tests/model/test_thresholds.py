"""Decision thresholds by a named rule on the validation fold (issue 15): youden, sensitivity=X,
ppv=X (and f1), their fallbacks, and agreement with the site-side ``ecglab recalibrate``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cds_service.recalibrate import choose_threshold as site_choose_threshold
from model_training.thresholds import (
    FALLBACK_THRESHOLD,
    canonical_rule,
    choose_threshold,
    choose_thresholds,
    operating_point,
    parse_rule,
)

Y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 0, 1], dtype=float)
P = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])


def test_rule_names_and_spellings() -> None:
    """The manifest spelling is canonical; the old ``sens:X`` is read as ``sensitivity=X``."""
    assert canonical_rule("sens:0.8") == "sensitivity=0.8"
    assert parse_rule("ppv=0.3") == ("ppv", 0.3) and parse_rule("youden") == ("youden", None)
    for bad in ("best", "ppv=1.5", "sensitivity=", "sens:2", "ppv:0.3"):
        with pytest.raises(ValueError, match="unknown threshold rule"):
            canonical_rule(bad)


def test_youden_sensitivity_and_ppv_on_a_known_case() -> None:
    """Positive when p >= t. Youden: max sens + spec − 1; sensitivity=X: highest t reaching X;
    ppv=X: lowest t reaching PPV X (the most sensitive such rule)."""
    # t=0.6: sens 3/4, spec 5/6 → J 0.583; t=0.35: sens 1, spec 4/6 → J 0.667 (the maximum)
    assert choose_threshold(Y, P, "youden") == pytest.approx(0.35)
    assert choose_threshold(Y, P, "sensitivity=0.75") == pytest.approx(0.6)
    assert choose_threshold(Y, P, "sensitivity=1") == pytest.approx(0.35)
    assert choose_threshold(Y, P, "sens:0.75") == choose_threshold(Y, P, "sensitivity=0.75")
    # PPV at t=0.6: 3/4 = 0.75; at t=0.35: 4/6 = 0.667; at t=0.9: 1/1
    assert choose_threshold(Y, P, "ppv=0.7") == pytest.approx(0.6)
    assert choose_threshold(Y, P, "ppv=0.6") == pytest.approx(0.35)
    assert choose_threshold(Y, P, "ppv=1") == pytest.approx(0.9)


def test_unreachable_and_one_class_give_nan() -> None:
    """NaN tells the caller to fall back: one class, or a PPV no threshold reaches."""
    assert math.isnan(choose_threshold(np.array([1.0, 1.0]), np.array([0.3, 0.4]), "youden"))
    assert math.isnan(choose_threshold(np.array([1.0, 0.0, 0.0]), np.array([0.2, 0.5, 0.9]), "ppv=0.9"))


def test_choose_thresholds_records_rule_and_fallbacks() -> None:
    """Per target: (threshold, source); ppv unreachable → Youden, one class → 0.5, both named."""
    y = np.c_[Y, np.r_[1.0, np.zeros(9)], np.ones(10)]
    p = np.c_[P, P, P]  # b: its one positive has the lowest score, so PPV never exceeds 0.1
    chosen = choose_thresholds(y, p, ["a", "b", "c"], "ppv=0.7")
    assert chosen["a"] == (pytest.approx(0.6), "ppv=0.7")
    assert chosen["b"][1] == "fallback: youden (ppv=0.7 not reached on the val fold)"
    assert chosen["b"][0] == pytest.approx(choose_threshold(y[:, 1], p[:, 1], "youden"))
    assert chosen["c"] == (FALLBACK_THRESHOLD, "fallback: one class in val fold")


def test_operating_point() -> None:
    """Sensitivity, specificity, PPV, NPV of a threshold; NaN labels ignored."""
    point = operating_point(np.r_[Y, np.nan], np.r_[P, 0.99], 0.6)
    assert (point.sensitivity, point.specificity) == (pytest.approx(0.75), pytest.approx(5 / 6))
    assert (point.ppv, point.npv) == (pytest.approx(0.75), pytest.approx(5 / 6))
    assert math.isnan(operating_point(np.zeros(3), np.array([0.1, 0.2, 0.3]), 0.5).ppv)


@pytest.mark.parametrize("rule", ["youden", "sensitivity=0.8", "ppv=0.3", "ppv=0.5"])
def test_same_threshold_as_the_site_recalibration(rule: str) -> None:
    """Exported and site-derived thresholds mean the same: identical choices on random outcomes."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = (rng.random(120) < 0.25).astype(float)
        p = np.round(np.clip(0.25 * y + rng.random(120) * 0.75, 0, 1), 2)  # ties included
        name, value = parse_rule(rule)
        site = site_choose_threshold(y, p, name, value)
        ours = choose_threshold(y, p, rule)
        if site is None:
            assert math.isnan(ours)
        else:
            assert ours == pytest.approx(site.threshold)

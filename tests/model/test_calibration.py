"""Per-target calibration (issue 15): the manifest's maps, their fitting on the validation fold, their
composition (a site's map on top of the parent's, issue 17), and their application by the service's
runtime, with old manifests still serving their raw outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import fhir_mappings.calibration as contract
from cds_service.inference import ModelRuntime
from fhir_mappings.calibration import (
    COMPOSE_TOLERANCE,
    Calibration,
    Calibrator,
    compose,
    logit,
    preimage,
    sigmoid,
)
from fhir_mappings.manifest import load_manifest
from model_training.calibration import (
    CalibrationFit,
    fit_calibration,
    fit_calibrations,
    fit_isotonic,
    fit_platt,
    fit_temperature,
    log_loss,
    summarise_calibration,
)
from model_training.metrics import expected_calibration_error, roc_auc
from tests.onnx_fixtures import build_toy_model_dir


def _draw(n: int, slope: float, intercept: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores p = sigmoid(z) whose true probability is sigmoid(slope·z + intercept)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < sigmoid(slope * z + intercept)).astype(np.float64)
    return y, sigmoid(z)


# -- the contract: schema and arithmetic ------------------------------------------------------


def test_each_map_computes_its_formula() -> None:
    """identity, temperature, Platt and isotonic as documented in fhir_mappings.calibration."""
    p = np.array([0.0, 0.1, 0.5, 0.8, 1.0])
    assert np.array_equal(Calibration(method="identity").apply(p), p)
    temperature = Calibration(method="temperature", params={"temperature": 2.0})
    np.testing.assert_allclose(temperature.apply(p), sigmoid(logit(p) / 2.0))
    platt = Calibration(method="platt", params={"a": 0.5, "b": -1.0})
    np.testing.assert_allclose(platt.apply(p), sigmoid(0.5 * logit(p) - 1.0))
    isotonic = Calibration(method="isotonic", params={"x": [0.2, 0.6], "y": [0.1, 0.3]})
    np.testing.assert_allclose(isotonic.apply(p), [0.1, 0.1, 0.25, 0.3, 0.3])  # ends held, linear between
    assert np.isfinite(platt.apply(p)).all()  # 0 and 1 are clipped before the logit


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("temperature", {"temperature": 0.0}, "temperature must be > 0"),
        ("platt", {"a": -0.5, "b": 0.0}, "never reverses the ranking"),
        ("platt", {"a": 1.0}, "needs params"),
        ("isotonic", {"x": [0.1, 0.2], "y": [0.5, 0.4]}, "non-decreasing"),
        ("isotonic", {"x": [0.1], "y": [0.5, 0.6]}, "equally long"),
        ("identity", {"a": 1.0}, "needs params"),
    ],
)
def test_invalid_maps_are_refused(method: str, params: dict[str, object], message: str) -> None:
    """A map that is not monotone non-decreasing, or lacks its parameters, cannot be loaded."""
    with pytest.raises(ValidationError, match=message):
        Calibration.model_validate({"method": method, "params": params})


def test_calibrator_matches_per_column_maps_and_passes_identity_through() -> None:
    """The vectorised Calibrator equals each map applied alone; uncalibrated columns are bit-identical."""
    maps = [
        None,
        Calibration(method="temperature", params={"temperature": 1.7}),
        Calibration(method="identity"),
        Calibration(method="platt", params={"a": 0.8, "b": 0.3}),
        Calibration(method="isotonic", params={"x": [0.1, 0.5, 0.9], "y": [0.05, 0.2, 0.7]}),
    ]
    probs = np.random.default_rng(1).random((7, 5)).astype(np.float32)
    out = Calibrator(maps)(probs)
    for j, c in enumerate(maps):
        expected = probs[:, j].astype(np.float64) if c is None else c.apply(probs[:, j])
        np.testing.assert_array_equal(out[:, j], expected)
    np.testing.assert_array_equal(Calibrator(maps)(probs[0]), out[0])
    assert Calibrator([None, Calibration(method="identity")]).is_identity
    with pytest.raises(ValueError, match="columns"):
        Calibrator(maps)(probs[:, :3])


# -- fitting on the validation fold -------------------------------------------------------------


def test_temperature_and_platt_recover_known_maps() -> None:
    """With many cases, the fitted slope/intercept are the true ones (up to sampling noise)."""
    y, p = _draw(20_000, slope=0.5, intercept=0.0)
    assert fit_temperature(y, p).number("temperature") == pytest.approx(2.0, rel=0.08)
    y, p = _draw(20_000, slope=1.6, intercept=-1.2, seed=1)
    platt = fit_platt(y, p)
    assert platt.number("a") == pytest.approx(1.6, rel=0.08)
    assert platt.number("b") == pytest.approx(-1.2, abs=0.1)


def test_isotonic_is_monotone_and_never_certain() -> None:
    """PAV breakpoints are non-decreasing and stay inside [1/(n+2), (n+1)/(n+2)]."""
    y, p = _draw(500, slope=2.0, intercept=0.5)
    fitted = fit_isotonic(y, p)
    x_points, y_points = fitted.breakpoints()
    assert (np.diff(x_points) >= 0).all() and (np.diff(y_points) >= 0).all()
    assert y_points.min() >= 1 / 502 and y_points.max() <= 501 / 502
    assert log_loss(y, fitted.apply(p)) < log_loss(y, p)


def test_calibration_fixes_a_focal_loss_like_model() -> None:
    """Under-confident, off-centre scores (as focal loss gives): ECE falls from ~0.2 to a few hundredths."""
    y_val, p_val = _draw(3000, slope=2.2, intercept=-1.5, seed=2)
    y_test, p_test = _draw(3000, slope=2.2, intercept=-1.5, seed=3)
    fit = fit_calibration(y_val, p_val)
    assert expected_calibration_error(y_test, p_test) > 0.1
    assert expected_calibration_error(y_test, fit.calibration.apply(p_test)) < 0.03
    assert roc_auc(y_test, fit.calibration.apply(p_test)) == pytest.approx(roc_auc(y_test, p_test), abs=0.01)
    assert fit.calibration.fold == "val" and fit.calibration.n_pos == int(y_val.sum())


def test_choice_is_by_cross_validated_log_loss_and_guards_small_folds() -> None:
    """Isotonic is a candidate only with >= 30 positives and negatives; the winner has the lowest CV loss."""
    y, p = _draw(80, slope=1.5, intercept=-2.0, seed=4)  # about 20 positives
    small = fit_calibration(y, p)
    assert small.cv_log_loss["isotonic"] is None and small.calibration.method != "isotonic"
    assert "isotonic not tried" in small.reason
    tried = {m: v for m, v in small.cv_log_loss.items() if v is not None}
    assert small.calibration.method == min(tried, key=lambda m: tried[m])
    rng = np.random.default_rng(5)
    p = sigmoid(rng.normal(0.0, 3.0, 4000))
    y = (rng.random(4000) < 0.15 + 0.7 * (p > 0.5)).astype(np.float64)  # a step no logistic map fits
    large = fit_calibration(y, p)
    assert large.calibration.method == "isotonic"
    assert fit_calibration(y, p).calibration == large.calibration  # deterministic


def test_degenerate_folds_get_documented_fallbacks() -> None:
    """One class → identity; too few of a class to cross-validate → temperature; NaN labels ignored."""
    one_class = fit_calibration(np.array([1.0, 1.0, np.nan]), np.array([0.4, 0.7, 0.2]))
    assert one_class.calibration.method == "identity" and one_class.reason == "one class in the val fold"
    few = fit_calibration(np.array([1.0, 0.0, 0.0, 0.0]), np.array([0.9, 0.2, 0.3, 0.1]))
    assert few.calibration.method == "temperature" and "too few" in few.reason
    fixed = fit_calibration(*_draw(300, 1.0, 0.0), method="platt")
    assert fixed.calibration.method == "platt" and fixed.reason.startswith("fixed by config")


def test_fit_calibrations_and_summary() -> None:
    """One fit per column; the summary gives median/mean ECE and Brier before and after."""
    y1, p1 = _draw(400, 2.0, -1.0, seed=6)
    y2, p2 = _draw(400, 0.7, 0.4, seed=7)
    fits = fit_calibrations(np.c_[y1, y2], np.c_[p1, p2], ["A_high_est", "B_low_mon30"])
    assert set(fits) == {"A_high_est", "B_low_mon30"}
    assert all(isinstance(f, CalibrationFit) for f in fits.values())
    assert json.loads(json.dumps(fits["A_high_est"].to_json()))["calibration"]["fold"] == "val"
    entries: list[dict[str, object]] = [
        {"ece": 0.02, "ece_raw": 0.2, "brier": 0.1, "brier_raw": 0.15, "calibration": "platt"},
        {"ece": 0.04, "ece_raw": 0.1, "brier": 0.2, "brier_raw": 0.25, "calibration": "isotonic"},
        {"ece": None, "ece_raw": None, "brier": None, "brier_raw": None, "calibration": "identity"},
    ]
    summary = summarise_calibration(entries)
    assert summary["ece_median_before"] == pytest.approx(0.15) and summary[
        "ece_median_after"
    ] == pytest.approx(0.03)
    assert summary["brier_mean_after"] == pytest.approx(0.15)
    assert summary["methods"] == {"identity": 1, "isotonic": 1, "platt": 1}


def _platt_loss(y: np.ndarray, p: np.ndarray, a: float, b: float) -> float:
    """The loss Platt scaling minimises: cross-entropy against the smoothed targets."""
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    s = a * logit(p) + b
    return float(np.sum(t * np.logaddexp(0, -s) + (1 - t) * np.logaddexp(0, s)))


def test_platt_fit_is_the_constrained_optimum() -> None:
    """The numpy Newton fit is the minimum (no nearby point is lower); a reversed ranking pins the
    slope at its lower bound 1e-3 with the intercept still optimal."""
    y, p = _draw(1500, slope=0.7, intercept=-0.9, seed=8)
    fitted = fit_platt(y, p)
    a, b = fitted.number("a"), fitted.number("b")
    best = _platt_loss(y, p, a, b)
    for da, db in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3), (1e-3, -1e-3)]:
        assert _platt_loss(y, p, a + da, b + db) > best
    reversed_fit = fit_platt(y, 1.0 - p)
    a_low, b_low = reversed_fit.number("a"), reversed_fit.number("b")
    assert a_low == pytest.approx(1e-3)
    low = _platt_loss(y, 1.0 - p, a_low, b_low)
    assert _platt_loss(y, 1.0 - p, a_low, b_low + 1e-3) > low < _platt_loss(y, 1.0 - p, a_low, b_low - 1e-3)


def test_fitting_lives_in_the_contract_without_scipy_or_sklearn() -> None:
    """Training and the service fit with the same code; importing it (or the site recalibration) loads
    neither scipy, scikit-learn, torch nor the training package."""
    assert fit_calibration is contract.fit_calibration and fit_platt is contract.fit_platt
    code = (
        "import sys, fhir_mappings.calibration, cds_service.recalibrate; "
        "print(sorted(m for m in ('scipy', 'sklearn', 'torch', 'model_training') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    local = fit_calibration(*_draw(400, 1.3, -0.5, seed=9), fold="local")
    assert local.calibration.fold == "local" and local.calibration.n_pos is not None
    assert fit_calibration(np.zeros(5), np.full(5, 0.2), fold="local").reason == "one class in the local fold"


MAPS = {
    "temperature": Calibration(method="temperature", params={"temperature": 1.7}),
    "platt": Calibration(method="platt", params={"a": 0.6, "b": -0.8}),
    "isotonic": Calibration(
        method="isotonic", params={"x": [0.1, 0.3, 0.3001, 0.6, 0.8], "y": [0.05, 0.05, 0.2, 0.5, 0.9]}
    ),
    "isotonic_pav": fit_isotonic(*_draw(3000, slope=1.8, intercept=-1.0, seed=10)),
}


@pytest.mark.parametrize("outer", sorted(MAPS))
@pytest.mark.parametrize("inner", [None, "identity", *sorted(MAPS)])
def test_compose_equals_applying_both_maps(outer: str, inner: str | None) -> None:
    """One stored map over raw outputs serves what the site's map on top of the parent's would: exactly
    for two logistic or two isotonic maps, within the documented tolerance for a mixed pair."""
    site = MAPS[outer].model_copy(update={"fold": "local", "n_pos": 12, "n_neg": 80})
    parent = None if inner is None else Calibration(method="identity") if inner == "identity" else MAPS[inner]
    stored = compose(site, parent)
    p = np.linspace(0.0, 1.0, 20_001)
    expected = site.apply(p if parent is None else parent.apply(p))
    mixed = (
        parent is not None
        and parent.method != "identity"
        and (site.method == "isotonic") != (parent.method == "isotonic")
    )
    gap = np.abs(stored.apply(p) - expected).max()
    assert gap <= (3 * COMPOSE_TOLERANCE if mixed else 1e-9)
    assert (stored.fold, stored.n_pos, stored.n_neg) == ("local", 12, 80)
    assert (np.diff(stored.apply(p)) >= 0).all()


def test_compose_keeps_the_simplest_form() -> None:
    """Temperature on temperature is a temperature; a logistic map on a logistic one is Platt."""
    t = compose(MAPS["temperature"], Calibration(method="temperature", params={"temperature": 2.0}))
    assert t.method == "temperature" and t.number("temperature") == pytest.approx(3.4)
    assert compose(MAPS["platt"], MAPS["temperature"]).method == "platt"
    constant = compose(MAPS["isotonic"], Calibration(method="platt", params={"a": 0.0, "b": 0.4}))
    assert np.allclose(constant.apply([0.0, 0.5, 1.0]), MAPS["isotonic"].apply(sigmoid(0.4)))


@pytest.mark.parametrize("name", sorted(MAPS))
def test_preimage_gives_a_raw_value_the_map_sends_back(name: str) -> None:
    """``apply(preimage(q)) == q`` across the map's range; a flat block gives its first raw value;
    values beyond the range take the nearest end."""
    calibration = MAPS[name]
    served = calibration.apply(np.linspace(0.0, 1.0, 501))
    np.testing.assert_allclose(calibration.apply(preimage(calibration, served)), served, atol=1e-9)
    assert preimage(None, served) is not served and np.array_equal(preimage(None, served), served)
    if name == "isotonic":
        assert preimage(calibration, np.array([0.05, 0.2, 0.0, 1.0])).tolist() == [0.1, 0.3001, 0.1, 0.8]


# -- the runtime and old manifests --------------------------------------------------------------


def test_old_manifest_serves_raw_probabilities(tmp_path: Path) -> None:
    """A manifest without calibration fields still loads; probability == raw_probability."""
    manifest_path = build_toy_model_dir(tmp_path / "model")
    manifest = load_manifest(manifest_path)
    assert manifest.threshold_rule is None and manifest.abnormal_rule is None
    assert all(lab.calibration is None and lab.auroc_val is None for lab in manifest.labels)
    runtime = ModelRuntime.load(tmp_path / "model", ["CPUExecutionProvider"])
    raw = np.array([0.2, 0.5, 0.9], dtype=np.float32)
    predictions = runtime.to_predictions(raw)
    assert [p.probability for p in predictions] == [p.raw_probability for p in predictions]
    assert predictions[0].gate_auroc_ci_low == predictions[0].auroc_ci_low == 0.85  # legacy: test-fold bound


def test_runtime_applies_the_manifest_calibration(tmp_path: Path) -> None:
    """With a calibration in the manifest, probability is calibrated and raw_probability kept; the gate
    reads the validation CI."""
    manifest_path = build_toy_model_dir(tmp_path / "model")
    raw_manifest = json.loads(manifest_path.read_text())
    platt = {"method": "platt", "params": {"a": 0.5, "b": -1.0}, "fold": "val", "n_pos": 40, "n_neg": 60}
    raw_manifest["labels"][0].update(
        calibration=platt, auroc_val=0.8, auroc_val_ci_low=0.72, threshold_fold="val"
    )
    raw_manifest["threshold_rule"] = "youden"
    manifest_path.write_text(json.dumps(raw_manifest))
    runtime = ModelRuntime.load(tmp_path / "model", ["CPUExecutionProvider"])
    raw = np.array([0.2, 0.5, 0.9], dtype=np.float32)
    first, second, _ = runtime.to_predictions(raw)
    assert first.raw_probability == pytest.approx(0.2)
    assert first.probability == pytest.approx(float(sigmoid(0.5 * logit(0.2) - 1.0)))
    assert second.probability == second.raw_probability == pytest.approx(0.5)
    assert first.gate_auroc_ci_low == 0.72 and first.auroc_ci_low == 0.85
    np.testing.assert_allclose(runtime.calibrate(raw[None])[0], [first.probability, 0.5, 0.9], rtol=1e-6)

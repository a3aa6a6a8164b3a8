"""Per-target calibration (issue 15): the manifest's maps, their fitting on the validation fold, and
their application by the service's runtime, with old manifests still serving their raw outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cds_service.inference import ModelRuntime
from fhir_mappings.calibration import Calibration, Calibrator, logit, sigmoid
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
    entries = [
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

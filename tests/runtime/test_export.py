"""``ecglab export`` (issue: ONNX export with a manifest): a tiny trained, evaluated run becomes an
ONNX model + manifest that the service's runtime loads and scores identically to PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from cds_service.cli import main
from cds_service.inference import ModelRuntime
from fhir_mappings import MAPPING_VERSION
from fhir_mappings.manifest import Manifest, MetadataSpec, load_manifest
from fhir_mappings.metadata_encoding import encode_metadata
from model_training.checkpoint import load_checkpoint
from model_training.model import FusionModel
from tests.training_fixtures import TinyRun

#: The runtime and ``ecglab score`` run on the CPU provider, so the parity asserted here does not
#: depend on whether the machine has a GPU (the CUDA path is pinned in ``test_inference.py``).
CPU = ["CPUExecutionProvider"]
SCORE_ON_CPU = ("--providers", "CPUExecutionProvider")


@pytest.fixture(scope="module")
def evaluated_run(evaluated_tiny_run: TinyRun) -> tuple[Path, Path]:
    """(DATASET, RUN) of the session's tiny run, trained and evaluated once for the whole suite."""
    return evaluated_tiny_run.data, evaluated_tiny_run.run


@pytest.fixture(scope="module")
def exported(evaluated_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The evaluated tiny run exported once through ``ecglab export`` as version 9.9.9-test."""
    _, run = evaluated_run
    out = tmp_path_factory.mktemp("export-out")
    assert main(["export", "--run", str(run), "--out", str(out), "--version", "9.9.9-test"]) == 0
    return out


def _manifest(exported: Path) -> dict[str, Any]:
    """The exported manifest as plain JSON."""
    return json.loads((exported / "ecglab-9.9.9-test.manifest.json").read_text())


def test_export_writes_versioned_onnx_and_manifest(exported: Path) -> None:
    """The model and its manifest are named by version; the manifest passes schema and sha256 checks."""
    assert (exported / "ecglab-9.9.9-test.onnx").is_file()
    manifest = load_manifest(exported / "ecglab-9.9.9-test.manifest.json")  # schema + sha256
    assert isinstance(manifest, Manifest)
    assert not list(exported.glob(".export-*")), "no temporary folder is left behind"


def test_manifest_carries_validation_thresholds_and_test_auroc(
    exported: Path, evaluated_run: tuple[Path, Path]
) -> None:
    """Decision thresholds come from the validation fold; the AUROC/CI figures from the test fold."""
    _, run = evaluated_run
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = _manifest(exported)
    for label in manifest["labels"]:
        target = label["target"]
        assert label["decision_threshold"] == pytest.approx(
            metrics["splits"]["val"]["targets"][target]["decision_threshold"]
        )
        assert label["auroc"] == metrics["splits"]["test"]["targets"][target]["auroc"]
    ntprobnp = next(lab for lab in manifest["labels"] if lab["target"] == "NTproBNP_high_est")
    assert ntprobnp["lab_key"] == "ntprobnp" and ntprobnp["order_code"]["system"] == "http://loinc.org"
    assert ntprobnp["value_threshold"] == 353.0  # no thresholds.json entry: the paper's value is the fallback


def test_manifest_says_synthetic_and_not_for_clinical_use(exported: Path) -> None:
    """A model trained on synthetic data says so, and every manifest says it is not for clinical use."""
    manifest = _manifest(exported)
    assert manifest["training_data"]["source"] == "synthetic"
    assert "NOT FOR CLINICAL USE" in manifest["intended_use"]
    assert manifest["mapping_version"] == MAPPING_VERSION


def test_manifest_records_parity_on_random_and_real_inputs(exported: Path) -> None:
    """ONNX Runtime vs PyTorch parity is recorded for random batches and real records, all ≤ 1e-4."""
    parity = _manifest(exported)["parity"]
    assert {"random_batch_1", "random_batch_7", "random_batch_64"} <= set(parity)
    assert any(k.startswith("real_") for k in parity)
    assert max(parity.values()) <= 1e-4


def test_runtime_scores_like_pytorch_window_average(exported: Path, evaluated_run: tuple[Path, Path]) -> None:
    """The service's runtime (ONNX, 4 windows averaged) equals PyTorch on the same records."""
    data, run = evaluated_run
    runtime = ModelRuntime.load(exported, CPU)
    ckpt = load_checkpoint(run / "checkpoint_best.pt")
    model = FusionModel.from_args(ckpt["model_args"])
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    ecg = np.load(data / "ecg.npy")[:5]
    meta = pd.read_parquet(data / "metadata.parquet").iloc[:5]
    spec = MetadataSpec.model_validate(ckpt["features"]["metadata_spec"])
    keys = [c.key for c in spec.categorical] + list(spec.continuous)
    cat, cont = encode_metadata({k: meta[k].to_numpy(dtype=np.float64) for k in keys}, spec)
    got = runtime.predict_prepared(ecg, cat, cont)
    windows = (
        torch.from_numpy(ecg).permute(0, 2, 1).reshape(5, 12, 4, 250).permute(0, 2, 1, 3).reshape(20, 12, 250)
    )
    with torch.no_grad():
        probs = torch.sigmoid(
            model(
                windows,
                torch.from_numpy(cat).repeat_interleave(4, 0),
                torch.from_numpy(cont).repeat_interleave(4, 0),
            )
        )
    expected = probs.reshape(5, 4, -1).mean(1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_score_cli_writes_one_column_per_label(
    exported: Path, evaluated_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """``ecglab score`` on a DATASET writes one probability column per label, one row per record."""
    data, _ = evaluated_run
    out = tmp_path / "scores.parquet"
    assert (
        main(["score", "--model", str(exported), "--data", str(data), "--out", str(out), *SCORE_ON_CPU]) == 0
    )
    scores = pd.read_parquet(out)
    labels = pd.read_parquet(data / "labels.parquet")
    assert list(scores.columns) == ["study_id", *[c for c in labels.columns if c != "study_id"]]
    assert len(scores) == len(labels)
    assert scores.drop(columns="study_id").to_numpy().min() >= 0.0


def test_export_requires_an_evaluated_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run without metrics.json is refused (exit 2) with a message that says to evaluate it first."""
    (tmp_path / "run").mkdir()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "metrics.json" in err and "ecglab evaluate" in err


def test_export_refuses_to_overwrite_without_force(
    exported: Path, evaluated_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Exporting the same version into the same folder again needs --force (exit 2 otherwise)."""
    _, run = evaluated_run
    assert main(["export", "--run", str(run), "--out", str(exported), "--version", "9.9.9-test"]) == 2
    assert "--force" in capsys.readouterr().err


def test_manifest_records_calibration_rule_and_folds(
    exported: Path, evaluated_run: tuple[Path, Path]
) -> None:
    """Issue 15: per label the val-fold calibration, threshold fold, val AUROC + CI (the card gate) and
    the test-fold AUROC (auroc_fold); the manifest names the threshold and abnormality rules."""
    _, run = evaluated_run
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = load_manifest(exported / "ecglab-9.9.9-test.manifest.json")
    assert manifest.threshold_rule == "youden" and manifest.abnormal_rule == "strict"
    for label in manifest.labels:
        val = metrics["splits"]["val"]["targets"][label.target]
        assert label.calibration is not None and label.calibration.fold == "val"
        fitted = metrics["calibration"]["targets"][label.target]["calibration"]
        assert label.calibration.model_dump(mode="json") == fitted
        assert label.threshold_fold == "val" and label.auroc_fold == "test"
        assert (label.auroc_val, label.auroc_val_ci_low, label.auroc_val_ci_high) == (
            val["auroc"],
            val["ci_low"],
            val["ci_high"],
        )
    evaluation = _manifest(exported)["evaluation"]
    assert evaluation["threshold_fold"] == "val" and "est" in evaluation["calibration"]


def test_runtime_and_score_report_calibrated_probabilities(
    exported: Path, evaluated_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """The service's runtime and ``ecglab score`` give the calibrated probabilities evaluate reported;
    the raw network output is kept as raw_probability."""
    data, run = evaluated_run
    out = tmp_path / "scores.parquet"
    assert (
        main(["score", "--model", str(exported), "--data", str(data), "--out", str(out), *SCORE_ON_CPU]) == 0
    )
    scores = pd.read_parquet(out).set_index("study_id")
    evaluated = pd.read_parquet(run / "predictions_test.parquet").set_index("study_id")
    raw = pd.read_parquet(run / "predictions_test_raw.parquet").set_index("study_id")
    np.testing.assert_allclose(scores.loc[evaluated.index].to_numpy(), evaluated.to_numpy(), atol=1e-4)
    runtime = ModelRuntime.load(exported, CPU)
    first = raw.iloc[0].to_numpy(dtype=np.float32)
    predictions = runtime.to_predictions(first)
    np.testing.assert_allclose([p.probability for p in predictions], evaluated.iloc[0].to_numpy(), atol=1e-6)
    np.testing.assert_allclose([p.raw_probability for p in predictions], first, atol=1e-7)
    gates = [p.gate_auroc_ci_low for p in predictions]
    assert gates == [lab.auroc_val_ci_low for lab in runtime.manifest.labels]

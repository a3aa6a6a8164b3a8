"""ONNX Runtime inference (issue: ONNX export and runtime): manifest checks, providers, windows,
lead order, resampling and imputation — on a hand-built toy graph, so no torch is needed."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cds_service import inference
from cds_service.inference import ModelRuntime, choose_providers
from fhir_mappings.manifest import ManifestError, find_manifest, load_manifest
from fhir_mappings.metadata_encoding import encode_metadata
from fhir_mappings.signal_spec import MODEL_LEADS
from tests.onnx_fixtures import LABELS, MEDIANS, build_toy_model_dir, toy_probabilities

MIMIC_ORDER = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")


@dataclass
class _Ecg:
    signal: np.ndarray
    fs: float
    lead_names: tuple[str, ...]


@dataclass
class _Inputs:
    ecg: _Ecg
    metadata: dict[str, float | None]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    build_toy_model_dir(tmp_path / "model")
    return tmp_path / "model"


def _load_cpu(model_dir: Path) -> ModelRuntime:
    """The runtime on the CPU provider, so that what a test asserts does not depend on the machine's GPU."""
    return ModelRuntime.load(model_dir, ["CPUExecutionProvider"])


def _full_metadata() -> dict[str, float | None]:
    return {"sex": 0.0, "race": 1.0, "age": 71.0, "temperature": 99.1, "heart_rate": 102.0, "resp_rate": 22.0,
            "spo2": 93.0, "sbp": 101.0, "dbp": 60.0, "bmi": 31.0, "weight": 95.0, "height": 175.0}  # fmt: skip


def _ecg_100hz(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, 0.4, (1000, 12)).astype(np.float32)


def test_sha256_mismatch_refuses_to_start(model_dir: Path) -> None:
    onnx_file = next(model_dir.glob("*.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        ModelRuntime.load(model_dir)


def test_manifest_from_another_mapping_version_refuses(tmp_path: Path) -> None:
    build_toy_model_dir(tmp_path / "m", mapping_version="0.0.0-other")
    with pytest.raises(ManifestError, match="fhir_mappings"):
        ModelRuntime.load(tmp_path / "m")


def test_corrupted_onnx_with_matching_hash_refuses(model_dir: Path) -> None:
    manifest_path = find_manifest(model_dir)
    onnx_file = next(model_dir.glob("*.onnx"))
    onnx_file.write_bytes(b"not an onnx model")
    raw = json.loads(manifest_path.read_text())
    from fhir_mappings.manifest import sha256_file

    raw["onnx"]["sha256"] = sha256_file(onnx_file)
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="cannot load"):
        ModelRuntime.load(model_dir)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("unexpected",), 1, "unexpected"),
        (("labels", 0, "target"), "NTproBNP_low_est", "target"),
        (("labels", 0, "horizon_min"), 30, "horizon_min"),
        (("training_data", "source"), "somewhere", "training_data.source"),
        (("metadata", "medians"), {"sex": 1.0}, "metadata"),
    ],
)
def test_manifest_schema_names_the_bad_field(
    model_dir: Path, path: tuple, value: object, message: str
) -> None:
    manifest_path = find_manifest(model_dir)
    raw = json.loads(manifest_path.read_text())
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message):
        load_manifest(manifest_path)


def test_newest_manifest_version_is_served(tmp_path: Path) -> None:
    build_toy_model_dir(tmp_path, version="0.9.0")
    build_toy_model_dir(tmp_path, version="0.10.0")
    assert find_manifest(tmp_path).name == "ecglab-0.10.0.manifest.json"


def test_cpu_provider_chosen_cleanly_when_cuda_is_absent(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(inference, "cuda_unavailable_reason", lambda: "no NVIDIA GPU device on this machine")
    with caplog.at_level(logging.INFO, logger="cds_service.inference"):
        assert choose_providers() == ["CPUExecutionProvider"]
    assert sum("Not using CUDAExecutionProvider" in r.message for r in caplog.records) == 1


def test_cuda_provider_kept_when_cuda_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "cuda_unavailable_reason", lambda: None)
    assert choose_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_default_providers_fall_back_to_cpu_when_cuda_cannot_run(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default list (CUDA, CPU) and no usable GPU, onnxruntime-gpu loads and serves on the CPU.

    "No usable GPU" is simulated, so this is asserted on every machine, GPU or not.
    """
    monkeypatch.setattr(inference, "cuda_unavailable_reason", lambda: "no NVIDIA GPU device on this machine")
    runtime = ModelRuntime.load(model_dir)
    assert runtime.provider == "CPUExecutionProvider"
    predictions = runtime.predict(
        _Inputs(_Ecg(_ecg_100hz(np.random.default_rng(4)), 100.0, MODEL_LEADS), _full_metadata())
    )
    assert len(predictions) == len(LABELS)
    assert all(0.0 <= p.probability <= 1.0 for p in predictions)


def test_cpu_provider_requested_explicitly_is_used_on_any_machine(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ECGLAB_ONNX_PROVIDERS=CPUExecutionProvider`` (the Kubernetes base) runs on the CPU even where a GPU is.

    A usable GPU is simulated, so this is asserted on every machine.
    """
    monkeypatch.setattr(inference, "cuda_unavailable_reason", lambda: None)
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert _load_cpu(model_dir).provider == "CPUExecutionProvider"


def test_cuda_provider_serves_like_the_cpu_when_a_gpu_can_run(model_dir: Path) -> None:
    """On a machine whose GPU onnxruntime-gpu can use, the default list runs on CUDA and scores like the CPU."""
    reason = inference.cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the CUDA provider cannot run here: {reason}")
    gpu = ModelRuntime.load(model_dir)
    assert gpu.provider == "CUDAExecutionProvider"
    inputs = _Inputs(_Ecg(_ecg_100hz(np.random.default_rng(5)), 100.0, MODEL_LEADS), _full_metadata())
    on_gpu = [p.probability for p in gpu.predict(inputs)]
    on_cpu = [p.probability for p in _load_cpu(model_dir).predict(inputs)]
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-5)


def test_windows_are_averaged_per_ecg(model_dir: Path) -> None:
    """Four non-overlapping 250-sample windows; sigmoid probabilities averaged (method §2.2)."""
    runtime = _load_cpu(model_dir)
    rng = np.random.default_rng(0)
    ecg = _ecg_100hz(rng)
    meta = _full_metadata()
    predictions = runtime.predict(_Inputs(_Ecg(ecg, 100.0, MODEL_LEADS), meta))
    cat, cont = encode_metadata({k: [v] for k, v in meta.items()}, runtime.manifest.metadata)
    windows = np.clip(ecg, -3, 3).T.reshape(12, 4, 250).transpose(1, 0, 2)
    expected = toy_probabilities(windows, np.repeat(cat, 4, 0), np.repeat(cont, 4, 0)).mean(axis=0)
    got = np.array([p.probability for p in predictions])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [p.target for p in predictions] == [f"{lab}_{d}_{t}" for lab, d, t in LABELS]
    assert predictions[1].horizon_min == 30 and predictions[2].task == "mon120"


def test_leads_are_matched_by_name_not_position(model_dir: Path) -> None:
    runtime = _load_cpu(model_dir)
    rng = np.random.default_rng(1)
    ecg = _ecg_100hz(rng)
    by_model = runtime.predict(_Inputs(_Ecg(ecg, 100.0, MODEL_LEADS), _full_metadata()))
    order = [MODEL_LEADS.index(name) for name in MIMIC_ORDER]
    by_mimic = runtime.predict(_Inputs(_Ecg(ecg[:, order], 100.0, MIMIC_ORDER), _full_metadata()))
    np.testing.assert_allclose(
        [p.probability for p in by_model], [p.probability for p in by_mimic], atol=1e-6
    )


def test_500hz_input_is_resampled_like_100hz(model_dir: Path) -> None:
    """A slow signal sampled at 500 Hz scores like the same signal sampled at 100 Hz."""
    runtime = _load_cpu(model_dir)
    t100 = np.arange(1000) / 100.0
    t500 = np.arange(5000) / 500.0
    offsets = np.linspace(-0.5, 0.5, 12)
    slow100 = (np.sin(2 * np.pi * 0.3 * t100)[:, None] * 0.3 + offsets).astype(np.float32)
    slow500 = (np.sin(2 * np.pi * 0.3 * t500)[:, None] * 0.3 + offsets).astype(np.float32)
    p100 = runtime.predict(_Inputs(_Ecg(slow100, 100.0, MODEL_LEADS), _full_metadata()))
    p500 = runtime.predict(_Inputs(_Ecg(slow500, 500.0, MODEL_LEADS), _full_metadata()))
    np.testing.assert_allclose([p.probability for p in p100], [p.probability for p in p500], atol=2e-3)


def test_missing_metadata_is_imputed_with_training_medians_and_flagged(model_dir: Path) -> None:
    runtime = _load_cpu(model_dir)
    spec = runtime.manifest.metadata
    meta = _full_metadata() | {"race": None, "temperature": None, "age": None}
    cat, cont = encode_metadata({k: [v] for k, v in meta.items()}, spec)
    assert cat[0, 1] == int(MEDIANS["race"])
    assert cont[0, spec.continuous.index("age")] == MEDIANS["age"]
    assert cont[0, spec.continuous.index("temperature")] == pytest.approx(MEDIANS["temperature"])
    flags = dict(zip(spec.missing_indicators, cont[0, len(spec.continuous) :], strict=True))
    assert flags["race"] == 1.0 and flags["temperature"] == 1.0 and flags["heart_rate"] == 0.0
    # age has no indicator in the paper's model: it is imputed silently
    assert "age" not in spec.missing_indicators


def test_encode_metadata_vectorised_equals_row_by_row(model_dir: Path) -> None:
    runtime = _load_cpu(model_dir)
    spec = runtime.manifest.metadata
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(20):
        row = {k: (None if rng.random() < 0.3 else float(v) + rng.normal()) for k, v in MEDIANS.items()}
        row["sex"] = None if row["sex"] is None else float(rng.integers(0, 2))
        row["race"] = None if row["race"] is None else float(rng.integers(0, 5))
        rows.append(row)
    cat_b, cont_b = encode_metadata(
        {k: np.array([np.nan if r[k] is None else r[k] for r in rows]) for k in MEDIANS}, spec
    )
    for i, row in enumerate(rows):
        cat_1, cont_1 = encode_metadata({k: [v] for k, v in row.items()}, spec)
        np.testing.assert_array_equal(cat_b[i], cat_1[0])
        np.testing.assert_allclose(cont_b[i], cont_1[0])


def test_decision_threshold_from_manifest_marks_positive(tmp_path: Path) -> None:
    build_toy_model_dir(tmp_path / "m", decision_threshold=0.0)
    runtime = _load_cpu(tmp_path / "m")
    rng = np.random.default_rng(2)
    predictions = runtime.predict(_Inputs(_Ecg(_ecg_100hz(rng), 100.0, MODEL_LEADS), _full_metadata()))
    assert all(p.positive and p.decision_threshold == 0.0 for p in predictions)

"""Int8 model variant (issue 18): ``ecglab quantize`` on the toy graph and a tiny labelled DATASET,
the manifest's ``variants`` entry, SHA-256 checks, parity/accuracy figures and the ``auto`` choice."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper

from cds_service.cli import main
from cds_service.inference import ModelRuntime, choose_variant
from fhir_mappings.manifest import (
    Manifest,
    ManifestError,
    VariantSpec,
    find_manifest,
    load_manifest,
    sha256_file,
)
from model_training import quantize
from model_training.quantize import heavy_layers, judge, prepare_graph, quantize_model
from tests.onnx_fixtures import CONTINUOUS, LABELS, build_toy_model_dir, toy_probabilities

ROOT = Path(__file__).resolve().parents[2]
TARGETS = [f"{label}_{direction}_{task}" for label, direction, task in LABELS]
FOLDS = [*range(18)] * 4 + [18] * 30 + [19] * 40  # 72 training, 30 validation, 40 test ECGs


def build_dataset(root: Path, seed: int = 0) -> Path:
    """A tiny preprocessed DATASET whose labels follow the toy graph's own probabilities.

    Each ECG carries a per-lead offset, so the toy model separates the classes well (AUROC well
    above chance) and int8 rounding has something real to disturb. The first two targets are
    listed as planted in ``dataset.json``.
    """
    rng = np.random.default_rng(seed)
    n = len(FOLDS)
    offsets = rng.normal(0.0, 0.6, (n, 1, 12)).astype(np.float32)
    ecg = (offsets + rng.normal(0.0, 0.3, (n, 1000, 12))).astype(np.float32)
    metadata = pd.DataFrame(
        {"study_id": np.arange(n), "sex": rng.integers(0, 2, n), "race": rng.integers(0, 5, n)}
    )
    for key in CONTINUOUS:
        metadata[key] = rng.normal(80.0, 15.0, n)
    metadata.loc[::7, "heart_rate"] = np.nan
    windows = ecg.transpose(0, 2, 1).reshape(n, 12, 4, 250).transpose(0, 2, 1, 3).reshape(-1, 12, 250)
    probs = toy_probabilities(windows, np.zeros((len(windows), 2)), np.zeros((len(windows), 20), np.float32))
    labels = (rng.random((n, len(TARGETS))) < probs.reshape(n, 4, -1).mean(axis=1)).astype(np.float32)
    root.mkdir(parents=True)
    np.save(root / "ecg.npy", ecg)
    pd.DataFrame(
        {
            "study_id": np.arange(n),
            "subject_id": np.arange(n) + 1000,
            "ecg_time": pd.Timestamp("2180-01-01"),
            "strat_fold": FOLDS,
        }
    ).to_parquet(root / "records.parquet")
    metadata.to_parquet(root / "metadata.parquet")
    pd.DataFrame({"study_id": np.arange(n), **dict(zip(TARGETS, labels.T, strict=True))}).to_parquet(
        root / "labels.parquet"
    )
    (root / "dataset.json").write_text(json.dumps({"generator": {"planted_targets": TARGETS[:2]}}))
    return root


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A toy model folder quantised in place: (model folder, DATASET, fp32 SHA-256 before)."""
    base = tmp_path_factory.mktemp("quantize")
    model_dir = base / "model"
    build_toy_model_dir(model_dir)
    data = build_dataset(base / "data")
    before = sha256_file(next(model_dir.glob("ecglab-0.0.1.onnx")))
    quantize_model(model_dir, data, calibration_windows=64)
    return model_dir, data, before


def test_the_variant_is_written_beside_the_fp32_file_and_listed_in_the_manifest(
    quantized: tuple[Path, Path, str],
) -> None:
    """The int8 file sits next to the fp32 one, which is unchanged; the manifest names it with its hash."""
    model_dir, _, before = quantized
    manifest = load_manifest(find_manifest(model_dir), verify_file=True)
    assert sha256_file(model_dir / manifest.onnx.file) == before == manifest.onnx.sha256
    spec = manifest.variants["int8"]
    assert spec.file == "ecglab-0.0.1.int8.onnx"
    assert spec.sha256 == sha256_file(model_dir / spec.file)
    assert spec.precision == "int8" and "QDQ" in spec.method
    assert spec.calibration["fold"] == 18 and spec.calibration["windows"] == 64
    graph = onnx.load(str(model_dir / spec.file))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [
        n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")
    ]
    assert weights, "no quantised weight"
    assert not list(model_dir.glob(".quantize-*")), "the staging folder was left behind"


def test_parity_and_accuracy_figures_are_recorded_and_judged(quantized: tuple[Path, Path, str]) -> None:
    """Random and real parity, AUROC of both graphs and the bounds verdict are in the manifest."""
    model_dir, _, _ = quantized
    spec = load_manifest(find_manifest(model_dir)).variants["int8"]
    assert set(spec.parity) >= {"random_batch_1", "random_batch_7", "random_batch_64", "real_40_records"}
    assert all(0.0 <= value < 1.0 for value in spec.parity.values())
    assert spec.parity["real_40_records"] < 0.1
    acc = spec.accuracy
    assert acc["test_planted_targets"] == 2 and acc["test_all_targets"] == 3
    assert acc["test_planted_auroc_fp32"] is not None and acc["test_planted_auroc_fp32"] > 0.7
    diff = acc["test_planted_auroc_diff"]
    assert (
        diff is not None
        and abs(diff - (acc["test_planted_auroc_int8"] - acc["test_planted_auroc_fp32"])) < 1e-12
    )
    assert spec.bounds == {"max_auroc_diff": 0.005, "max_probability_diff": 0.02}
    expected = abs(diff) <= 0.005 and spec.parity["real_40_records"] <= 0.02
    assert spec.meets_bounds is expected
    assert spec.speed["fp32_cpu_ms_p50"] > 0 and spec.speed["int8_cpu_ms_p50"] > 0
    assert spec.speedup_vs_fp32 == pytest.approx(
        spec.speed["fp32_cpu_ms_p50"] / spec.speed["int8_cpu_ms_p50"]
    )


def test_judge_applies_both_bounds() -> None:
    """meets_bounds: |ΔAUROC| ≤ 0.005 on planted (else all) targets and real max |Δp| ≤ 0.02."""
    parity = {"random_batch_1": 0.5, "real_10_records": 0.01}
    planted = {"test_planted_auroc_diff": -0.004, "test_all_auroc_diff": -0.05}
    assert judge(planted, parity, {"test_": True})
    assert not judge(planted, parity, {"test_": False})  # the all-target difference is judged then
    assert not judge({"test_planted_auroc_diff": 0.006}, parity, {"test_": True})
    assert not judge(planted, {"real_10_records": 0.03}, {"test_": True})
    assert not judge({"test_planted_auroc_diff": None}, parity, {"test_": True})
    assert not judge(planted, {"real_10_records": 0.01, "check_5_records": 0.021}, {"test_": True})


def test_the_runtime_serves_the_variant_and_checks_its_hash(
    quantized: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """``variant="int8"`` opens the int8 file; a damaged or missing variant file refuses to load."""
    import shutil

    model_dir, _, _ = quantized
    fp32 = ModelRuntime.load(model_dir, ["CPUExecutionProvider"])
    int8 = ModelRuntime.load(model_dir, ["CPUExecutionProvider"], variant="int8")
    assert (fp32.variant, int8.variant) == ("fp32", "int8")
    assert int8.model_path.name == "ecglab-0.0.1.int8.onnx"
    rng = np.random.default_rng(1)
    ecg = rng.normal(0.3, 0.3, (2, 1000, 12)).astype(np.float32)
    cat, cont = np.array([[1, 4], [0, 2]]), rng.normal(0, 1, (2, 20)).astype(np.float32)
    p32, p8 = fp32.predict_prepared(ecg, cat, cont), int8.predict_prepared(ecg, cat, cont)
    assert np.abs(p32 - p8).max() < 0.05

    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    variant_file = damaged / "ecglab-0.0.1.int8.onnx"
    variant_file.write_bytes(variant_file.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match=r"sha256.*variants\.int8"):
        ModelRuntime.load(damaged, ["CPUExecutionProvider"], variant="int8")
    assert ModelRuntime.load(damaged, ["CPUExecutionProvider"], variant="fp32").variant == "fp32"
    variant_file.unlink()
    with pytest.raises(ManifestError, match=r"variants\.int8\.file"):
        ModelRuntime.load(damaged, ["CPUExecutionProvider"], variant="int8")
    with pytest.raises(ManifestError, match="not one of"):
        ModelRuntime.load(damaged, ["CPUExecutionProvider"], variant="fp16")


def _variant(meets: bool, speedup: float | None) -> VariantSpec:
    return VariantSpec(
        file="x.int8.onnx",
        sha256="0" * 64,
        precision="int8",
        method="test",
        created="2026-01-01T00:00:00Z",
        speed={} if speedup is None else {"speedup_vs_fp32": speedup},
        meets_bounds=meets,
    )


def test_auto_takes_the_fastest_variant_within_bounds_on_cpu_else_fp32(
    quantized: tuple[Path, Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    """auto: fastest qualifying variant on the CPU provider; fp32 when none qualifies or on a GPU."""
    base = load_manifest(find_manifest(quantized[0]))

    def with_variants(**variants: VariantSpec) -> Manifest:
        return base.model_copy(update={"variants": variants})

    assert choose_variant(with_variants(int8=_variant(True, 1.8)), "auto") == "int8"
    assert (
        choose_variant(with_variants(int8=_variant(True, 1.2), int8b=_variant(True, 2.5)), "auto") == "int8b"
    )
    assert (
        choose_variant(with_variants(int8=_variant(False, 3.0), int8b=_variant(True, 1.1)), "auto") == "int8b"
    )
    assert choose_variant(with_variants(int8=_variant(False, 3.0)), "auto") == "fp32"
    assert choose_variant(with_variants(int8=_variant(True, 0.9)), "auto") == "fp32"
    assert choose_variant(with_variants(int8=_variant(True, None)), "auto") == "fp32"
    assert choose_variant(with_variants(), "auto") == "fp32"
    assert choose_variant(with_variants(int8=_variant(True, 1.8)), "auto", "CUDAExecutionProvider") == "fp32"
    assert choose_variant(with_variants(int8=_variant(True, 1.8)), "fp32") == "fp32"
    with caplog.at_level(logging.WARNING):
        assert choose_variant(with_variants(int8=_variant(False, 1.8)), "int8") == "int8"
    assert "missed its accuracy bounds" in caplog.text
    with pytest.raises(ManifestError, match="ecglab quantize"):
        choose_variant(with_variants(), "int8")


def test_auto_loads_what_the_manifest_qualifies(quantized: tuple[Path, Path, str], tmp_path: Path) -> None:
    """``ModelRuntime.load(variant="auto")`` follows choose_variant on the manifest as written."""
    model_dir = quantized[0]
    spec = load_manifest(find_manifest(model_dir)).variants["int8"]
    runtime = ModelRuntime.load(model_dir, ["CPUExecutionProvider"], variant="auto")
    qualifies = spec.meets_bounds and (spec.speedup_vs_fp32 or 0.0) > 1.0
    assert runtime.variant == ("int8" if qualifies else "fp32")


def test_manifests_without_variants_still_load_and_bad_variant_names_are_refused() -> None:
    """Old manifests (the bundled one's fp32 part) load unchanged; 'fp32'/'auto' are no variant names."""
    path = find_manifest(ROOT / "models")
    raw = json.loads(path.read_text())
    raw.pop("variants", None)
    assert Manifest.model_validate(raw).variants == {}
    entry = _variant(True, 2.0).model_dump(mode="json")
    for name in ("fp32", "auto", "not a name"):
        with pytest.raises(ValueError, match="reserved"):
            Manifest.model_validate({**raw, "variants": {name: entry}})
    with pytest.raises(ValueError, match="fp32 file"):
        Manifest.model_validate({**raw, "variants": {"int8": {**entry, "file": raw["onnx"]["file"]}}})


def test_cli_writes_into_another_folder_and_refuses_to_overwrite(
    quantized: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ecglab quantize --out DIR`` copies the fp32 file byte for byte; a second run needs --force."""
    _, data, before = quantized
    source = tmp_path / "src"
    build_toy_model_dir(source)
    out = tmp_path / "out"
    args = ["quantize", "--model", str(source), "--data", str(data), "--out", str(out)]
    assert main([*args, "--calibration-windows", "40", "--check-data", str(data)]) == 0
    assert "meets bounds" in capsys.readouterr().out
    assert sha256_file(out / "ecglab-0.0.1.onnx") == before
    spec = load_manifest(find_manifest(out)).variants["int8"]
    assert spec.calibration["windows"] == 40
    assert "check_40_records" in spec.parity and spec.accuracy["check_planted_auroc_diff"] is not None
    assert "variants" not in json.loads(find_manifest(source).read_text())
    assert main(["quantize", "--model", str(out), "--data", str(data)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["quantize", "--model", str(out), "--data", str(data), "--force"]) == 0


def test_a_dataset_without_a_validation_fold_is_refused(
    quantized: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """Calibration needs fold 18: without it the command stops with the file named."""
    data = build_dataset(tmp_path / "nofold")
    records = pd.read_parquet(data / "records.parquet")
    records["strat_fold"] = records["strat_fold"].replace(18, 17)
    records.to_parquet(data / "records.parquet")
    build_toy_model_dir(tmp_path / "m")
    assert main(["quantize", "--model", str(tmp_path / "m"), "--data", str(data)]) == 2


def test_prepare_graph_moves_left_weights_right_without_changing_the_numbers(tmp_path: Path) -> None:
    """``W @ X`` (channel-first dense layer) becomes ``(Xᵀ @ Wᵀ)ᵀ``; outputs agree to float precision."""
    rng = np.random.default_rng(0)
    w_left = rng.normal(0, 1, (6, 4)).astype(np.float32)
    w_right = rng.normal(0, 1, (5, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["w_left", "x"], ["h"], name="left"),  # (B, 6, 5)
            helper.make_node("MatMul", ["h", "w_right"], ["y"], name="right"),  # (B, 6, 3)
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, 3])],
        [numpy_helper.from_array(w_left, "w_left"), numpy_helper.from_array(w_right, "w_right")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    prepared, dense = prepare_graph(model)
    assert dense == ["left/weight_right", "right"]
    inits = {i.name: list(i.dims) for i in prepared.graph.initializer}
    assert inits == {"w_right": [5, 3], "w_left.T": [4, 6]}
    assert heavy_layers(prepared, dense) == dense  # both carry well over 1 % of the multiply-adds
    x = rng.normal(0, 1, (3, 4, 5)).astype(np.float32)
    outs = []
    for m in (model, prepared):
        path = tmp_path / f"{len(outs)}.onnx"
        onnx.save(m, str(path))
        outs.append(
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        )
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_heavy_layers_keeps_small_layers_in_float() -> None:
    """A layer with under 1 % of the dense multiply-adds is left out of quantisation."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "big"], ["h"], name="big_layer"),
            helper.make_node("MatMul", ["h", "small"], ["y"], name="small_layer"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [
            numpy_helper.from_array(rng.normal(0, 1, (256, 256)).astype(np.float32), "big"),
            numpy_helper.from_array(rng.normal(0, 1, (256, 1)).astype(np.float32), "small"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert heavy_layers(model, ["big_layer", "small_layer"]) == ["big_layer"]
    assert quantize.MIN_FLOP_SHARE == 0.01


def test_inference_benchmark_prints_int8_and_batched_serving_figures(
    quantized: tuple[Path, Path, str],
) -> None:
    """``benchmarks/inference.py`` times the int8 variant beside fp32 and the micro-batcher under 16 threads."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "inference.py"), "--quick", "--model", str(quantized[0])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    names = [
        "inference_cpu_int8_ecg_latency_ms_p50",
        "inference_cpu_int8_onnx_only_ms_p50",
        "inference_cpu_int8_flop_floor_ratio",
        "inference_cpu_int8_speedup",
        "inference_cpu_int8_batch64_ecg_per_s",
        "batched_serving_ecg_per_s",
        "batched_serving_latency_ms_p99",
        "batched_serving_mean_batch",
        "batched_serving_ceiling_ratio",
    ]
    for name in names:
        assert float(figures[name]) > 0, name
    assert 1 <= float(figures["batched_serving_mean_batch"]) <= 16
    assert "int8" not in figures  # the "int8: not available" line is for models without the variant

"""A tiny hand-built ONNX model + manifest, so runtime tests need neither torch nor a training run.

The graph has the exported model's interface (``ecg`` (B, 12, 250), ``cat`` (B, 2) int64,
``cont`` (B, 20) → ``probabilities`` (B, n)) and a transparent formula, so a test can compute the
expected probabilities by hand:

    p[:, j] = sigmoid(a_j · mean(ecg over leads and time, lead j mod 12 only) + b_j · cont[:, j mod 20] + c_j · cat[:, 0])
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fhir_mappings import load_mappings
from fhir_mappings.manifest import sha256_file
from fhir_mappings.signal_spec import MODEL_LEADS

CONTINUOUS = list(load_mappings().continuous_keys)
INDICATORS = list(load_mappings().missing_indicator_keys)
MEDIANS = {
    "sex": 1.0, "race": 4.0, "age": 60.0, "temperature": 98.1, "heart_rate": 84.0, "resp_rate": 18.0,
    "spo2": 98.0, "sbp": 132.0, "dbp": 76.0, "bmi": 27.5, "weight": 80.0, "height": 170.0,
}  # fmt: skip
LABELS = [("NTproBNP", "high", "est"), ("Hemoglobin", "high", "mon30"), ("Potassium", "high", "mon120")]


def toy_weights(n_labels: int = len(LABELS)) -> dict[str, np.ndarray]:
    """The fixed coefficients of the toy graph (lead selector, metadata weights)."""
    rng = np.random.default_rng(7)
    lead_sel = np.zeros((12, n_labels), dtype=np.float32)
    for j in range(n_labels):
        lead_sel[j % 12, j] = 1.0
    return {
        "lead_sel": lead_sel,
        "a": rng.normal(2.0, 0.5, n_labels).astype(np.float32),
        "b": (rng.normal(0.0, 0.02, (20, n_labels))).astype(np.float32),
        "c": rng.normal(0.0, 0.3, n_labels).astype(np.float32),
    }


def toy_probabilities(ecg: np.ndarray, cat: np.ndarray, cont: np.ndarray) -> np.ndarray:
    """NumPy reference of the toy graph for (B, 12, 250) windows."""
    w = toy_weights()
    lead_means = ecg.mean(axis=2)  # (B, 12)
    z = (lead_means @ w["lead_sel"]) * w["a"] + cont @ w["b"] + cat[:, :1].astype(np.float32) * w["c"]
    return 1.0 / (1.0 + np.exp(-z))


def build_toy_onnx(path: Path) -> None:
    """Write the toy graph to ``path``."""
    w = toy_weights()
    n = w["a"].shape[0]
    nodes = [
        helper.make_node("ReduceMean", ["ecg", "axes2"], ["lead_means"], keepdims=0),  # (B, 12)
        helper.make_node("MatMul", ["lead_means", "lead_sel"], ["sel"]),  # (B, n)
        helper.make_node("Mul", ["sel", "a"], ["ecg_term"]),
        helper.make_node("MatMul", ["cont", "b"], ["cont_term"]),
        helper.make_node("Slice", ["cat", "zero", "one", "one"], ["sex"]),  # (B, 1)
        helper.make_node("Cast", ["sex"], ["sex_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["sex_f", "c"], ["cat_term"]),
        helper.make_node("Add", ["ecg_term", "cont_term"], ["z0"]),
        helper.make_node("Add", ["z0", "cat_term"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["probabilities"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axes2"),
        numpy_helper.from_array(w["lead_sel"], "lead_sel"),
        numpy_helper.from_array(w["a"], "a"),
        numpy_helper.from_array(w["b"], "b"),
        numpy_helper.from_array(w["c"], "c"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [
            helper.make_tensor_value_info("ecg", TensorProto.FLOAT, ["batch", 12, 250]),
            helper.make_tensor_value_info("cat", TensorProto.INT64, ["batch", 2]),
            helper.make_tensor_value_info("cont", TensorProto.FLOAT, ["batch", 20]),
        ],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def build_toy_model_dir(
    directory: Path,
    *,
    version: str = "0.0.1",
    mapping_version: str | None = None,
    source: str = "synthetic",
    decision_threshold: float = 0.5,
) -> Path:
    """Write ``ecglab-<version>.onnx`` + manifest into ``directory``; return the manifest path."""
    if mapping_version is None:
        from fhir_mappings import MAPPING_VERSION

        mapping_version = MAPPING_VERSION
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / f"ecglab-{version}.onnx"
    build_toy_onnx(onnx_path)
    labels = [
        {
            "target": f"{label}_{direction}_{task}", "label": label, "lab_key": label.lower(),
            "order_code": None, "direction": direction, "task": task,
            "horizon_min": {"est": 0, "mon30": 30, "mon60": 60, "mon120": 120}[task],
            "value_threshold": None, "unit": None, "decision_threshold": decision_threshold,
            "threshold_rule": "fixed", "auroc": 0.9, "ci_low": 0.85, "ci_high": 0.95, "n_pos": 10, "n_neg": 30,
        }
        for label, direction, task in LABELS
    ]  # fmt: skip
    manifest = {
        "format": 1,
        "name": "ecglab",
        "version": version,
        "created": "2026-11-26T00:00:00Z",
        "intended_use": "test fixture; not for clinical use",
        "training_data": {"source": source, "versions": {}, "details": {}},
        "mapping_version": mapping_version,
        "onnx": {
            "file": onnx_path.name,
            "sha256": sha256_file(onnx_path),
            "opset": 18,
            "inputs": [
                {"name": "ecg", "dtype": "float32", "shape": [None, 12, 250]},
                {"name": "cat", "dtype": "int64", "shape": [None, 2]},
                {"name": "cont", "dtype": "float32", "shape": [None, 20]},
            ],
            "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [None, len(labels)]}],
        },
        "ecg": {
            "sampling_rate_hz": 100.0,
            "duration_s": 10.0,
            "window": 250,
            "n_windows": 4,
            "aggregation": "mean",
            "lead_order": list(MODEL_LEADS),
            "units": "mV",
            "clip_mv": 3.0,
        },
        "metadata": {
            "categorical": [
                {"key": "sex", "categories": ["female", "male"]},
                {"key": "race", "categories": ["asian", "black", "hispanic", "other", "white"]},
            ],
            "continuous": CONTINUOUS,
            "missing_indicators": INDICATORS,
            "medians": MEDIANS,
        },
        "labels": labels,
    }
    path = directory / f"ecglab-{version}.manifest.json"
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return path

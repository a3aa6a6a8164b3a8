"""``ecglab quantize``: an int8 copy of an exported model, listed in its manifest with its own figures.

The service spends most of an ECG's time in the dense layers (the input linear, each S4 block's
H→2H projection, the metadata MLP and the head). ONNX Runtime's static quantisation runs them as
int8 GEMMs, which on a CPU with VNNI do several times the multiply-adds of float32 per cycle. What
this module does, in order:

1. **Graph preparation.** The ECG branch is channel-first, so its dense layers are ``W @ X`` with
   the weight as the *first* MatMul input; ONNX Runtime's int8 MatMul kernels take per-channel
   scales only on the second input. Each such node becomes ``Transpose(Transpose(X) @ Wᵀ)`` (the
   same numbers in float32; checked below), so every dense weight is quantised per output channel.
2. **Calibration.** Activation ranges come from the validation fold (``strat_fold`` 18) of a
   preprocessed DATASET: a few hundred windows (default 384, i.e. 96 ECGs × 4 windows), cut and
   encoded exactly as the service does (non-overlapping windows, the manifest's metadata medians).
3. **Quantisation.** ``onnxruntime.quantization.quantize_static`` in QDQ format (so the CUDA and
   TensorRT providers can run the same file), int8 symmetric per-channel weights, uint8 input
   activations, MinMax calibration, outputs left in float32 (ONNX Runtime's CPU provider then
   runs ``MatMulIntegerToFloat``, which skips a lossy requantisation), and only the heavy dense
   layers (:func:`heavy_layers`). The S4 convolution's per-channel chunk matrices stay float32:
   ONNX Runtime's int8 MatMul takes no per-channel scales on a 3-D weight, and one scale for all
   512 channels' kernels would cost accuracy.
4. **Figures.** max |p_int8 − p_fp32| on random inputs (windows) and on the test fold's ECGs
   (``strat_fold`` 19, window-averaged and calibrated as served), per-target test-fold AUROC of both graphs with
   the planted-target and all-target macro differences when the DATASET carries the generator's
   planted list (optionally on the test fold of a second labelled DATASET too, e.g. one from a
   fresh generator seed), and
   the CPU latency of one ECG for both graphs timed side by side.
5. **Publication.** ``ecglab-<version>.int8.onnx`` beside the fp32 file and a ``variants.int8``
   entry in the manifest (file, SHA-256, the figures, the bounds, ``meets_bounds``). The fp32
   ONNX file is never rewritten; with ``--out`` elsewhere it is copied there byte for byte.

Bounds (issue 18): planted-target macro AUROC within 0.005 of fp32 (all-target macro when no
planted list exists) and ECG probabilities within 0.02. ``meets_bounds`` says whether both held;
the service's ``ECGLAB_MODEL_VARIANT=auto`` serves the variant only then.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fhir_mappings.errors import InputError
from fhir_mappings.manifest import Manifest, VariantSpec, find_manifest, load_manifest, sha256_file

log = logging.getLogger(__name__)

VARIANT = "int8"
VAL_FOLD = 18
TEST_FOLD = 19
DEFAULT_CALIBRATION_WINDOWS = 384
CALIBRATION_BATCH = 32
RANDOM_PARITY_BATCHES = (1, 7, 64)
MIN_FLOP_SHARE = 0.01
MAX_AUROC_DIFF = 0.005
MAX_PROBABILITY_DIFF = 0.02
TIMING_ROUNDS = 30
METHOD = (
    "onnxruntime quantize_static, QDQ, int8 symmetric per-channel weights, uint8 activation inputs, "
    "float outputs, MinMax calibration; the dense layers with >= 1 % of the dense FLOPs each"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ecglab quantize`` flags."""
    parser.add_argument(
        "--model", type=Path, required=True, help="folder (or manifest) of the exported model"
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="preprocessed DATASET: fold 18 calibrates, fold 19 measures parity and AUROC",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder to write into (default: the model's own folder)"
    )
    parser.add_argument(
        "--calibration-windows",
        type=int,
        default=DEFAULT_CALIBRATION_WINDOWS,
        help=f"validation-fold windows to calibrate on (default {DEFAULT_CALIBRATION_WINDOWS})",
    )
    parser.add_argument(
        "--check-data",
        type=Path,
        default=None,
        help="a second labelled DATASET (e.g. a fresh generator seed) whose fold 19 is judged too",
    )
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: all cores)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the calibration sample and random inputs"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing int8 variant")


def run(args: argparse.Namespace) -> int:
    """Quantise, measure, publish; print one summary line."""
    if args.calibration_windows < 1:
        raise InputError("--calibration-windows must be at least 1")
    result = quantize_model(
        args.model,
        args.data,
        out=args.out,
        calibration_windows=args.calibration_windows,
        check_data=args.check_data,
        threads=args.threads,
        seed=args.seed,
        force=args.force,
    )
    spec = result.variant
    print(
        f"int8 variant {spec.file}: parity {json.dumps(spec.parity)}; accuracy {json.dumps(spec.accuracy)}; "
        f"speed {json.dumps(spec.speed)}; meets bounds: {spec.meets_bounds} → {result.manifest_path}"
    )
    return 0


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_model` wrote: the manifest, the int8 file and its manifest entry."""

    manifest_path: Path
    onnx_path: Path
    variant: VariantSpec


# --------------------------------------------------------------------------------------------------
# Graph preparation
# --------------------------------------------------------------------------------------------------
def prepare_graph(model: Any) -> tuple[Any, list[str]]:
    """Move every dense weight to the right-hand MatMul input; return the model and the dense nodes.

    Dense nodes are ``MatMul``/``Gemm`` with a 2-D weight initializer (the benchmarks count the
    same). ``W @ X`` with a 2-D ``W`` becomes ``Transpose(Transpose(X) @ Wᵀ)`` over X's last two
    axes; shape inference must know X's rank, else the node stays as it is and is not quantised.
    Unnamed nodes get a name (quantisation selects nodes by name). The dense nodes come back in
    graph order.
    """
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        if v.type.tensor_type.HasField("shape")
    }
    weights = {init.name: init for init in model.graph.initializer if len(init.dims) == 2}
    nodes, dense, added = [], [], []
    taken = {node.name for node in model.graph.node}
    for index, original in enumerate(model.graph.node):
        node = onnx.NodeProto()
        node.CopyFrom(original)
        if not node.name:
            node.name = next(
                n for n in (f"{node.op_type}_{index}", f"{node.op_type}_{index}_n") if n not in taken
            )
        if node.op_type not in ("MatMul", "Gemm"):
            nodes.append(node)
            continue
        a, b = node.input[0], node.input[1]
        if b in weights:
            nodes.append(node)
            dense.append(node.name)
        elif node.op_type == "MatMul" and a in weights and ranks.get(b, 0) >= 2:
            rank = ranks[b]
            perm = [*range(rank - 2), rank - 1, rank - 2]
            stem = node.name
            w_t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weights[a]).T), f"{a}.T")
            added.append(w_t)
            x_t, y_t = f"{stem}/x_t", f"{stem}/y_t"
            nodes.append(helper.make_node("Transpose", [b], [x_t], perm=perm, name=f"{stem}/transpose_in"))
            nodes.append(helper.make_node("MatMul", [x_t, w_t.name], [y_t], name=f"{stem}/weight_right"))
            nodes.append(
                helper.make_node(
                    "Transpose", [y_t], [node.output[0]], perm=perm, name=f"{stem}/transpose_out"
                )
            )
            dense.append(f"{stem}/weight_right")
        else:
            nodes.append(node)
    used = {name for node in nodes for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    out.graph.initializer.extend([*kept, *added])
    del out.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(out), dense


def heavy_layers(model: Any, dense: Sequence[str]) -> list[str]:
    """The ``dense`` nodes that each carry at least ``MIN_FLOP_SHARE`` of the dense multiply-adds.

    Counted for one input row (batch axes fixed to 1, shapes propagated through the graph's
    Reshapes). In the exported model these are the S4 blocks' H→2H projections (≈ 99 % of the
    dense FLOPs); the input linear, the metadata MLP and the head stay float32: together they cost
    under 1 %, and they are where int8 loses most (the head reads a concatenation of differently
    scaled features through one activation scale).
    """
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.output]
    }
    weights = {init.name: list(init.dims) for init in model.graph.initializer if len(init.dims) == 2}
    macs: dict[str, int] = {}
    for node in inferred.graph.node:
        if node.name not in dense:
            continue
        out = shapes.get(node.output[0], [])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        k = weights[node.input[1]][1 if attrs.get("transB", 0) else 0]
        macs[node.name] = int(np.prod(out)) * k if out and min(out) > 0 else 0
    total = sum(macs.values())
    if total == 0:
        return list(dense)
    return [name for name in dense if macs.get(name, 0) >= MIN_FLOP_SHARE * total]


# --------------------------------------------------------------------------------------------------
# Data: windows and encoded metadata as the service feeds them
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldInputs:
    """One fold's ECGs as network inputs: windows (N·W, 12, window) and per-window metadata."""

    windows: np.ndarray
    cat: np.ndarray
    cont: np.ndarray
    labels: np.ndarray  # (N, K) 1/0/NaN in ``targets`` order
    targets: list[str]  # the model's targets the DATASET has, in model output order
    outputs: list[int]  # their columns in the model's output
    n_windows: int

    @property
    def n_ecgs(self) -> int:
        """ECGs in the fold."""
        return len(self.labels)


def fold_inputs(dataset: Any, rows: np.ndarray, manifest: Manifest) -> FoldInputs:
    """Cut ``rows`` of a loaded DATASET into the manifest's windows and encode their metadata."""
    from model_training.data import encode_features

    spec = manifest.ecg
    needed = spec.window * spec.n_windows
    ecg = np.asarray(dataset.ecg[rows], dtype=np.float32)
    if ecg.shape[1] < needed:
        raise InputError(
            f"{dataset.root / 'ecg.npy'}: {ecg.shape[1]} samples per ECG, the model needs {needed}"
        )
    x = ecg[:, :needed].transpose(0, 2, 1)  # (N, 12, W*window)
    windows = x.reshape(len(rows), x.shape[1], spec.n_windows, spec.window).transpose(0, 2, 1, 3)
    cat, cont = encode_features(dataset.metadata.iloc[rows], manifest.metadata)
    known = [lab.target for lab in manifest.labels]
    outputs = [i for i, t in enumerate(known) if t in dataset.targets]
    targets = [known[i] for i in outputs]
    columns = [dataset.targets.index(t) for t in targets]
    return FoldInputs(
        windows=np.ascontiguousarray(windows.reshape(-1, x.shape[1], spec.window)),
        cat=np.repeat(cat, spec.n_windows, axis=0),
        cont=np.repeat(cont, spec.n_windows, axis=0).astype(np.float32),
        labels=dataset.labels[rows][:, columns],
        targets=targets,
        outputs=outputs,
        n_windows=spec.n_windows,
    )


def fold_rows(dataset: Any, fold: int) -> np.ndarray:
    """Row indices of ``strat_fold == fold``; InputError when there are none."""
    rows = np.asarray(dataset.rows_in([fold]))
    if rows.size == 0:
        raise InputError(f"{dataset.root / 'records.parquet'}: no ECG in strat_fold {fold}")
    return rows


class _CalibrationReader:
    """``CalibrationDataReader`` over fixed feeds, ``CALIBRATION_BATCH`` windows at a time."""

    def __init__(self, names: Sequence[str], inputs: FoldInputs) -> None:
        feeds = []
        for i in range(0, len(inputs.windows), CALIBRATION_BATCH):
            part = slice(i, i + CALIBRATION_BATCH)
            feeds.append(
                dict(zip(names, (inputs.windows[part], inputs.cat[part], inputs.cont[part]), strict=True))
            )
        self._batches: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def calibration_inputs(dataset: Any, manifest: Manifest, windows: int, seed: int) -> FoldInputs:
    """A seeded sample of validation-fold ECGs holding ``windows`` windows (fewer if the fold is small)."""
    rows = fold_rows(dataset, VAL_FOLD)
    n_ecgs = min(len(rows), -(-windows // manifest.ecg.n_windows))
    chosen = np.sort(np.random.default_rng(seed).choice(rows, size=n_ecgs, replace=False))
    return fold_inputs(dataset, chosen, manifest)


# --------------------------------------------------------------------------------------------------
# Sessions and figures
# --------------------------------------------------------------------------------------------------
def open_session(path: Path, threads: int) -> Any:
    """A CPU ONNX Runtime session with the service's options (all graph optimisations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_windows(
    session: Any, names: Sequence[str], windows: np.ndarray, cat: np.ndarray, cont: np.ndarray
) -> np.ndarray:
    """Per-window probabilities, 256 windows per call."""
    parts = []
    for i in range(0, len(windows), 256):
        feeds = dict(zip(names, (windows[i : i + 256], cat[i : i + 256], cont[i : i + 256]), strict=True))
        parts.append(session.run(None, feeds)[0])
    return np.concatenate(parts)


def ecg_probabilities(session: Any, names: Sequence[str], inputs: FoldInputs) -> np.ndarray:
    """Per-ECG probabilities: the windows' mean, as the service aggregates them."""
    probs = run_windows(session, names, inputs.windows, inputs.cat, inputs.cont)
    return probs.reshape(inputs.n_ecgs, inputs.n_windows, -1).mean(axis=1)


def random_parity(fp32: Any, int8: Any, manifest: Manifest, seed: int) -> dict[str, float]:
    """max |p_int8 − p_fp32| on random windows (ECG-like amplitudes, valid codes) per batch size."""
    rng = np.random.default_rng(seed)
    names = [i.name for i in manifest.onnx.inputs]
    sizes = [len(c.categories) for c in manifest.metadata.categorical]
    n_cont = manifest.onnx.inputs[2].shape[1] or 0
    out = {}
    for batch in RANDOM_PARITY_BATCHES:
        ecg = (0.5 * rng.standard_normal((batch, len(manifest.ecg.lead_order), manifest.ecg.window))).astype(
            np.float32
        )
        cat = np.stack([rng.integers(0, size, batch) for size in sizes], axis=1).astype(np.int64)
        cont = rng.standard_normal((batch, n_cont)).astype(np.float32)
        diff = run_windows(int8, names, ecg, cat, cont) - run_windows(fp32, names, ecg, cat, cont)
        out[f"random_batch_{batch}"] = float(np.abs(diff).max())
    return out


def auroc_figures(
    prefix: str,
    labels: np.ndarray,
    p_fp32: np.ndarray,
    p_int8: np.ndarray,
    targets: list[str],
    planted: set[str],
) -> dict[str, float | None]:
    """Macro AUROC of both graphs over the targets with both classes, all and planted, and the deltas."""
    from model_training.metrics import auroc_per_target

    a_fp32, a_int8 = auroc_per_target(labels, p_fp32), auroc_per_target(labels, p_int8)
    scored = np.isfinite(a_fp32) & np.isfinite(a_int8)
    figures: dict[str, float | None] = {}
    groups = {"all": scored, "planted": scored & np.array([t in planted for t in targets], dtype=bool)}
    for group, mask in groups.items():
        if not mask.any():
            figures.update({f"{prefix}{group}_auroc_fp32": None, f"{prefix}{group}_auroc_diff": None})
            continue
        fp32, int8 = float(a_fp32[mask].mean()), float(a_int8[mask].mean())
        figures[f"{prefix}{group}_auroc_fp32"] = fp32
        figures[f"{prefix}{group}_auroc_int8"] = int8
        figures[f"{prefix}{group}_auroc_diff"] = int8 - fp32
        figures[f"{prefix}{group}_max_target_auroc_diff"] = float(np.abs(a_int8[mask] - a_fp32[mask]).max())
        figures[f"{prefix}{group}_targets"] = float(mask.sum())
    return figures


def time_one_ecg(
    sessions: dict[str, Any], names: Sequence[str], inputs: FoldInputs, threads: int
) -> dict[str, float]:
    """p50 latency (ms) of one ECG's windows through each session, calls interleaved, and the speed-up."""
    w = inputs.n_windows
    feeds = dict(zip(names, (inputs.windows[:w], inputs.cat[:w], inputs.cont[:w]), strict=True))
    for session in sessions.values():
        for _ in range(3):
            session.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(TIMING_ROUNDS):
        for name, session in sessions.items():
            time.sleep(0.02)
            started = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - started)
    p50 = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {
        "fp32_cpu_ms_p50": p50["fp32"],
        "int8_cpu_ms_p50": p50[VARIANT],
        "speedup_vs_fp32": p50["fp32"] / p50[VARIANT],
        "threads": float(threads or len(os.sched_getaffinity(0))),
    }


def _planted(dataset: Any) -> set[str] | None:
    """The generator's planted targets of a synthetic DATASET (None for real data)."""
    from model_training.evaluate import planted_targets

    found = planted_targets(dataset.info)
    return None if found is None else set(found[0])


def judge(accuracy: dict[str, float | None], parity: dict[str, float], has_planted: dict[str, bool]) -> bool:
    """Whether every AUROC difference and every real-data probability difference is within bounds."""
    ok = True
    for prefix, planted in has_planted.items():
        key = f"{prefix}{'planted' if planted else 'all'}_auroc_diff"
        diff = accuracy.get(key)
        ok = ok and diff is not None and abs(diff) <= MAX_AUROC_DIFF
    real = [v for k, v in parity.items() if k.startswith(("real_", "check_")) and k.endswith("_records")]
    return ok and bool(real) and max(real) <= MAX_PROBABILITY_DIFF


# --------------------------------------------------------------------------------------------------
# The whole step
# --------------------------------------------------------------------------------------------------
def quantize_model(
    model: Path,
    data: Path,
    *,
    out: Path | None = None,
    calibration_windows: int = DEFAULT_CALIBRATION_WINDOWS,
    check_data: Path | None = None,
    threads: int = 0,
    seed: int = 0,
    force: bool = False,
) -> QuantizeResult:
    """Quantise the model in ``model``, measure it against fp32 and publish it; see the module docstring."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from model_training.data import open_dataset

    manifest_path = find_manifest(Path(model))
    manifest = load_manifest(manifest_path, verify_file=True)
    if VARIANT in manifest.variants and not force:
        raise InputError(f"{manifest_path}: already lists an {VARIANT} variant (use --force to replace it)")
    out_dir = Path(out) if out is not None else manifest_path.parent
    fp32_path = manifest_path.parent / manifest.onnx.file
    names = [i.name for i in manifest.onnx.inputs]
    dataset = open_dataset(Path(data))
    calibration = calibration_inputs(dataset, manifest, calibration_windows, seed)
    test = fold_inputs(dataset, fold_rows(dataset, TEST_FOLD), manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    int8_name = f"{manifest.onnx.file.removesuffix('.onnx')}.{VARIANT}.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".quantize-") as tmp:
        prepared, dense = prepare_graph(onnx.load(str(fp32_path)))
        dense = heavy_layers(prepared, dense)
        if not dense:
            raise InputError(f"{fp32_path}: no dense MatMul/Gemm layer with a 2-D weight to quantise")
        prepared_path = Path(tmp) / "prepared.onnx"
        onnx.save(prepared, str(prepared_path))
        int8_path = Path(tmp) / int8_name
        started = time.perf_counter()
        quantize_static(
            str(prepared_path),
            str(int8_path),
            _CalibrationReader(names, calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=dense,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "WeightSymmetric": True,
                "ActivationSymmetric": False,
                "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
            },
        )
        log.info("quantised %d dense layers in %.1f s", len(dense), time.perf_counter() - started)
        fp32, int8 = open_session(fp32_path, threads), open_session(int8_path, threads)
        prepared_session = open_session(prepared_path, threads)
        p_prepared, p_fp32 = (ecg_probabilities(x, names, calibration) for x in (prepared_session, fp32))
        prep_diff = float(np.abs(p_prepared - p_fp32).max())
        if prep_diff > 1e-4:
            raise RuntimeError(f"graph preparation changed the fp32 output by {prep_diff:.2e}")
        variant = _measure(manifest, fp32, int8, names, test, dataset, check_data, seed, threads)
        variant = variant.model_copy(
            update={
                "file": int8_name,
                "sha256": sha256_file(int8_path),
                "calibration": {
                    "dataset": str(Path(data)),
                    "fold": VAL_FOLD,
                    "windows": len(calibration.windows),
                    "ecgs": calibration.n_ecgs,
                    "seed": seed,
                    "dense_layers": len(dense),
                },
            }
        )
        return _publish(manifest_path, out_dir, int8_path, variant)


def _measure(
    manifest: Manifest,
    fp32: Any,
    int8: Any,
    names: Sequence[str],
    test: FoldInputs,
    dataset: Any,
    check_data: Path | None,
    seed: int,
    threads: int,
) -> VariantSpec:
    """Parity, AUROC and speed figures of ``int8`` against ``fp32``, judged against the bounds."""
    from fhir_mappings.calibration import Calibrator
    from model_training.data import open_dataset

    served = Calibrator([lab.calibration for lab in manifest.labels])  # as the runtime serves them
    parity = random_parity(fp32, int8, manifest, seed)
    accuracy: dict[str, float | None] = {}
    has_planted: dict[str, bool] = {}
    folds = [("test_", "real", dataset, test)]
    if check_data is not None:
        other = open_dataset(Path(check_data))
        folds.append(("check_", "check", other, fold_inputs(other, fold_rows(other, TEST_FOLD), manifest)))
    for prefix, name, data, inputs in folds:
        p_fp32, p_int8 = (served(ecg_probabilities(s, names, inputs)) for s in (fp32, int8))
        parity[f"{name}_{inputs.n_ecgs}_records"] = float(np.abs(p_int8 - p_fp32).max())
        parity[f"{name}_mean_abs_diff"] = float(np.abs(p_int8 - p_fp32).mean())
        planted = _planted(data)
        cols = inputs.outputs
        figures = auroc_figures(
            prefix, inputs.labels, p_fp32[:, cols], p_int8[:, cols], inputs.targets, planted or set()
        )
        accuracy.update(figures)
        has_planted[prefix] = planted is not None
    return VariantSpec(
        file="pending.onnx",
        sha256="0" * 64,
        precision="int8",
        method=METHOD,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        parity=parity,
        accuracy=accuracy,
        speed=time_one_ecg({"fp32": fp32, VARIANT: int8}, names, test, threads),
        bounds={"max_auroc_diff": MAX_AUROC_DIFF, "max_probability_diff": MAX_PROBABILITY_DIFF},
        meets_bounds=judge(accuracy, parity, has_planted),
    )


def _publish(manifest_path: Path, out_dir: Path, int8_path: Path, variant: VariantSpec) -> QuantizeResult:
    """Move the int8 file into ``out_dir`` and write the manifest there with ``variants.int8``.

    The manifest is rewritten from its own JSON with only ``variants`` changed (same layout as
    ``ecglab export`` writes); into another folder the fp32 ONNX file is copied unchanged.
    """
    raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    raw.setdefault("variants", {})[VARIANT] = variant.model_dump(mode="json")
    Manifest.model_validate(raw)  # the service's schema, before anything is published
    fp32_name = raw["onnx"]["file"]
    if out_dir.resolve() != manifest_path.parent.resolve():
        shutil.copy2(manifest_path.parent / fp32_name, out_dir / fp32_name)
    final_manifest = out_dir / manifest_path.name
    staged = int8_path.parent / manifest_path.name
    staged.write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
    final_onnx = out_dir / variant.file
    shutil.move(int8_path, final_onnx)
    shutil.move(staged, final_manifest)
    return QuantizeResult(final_manifest, final_onnx, variant)

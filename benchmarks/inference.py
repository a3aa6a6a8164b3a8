"""Inference benchmark of the exported model through the service runtime (``ModelRuntime``).

Run: ``.venv/bin/python benchmarks/inference.py [--model DIR] [--quick] [--threads N]``.

The model is ``--model`` if given, else the bundled one under ``models/`` when a manifest is there,
else a randomly initialised paper-size ``FusionModel`` (100 targets) exported into a temporary
folder; the ``model`` line says which. ``--quick`` (the smoke test) times a few calls only and,
without ``--model``, uses a tiny random model. Prints one ``name: value`` line per figure:

* ``inference_cpu_ecg_latency_ms_p50`` / ``_p95``: one raw ECG (500 Hz, 10 s, 12 leads in the
  usual I…V6 order, mV) plus metadata through ``ModelRuntime.predict`` on the CPU provider: the
  shared preprocessing (reorder, clip, resample to 100 Hz), metadata encoding, the 4 windows as one
  ONNX call, the window mean and the per-target results;
* ``inference_cpu_onnx_only_ms_p50``: the same ECG already prepared, through
  ``ModelRuntime.predict_prepared``: the ONNX call on its 4 windows (cutting the windows and the
  mean around it take microseconds);
* ``inference_cpu_batch64_ecg_per_s``: 64 prepared ECGs per ``predict_prepared`` call (256 windows
  in one ONNX call);
* ``dense_gflop_per_ecg``: the model's dense FLOPs per ECG (input linear, each block's H→2H
  projection before the GLU, static MLP, head; ≈4.2 at paper size), counted on the ONNX graph;
* ``numpy_matmul_gflops``: the float32 rate numpy reaches on those same GEMM shapes in this run,
  with as many BLAS threads as ONNX Runtime has;
* ``inference_cpu_flop_floor_ratio``: the ONNX-only p50 divided by the time numpy needs for the
  dense FLOPs (its best round): how far the whole model is from the machine's dense-matmul floor;
* with a usable CUDA GPU: ``inference_gpu_batch256_ecg_per_s`` (CUDA provider, inputs and output
  on the device with IO binding, 256 ECGs = 1024 windows per call), ``gpu_matmul_tflops`` (the
  same dense GEMMs at that batch, as an ONNX MatMul graph on the same provider, so no torch is
  needed) and ``inference_gpu_flop_floor_ratio``; otherwise one ``gpu: not available (…)`` line;
* when the manifest lists an ``int8`` variant (``ecglab quantize``), timed in the same rounds as
  the fp32 figures: ``inference_cpu_int8_ecg_latency_ms_p50``, ``inference_cpu_int8_onnx_only_ms_p50``,
  ``inference_cpu_int8_flop_floor_ratio`` (its ONNX-only p50 over the *fp32* dense floor: the
  issue's bound is 0.6), ``inference_cpu_int8_speedup`` (fp32 ONNX-only p50 over int8's) and
  ``inference_cpu_int8_batch64_ecg_per_s``; otherwise one ``int8: not available (…)`` line;
* batched serving: ``SERVING_THREADS`` (16) threads each submit single prepared ECGs through the
  runtime's :class:`~cds_service.batching.MicroBatcher` (fp32, default bounds: ≤ 5 ms wait,
  ≤ 32 ECGs a call): ``batched_serving_ecg_per_s``, ``batched_serving_latency_ms_p99`` (one
  submission), ``batched_serving_mean_batch`` (ECGs per ONNX call) and
  ``batched_serving_ceiling_ratio`` (throughput over ``inference_cpu_batch64_ecg_per_s`` of the
  same run; the issue's goal is ≥ 0.9).

Calls of the compared functions are interleaved, with a short sleep before each (see
``_common.timed_rounds``), so load from other processes hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    BenchModel,
    blas_threads,
    cpu_threads,
    dense_layers,
    gemm_flops,
    numpy_gemms,
    percentiles_ms,
    report,
    resolve_model,
    timed_rounds,
)

from cds_service.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_S
from cds_service.features import EcgRecord, ModelInputs
from cds_service.inference import ModelRuntime, cuda_unavailable_reason
from fhir_mappings.metadata_encoding import encode_metadata

RAW_FS = 500.0
RAW_SECONDS = 10.0
RAW_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
CPU_BATCH = 64
GPU_BATCH = 256
SERVING_THREADS = 16
METADATA: dict[str, float | None] = {
    "sex": 0.0, "race": None, "age": 71.0, "temperature": 98.6, "heart_rate": 92.0, "resp_rate": 18.0,
    "spo2": 96.0, "sbp": 141.0, "dbp": None, "bmi": None, "weight": 82.0, "height": 168.0,
}  # fmt: skip


def raw_ecg(seed: int = 0) -> np.ndarray:
    """A synthetic 12-lead ECG at 500 Hz for 10 s in mV, (5000, 12) float32, leads in ``RAW_LEADS`` order.

    A sum of a 1.2 Hz fundamental and harmonics per lead plus noise: the benchmark needs the shape
    and the value range of a real ECG, not its morphology.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(RAW_FS * RAW_SECONDS)) / RAW_FS
    harmonics = np.arange(1, 6)[:, None]
    amplitudes = rng.uniform(0.05, 0.6, (len(RAW_LEADS), harmonics.shape[0]))
    phases = rng.uniform(0, 2 * np.pi, (len(RAW_LEADS), harmonics.shape[0]))
    waves = np.einsum(
        "lh,lht->tl", amplitudes, np.sin(2 * np.pi * 1.2 * harmonics[None] * t + phases[..., None])
    )
    return (waves + rng.normal(0, 0.02, waves.shape)).astype(np.float32)


def model_inputs(signal: np.ndarray) -> ModelInputs:
    """The service's input object for ``signal`` (``RAW_LEADS`` order, ``RAW_FS``) and ``METADATA``."""
    record = EcgRecord(
        signal=signal,
        fs=RAW_FS,
        lead_names=RAW_LEADS,
        recorded_at=datetime.now(UTC),
        reference="Observation/benchmark",
        carrier="observation",
    )
    return ModelInputs(ecg=record, metadata=dict(METADATA), sources={})


def encoded(runtime: ModelRuntime, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``cat`` and ``cont`` for ``n`` copies of ``METADATA``, encoded as the runtime encodes them."""
    spec = runtime.manifest.metadata
    keys = [c.key for c in spec.categorical] + list(spec.continuous)
    return encode_metadata({k: [METADATA[k]] * n for k in keys}, spec)


def bench_cpu(model: BenchModel, threads: int, rounds: int, batch_rounds: int) -> float:
    """Latency, ONNX-only latency and batch-64 throughput on the CPU provider, and the FLOP floor.

    The int8 variant, when the manifest lists one, is timed in the same interleaved rounds.
    Returns the fp32 batch-64 throughput (ECG/s), the ceiling batched serving is compared with.
    """
    runtime = ModelRuntime.load(model.directory, ["CPUExecutionProvider"], intra_op_threads=threads)
    int8 = None
    if "int8" in runtime.manifest.variants:
        int8 = ModelRuntime.load(
            model.directory, ["CPUExecutionProvider"], intra_op_threads=threads, variant="int8"
        )
    spec = runtime.manifest.ecg
    layers = dense_layers(runtime.model_path, spec.n_windows)
    flops = gemm_flops(layers)
    inputs = model_inputs(raw_ecg())
    prepared = runtime.prepare(inputs.ecg.signal, inputs.ecg.fs, inputs.ecg.lead_names)[None]  # (1, T, 12)
    cat, cont = encoded(runtime, 1)
    batch = np.stack([runtime.prepare(raw_ecg(seed), RAW_FS, RAW_LEADS) for seed in range(CPU_BATCH)])
    cat_b, cont_b = encoded(runtime, CPU_BATCH)
    fns = {
        "predict": lambda: runtime.predict(inputs),
        "onnx": lambda: runtime.predict_prepared(prepared, cat, cont),
        "floor": numpy_gemms(layers),
    }
    batch_fns = {"batch": lambda: runtime.predict_prepared(batch, cat_b, cont_b, batch_size=CPU_BATCH)}
    if int8 is not None:
        fns["int8_predict"] = lambda: int8.predict(inputs)
        fns["int8_onnx"] = lambda: int8.predict_prepared(prepared, cat, cont)
        batch_fns["int8_batch"] = lambda: int8.predict_prepared(batch, cat_b, cont_b, batch_size=CPU_BATCH)
    with blas_threads(threads):
        times = timed_rounds(
            fns,
            rounds,
            warmup=3,
            pause=0.2,  # OpenBLAS threads of the numpy floor spin ~0.1 s: let them settle first
        )
        all_batch_times = timed_rounds(batch_fns, batch_rounds, warmup=1)
    batch_times = all_batch_times["batch"]
    p50, p95 = percentiles_ms(times["predict"])
    onnx_p50, _ = percentiles_ms(times["onnx"])
    floor_s = min(times["floor"])
    report("inference_cpu_ecg_latency_ms_p50", p50)
    report("inference_cpu_ecg_latency_ms_p95", p95)
    report("inference_cpu_onnx_only_ms_p50", onnx_p50)
    report("inference_cpu_batch64_ecg_per_s", CPU_BATCH / statistics.median(batch_times))
    report("numpy_matmul_gflops", flops / floor_s / 1e9)
    report("dense_gflop_per_ecg", flops / 1e9)
    report("inference_cpu_flop_floor_ratio", onnx_p50 / 1e3 / floor_s)
    if int8 is None:
        report("int8", "not available (the manifest lists no int8 variant; run 'ecglab quantize')")
    else:
        int8_onnx_p50, _ = percentiles_ms(times["int8_onnx"])
        report("inference_cpu_int8_ecg_latency_ms_p50", percentiles_ms(times["int8_predict"])[0])
        report("inference_cpu_int8_onnx_only_ms_p50", int8_onnx_p50)
        report("inference_cpu_int8_flop_floor_ratio", int8_onnx_p50 / 1e3 / floor_s)
        report("inference_cpu_int8_speedup", onnx_p50 / int8_onnx_p50)
        report(
            "inference_cpu_int8_batch64_ecg_per_s",
            CPU_BATCH / statistics.median(all_batch_times["int8_batch"]),
        )
    return CPU_BATCH / statistics.median(batch_times)


def bench_batched_serving(model: BenchModel, threads: int, per_thread: int, ceiling: float) -> None:
    """``SERVING_THREADS`` threads submitting single prepared ECGs through the micro-batcher.

    Each thread submits ``per_thread`` ECGs one after the other (closed loop, as request threads
    of one gunicorn worker do); throughput counts all of them over the wall time of the whole run.
    """
    runtime = ModelRuntime.load(
        model.directory,
        ["CPUExecutionProvider"],
        intra_op_threads=threads,
        batch_max_wait_ms=DEFAULT_MAX_WAIT_S * 1000,
        batch_max_size=DEFAULT_MAX_BATCH,
    )
    batcher = runtime.batcher
    assert batcher is not None
    needed = runtime.manifest.ecg.window * runtime.manifest.ecg.n_windows
    items = []
    for seed in range(SERVING_THREADS):
        cat, cont = encoded(runtime, 1)
        items.append((runtime.prepare(raw_ecg(seed), RAW_FS, RAW_LEADS)[:needed], cat[0], cont[0]))
    for item in items[:2]:
        batcher.submit(item)  # warm-up
    calls_before = runtime.calls
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(SERVING_THREADS + 1)

    def client(item: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        start.wait()
        for _ in range(per_thread):
            began = time.perf_counter()
            batcher.submit(item)
            with lock:
                latencies.append(time.perf_counter() - began)

    workers = [threading.Thread(target=client, args=(item,)) for item in items]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - began
    runtime.close()
    served = SERVING_THREADS * per_thread
    rate = served / wall
    report("batched_serving_ecg_per_s", rate)
    report("batched_serving_latency_ms_p99", float(np.percentile(np.asarray(latencies) * 1e3, 99)))
    report("batched_serving_mean_batch", served / max(runtime.calls - calls_before, 1))
    report("batched_serving_ceiling_ratio", rate / ceiling)


def gemm_graph(layers: list[tuple[int, int, int]], path: Path) -> list[str]:
    """Write an ONNX graph of independent float32 MatMuls ``X_i (rows, k) @ W_i (k, n)``; returns input names.

    ONNX Runtime then measures the GEMM rate of the provider the model runs on, with no torch.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inputs, outputs, weights = [], [], [], []
    for i, (rows, k, n) in enumerate(layers):
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [rows, k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, n]))
        weights.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), f"w{i}"))
    graph = helper.make_graph(nodes, "dense_floor", inputs, outputs, weights)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx_model.ir_version = 9
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))
    return [f"x{i}" for i in range(len(layers))]


def bound_session(path: Path, feeds: dict[str, np.ndarray], device: str) -> tuple[Any, Any]:
    """A session on ``device``'s provider with every input copied to the device once and every
    output bound there (IO binding), so a timed call moves no data over PCIe."""
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"ONNX Runtime did not open {path.name} with {provider}")
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device, 0)
    return session, binding


def gpu_figures(
    model: BenchModel, rounds: int, scratch: Path, *, batch: int = GPU_BATCH, device: str = "cuda"
) -> dict[str, float]:
    """Throughput at ``batch`` ECGs per call with IO binding, against ONNX Runtime's own GEMM rate.

    Returns ECGs per second, the GEMM rate in TFLOP/s on the dense layers' shapes at that batch,
    and the ratio of the model's time to those GEMMs' time. ``device="cpu"`` runs the same code on
    the CPU provider, which checks it on a machine without a GPU.
    """
    from fhir_mappings.manifest import load_manifest

    manifest = load_manifest(model.manifest_path, verify_file=False)
    onnx_path = model.directory / manifest.onnx.file
    spec = manifest.ecg
    windows = batch * spec.n_windows
    rng = np.random.default_rng(0)
    n_cat = manifest.onnx.inputs[1].shape[1] or 0
    n_cont = manifest.onnx.inputs[2].shape[1] or 0
    feeds: dict[str, np.ndarray] = {
        manifest.onnx.inputs[0].name: (
            0.3 * rng.standard_normal((windows, len(spec.lead_order), spec.window))
        ).astype(np.float32),
        manifest.onnx.inputs[1].name: np.zeros((windows, n_cat), dtype=np.int64),
        manifest.onnx.inputs[2].name: rng.standard_normal((windows, n_cont)).astype(np.float32),
    }
    layers = [(rows * batch, k, n) for rows, k, n in dense_layers(onnx_path, spec.n_windows)]
    gemm_path = scratch / "dense_floor.onnx"
    names = gemm_graph(layers, gemm_path)
    gemm_feeds = {
        name: rng.standard_normal((rows, k), dtype=np.float32)
        for name, (rows, k, _) in zip(names, layers, strict=True)
    }
    model_session, model_binding = bound_session(onnx_path, feeds, device)
    gemm_session, gemm_binding = bound_session(gemm_path, gemm_feeds, device)

    def run(session: Any, binding: Any) -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    times = timed_rounds(
        {
            "model": lambda: run(model_session, model_binding),
            "floor": lambda: run(gemm_session, gemm_binding),
        },
        rounds,
        warmup=3,
        pause=0.01,
    )
    model_s, floor_s = statistics.median(times["model"]), min(times["floor"])
    return {
        "ecg_per_s": batch / model_s,
        "matmul_tflops": gemm_flops(layers) / floor_s / 1e12,
        "flop_floor_ratio": model_s / floor_s,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse options, pick the model and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder (default: bundled, else random)"
    )
    parser.add_argument("--quick", action="store_true", help="a few calls and a tiny model (smoke test)")
    parser.add_argument(
        "--threads", type=int, default=cpu_threads(), help="ONNX Runtime intra-op and numpy BLAS threads"
    )
    args = parser.parse_args(argv)
    rounds, batch_rounds, gpu_rounds = (4, 2, 3) if args.quick else (50, 5, 20)
    per_thread = 2 if args.quick else 8
    with tempfile.TemporaryDirectory(prefix="ecglab-bench-") as tmp:
        model = resolve_model(args.model, args.quick, Path(tmp))
        report("model", model.description)
        report("cpu_threads", args.threads)
        ceiling = bench_cpu(model, args.threads, rounds, batch_rounds)
        bench_batched_serving(model, args.threads, per_thread, ceiling)
        reason = cuda_unavailable_reason()
        if reason is None:
            gpu = gpu_figures(model, gpu_rounds, Path(tmp))
            report(f"inference_gpu_batch{GPU_BATCH}_ecg_per_s", gpu["ecg_per_s"])
            report("gpu_matmul_tflops", gpu["matmul_tflops"])
            report("inference_gpu_flop_floor_ratio", gpu["flop_floor_ratio"])
        else:
            report("gpu", f"not available ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

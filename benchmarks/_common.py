"""Helpers shared by the serving benchmarks (``inference.py`` and ``hooks.py``); not a benchmark.

``make bench`` runs every ``benchmarks/*.py`` without arguments; run directly, this module prints
nothing and exits 0. What lives here, and why it is shared:

* ``report`` and ``percentiles_ms``: every benchmark prints one ``name: value`` line per figure;
* ``timed_rounds``: interleaved timing with a short sleep before each call, so that one engine's
  spinning worker threads (ONNX Runtime, OpenBLAS) do not slow the next one down and a burst of
  load from other processes hits every compared function alike;
* ``resolve_model``: the model both benchmarks time — the bundled one under ``models/`` when a
  manifest is there, else a randomly initialised ``FusionModel`` exported (``export_onnx``) with a
  manifest the service accepts. torch is imported only on that second path, so the benchmarks
  also run where only the serving dependencies are installed;
* ``dense_layers``: the model's dense matmul shapes per ECG, read off the ONNX graph, and
  ``numpy_gemms`` to run the same GEMMs in numpy (the FLOP floor of the machine);
* ``sekmet_server``: a throw-away FHIR R4 server (``.venv-fhir/bin/sekmet``) on a loopback port.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from fhir_mappings.tasks import TASK_HORIZON_MIN

REPO = Path(__file__).resolve().parents[1]
SEKMET = Path(os.environ.get("ECGLAB_SEKMET", REPO / ".venv-fhir" / "bin" / "sekmet"))
SERVER_START_TIMEOUT_S = 30.0

#: Plausible training-fold medians (canonical units of ``fhir_mappings``) for the random model's
#: manifest; a real export takes them from the training folds.
MEDIANS: dict[str, float] = {
    "sex": 1.0, "race": 4.0, "age": 65.0, "temperature": 98.1, "heart_rate": 86.0, "resp_rate": 18.0,
    "spo2": 98.0, "sbp": 133.0, "dbp": 76.0, "bmi": 27.6, "weight": 79.4, "height": 170.2,
}  # fmt: skip
RANDOM_LABELS = 100  # about as many targets as the real model has
QUICK_MODEL = {"d_model": 32, "n_layers": 1}  # --quick: a tiny model so the smoke test stays fast


# --------------------------------------------------------------------------------------------------
# Printing and timing
# --------------------------------------------------------------------------------------------------
def report(name: str, value: float | int | str) -> None:
    """One figure per line, ``name: value`` (numbers with four significant digits)."""
    text = value if isinstance(value, str) else f"{value:.4g}"
    print(f"{name}: {text}", flush=True)


def percentiles_ms(seconds: Sequence[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds of a list of wall times in seconds (linear interpolation)."""
    p50, p95 = np.percentile(np.asarray(seconds, dtype=np.float64) * 1e3, [50, 95])
    return float(p50), float(p95)


def cpu_threads() -> int:
    """CPU cores this process may run on (the default thread count of every engine here)."""
    return len(os.sched_getaffinity(0))


def blas_threads(threads: int) -> contextlib.AbstractContextManager[Any]:
    """Limit numpy's BLAS to ``threads`` threads, so that its GEMMs and ONNX Runtime compare alike.

    ``threadpoolctl`` ships with the training extras; without it numpy keeps its default.
    """
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def timed_rounds(
    fns: Mapping[str, Callable[[], object]], rounds: int, *, warmup: int = 2, pause: float = 0.05
) -> dict[str, list[float]]:
    """Wall times in seconds of each of ``fns`` over ``rounds`` rounds, after ``warmup`` rounds.

    One call of each function per round, in order, each after ``pause`` seconds of sleep: worker
    threads of the previous call stop spinning, and load from other processes spreads over all
    functions alike, so ratios between them compare like with like.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(pause)
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchModel:
    """The model a benchmark times: its manifest, the folder holding it and how it was obtained."""

    directory: Path
    manifest_path: Path
    description: str


def resolve_model(model: Path | None, quick: bool, scratch: Path) -> BenchModel:
    """``--model`` if given, else the bundled model (not with ``--quick``), else a random export.

    The random export goes into ``scratch`` (a temporary folder the caller removes): paper sizes
    normally, ``QUICK_MODEL`` sizes with ``quick``.
    """
    from cds_service.settings import default_model_dir
    from fhir_mappings.manifest import ManifestError, find_manifest, load_manifest

    if model is not None:
        path = find_manifest(model)
        manifest = load_manifest(path, verify_file=False)
        return BenchModel(path.parent, path, f"{manifest.name} {manifest.version} from {path}")
    if not quick:
        try:
            path = find_manifest(default_model_dir())
        except ManifestError:
            pass
        else:
            manifest = load_manifest(path, verify_file=False)
            return BenchModel(
                path.parent,
                path,
                f"bundled {manifest.name} {manifest.version} ({path.parent.name}/{path.name})",
            )
    sizes = QUICK_MODEL if quick else {}
    path = export_random_model(scratch / "model", **sizes)
    shape = ", ".join(f"{k} {v}" for k, v in sizes.items()) or "paper sizes"
    return BenchModel(
        path.parent, path, f"randomly initialised FusionModel ({shape}, {RANDOM_LABELS} targets), exported"
    )


def random_targets(n: int) -> list[tuple[Any, str, str]]:
    """``n`` (lab, direction, task) triples over the labs of ``fhir_mappings``, every task of each."""
    from fhir_mappings import load_mappings

    combos = list(product(load_mappings().labs, ("high", "low"), TASK_HORIZON_MIN))
    return combos[:n]


def export_random_model(directory: Path, n_labels: int = RANDOM_LABELS, **sizes: int) -> Path:
    """Export a randomly initialised ``FusionModel`` (``ModelConfig`` defaults unless ``sizes``).

    Writes ``ecglab-0.0.0+bench.onnx`` and its manifest into ``directory`` and returns the
    manifest's path. Targets are real labs of ``fhir_mappings`` (so cards get built as for the
    real model), named ``{label}_{direction}_{task}``; decision thresholds are 0.5.
    """
    import torch

    from fhir_mappings import MAPPING_VERSION, load_mappings
    from fhir_mappings.manifest import Manifest, sha256_file
    from fhir_mappings.signal_spec import MODEL_LEADS
    from model_training.model import FusionModel, ModelConfig
    from model_training.s4_export import export_onnx

    mappings = load_mappings()
    categorical = [
        {"key": f.key, "categories": list(f.categories or ())}
        for f in mappings.features
        if f.kind == "categorical"
    ]
    continuous: list[str] = list(mappings.continuous_keys)
    indicators: list[str] = list(mappings.missing_indicator_keys)
    spec = {
        "categorical": categorical,
        "continuous": continuous,
        "missing_indicators": indicators,
        "medians": MEDIANS,
    }
    targets = random_targets(n_labels)
    names = [f"{lab.mimic_label}_{direction}_{task}" for lab, direction, task in targets]
    cont_names = continuous + [f"{k}_missing" for k in indicators]
    torch.manual_seed(0)
    config = ModelConfig(**sizes)  # type: ignore[arg-type]
    model = FusionModel(config, names, cont_names, [str(c["key"]) for c in categorical]).eval()
    directory.mkdir(parents=True, exist_ok=True)
    version = "0.0.0+bench"
    onnx_path = directory / f"ecglab-{version}.onnx"
    export_onnx(model, onnx_path)
    labels = [
        {
            "target": name,
            "label": lab.mimic_label,
            "lab_key": lab.key,
            "order_code": {
                "system": lab.order_code.system,
                "code": lab.order_code.code,
                "display": lab.order_code.display,
            },
            "direction": direction,
            "task": task,
            "horizon_min": TASK_HORIZON_MIN[task],
            "value_threshold": (
                lab.paper_threshold.value
                if lab.paper_threshold is not None and lab.paper_threshold.direction == direction
                else None
            ),
            "unit": lab.unit,
            "decision_threshold": 0.5,
            "threshold_rule": "fixed",
        }
        for name, (lab, direction, task) in zip(names, targets, strict=True)
    ]
    manifest = {
        "format": 1,
        "name": "ecglab",
        "version": version,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "intended_use": "BENCHMARK ONLY: randomly initialised weights; the probabilities mean nothing.",
        "training_data": {"source": "synthetic", "versions": {}, "details": {}},
        "mapping_version": MAPPING_VERSION,
        "onnx": {
            "file": onnx_path.name,
            "sha256": sha256_file(onnx_path),
            "opset": 18,
            "inputs": [
                {"name": "ecg", "dtype": "float32", "shape": [None, config.n_leads, config.window]},
                {"name": "cat", "dtype": "int64", "shape": [None, len(categorical)]},
                {"name": "cont", "dtype": "float32", "shape": [None, len(cont_names)]},
            ],
            "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [None, len(labels)]}],
        },
        "ecg": {
            "sampling_rate_hz": 100.0,
            "duration_s": 10.0,
            "window": config.window,
            "n_windows": 1000 // config.window,
            "aggregation": "mean",
            "lead_order": list(MODEL_LEADS),
            "units": "mV",
            "clip_mv": 3.0,
        },
        "metadata": spec,
        "labels": labels,
    }
    Manifest.model_validate(manifest)  # the service's own schema
    path = directory / f"ecglab-{version}.manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return path


def dense_layers(onnx_path: Path, n_windows: int) -> list[tuple[int, int, int]]:
    """The graph's dense layers for one ECG of ``n_windows`` windows, as GEMM shapes ``(rows, k, n)``.

    Dense layers are the ``MatMul``/``Gemm`` nodes with a 2-D weight initializer: the input linear,
    each block's H→2H projection (before the GLU), the static MLP and the head. Each costs
    ``2·rows·k·n`` FLOPs (≈ 4.2 GFLOP per ECG in all at the paper's sizes). The S4 convolution's
    batched matmuls (3-D per-channel constants) are left out: the dense layers are the floor any
    implementation must pay. Shapes come from ONNX shape inference with the batch axis fixed to
    ``n_windows``, so the count follows whatever model the manifest names.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    for value in model.graph.input:
        value.type.tensor_type.shape.dim[0].dim_value = n_windows
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    weights = {init.name: list(init.dims) for init in model.graph.initializer if len(init.dims) == 2}
    layers = []
    for node in inferred.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or not any(i in weights for i in node.input[:2]):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        a, b = node.input[:2]
        if b in weights:  # X @ W (a Gemm may store W transposed)
            k, n = weights[b][::-1] if attrs.get("transB", 0) else weights[b]
        else:  # W @ X: the ECG branch's channel-first layers, W (n, k)
            n, k = weights[a][::-1] if attrs.get("transA", 0) else weights[a]
        out = shapes.get(node.output[0])
        if not out or min(out) <= 0:
            raise RuntimeError(f"{onnx_path}: shape inference left {node.name}'s output shape unknown")
        layers.append((math.prod(out) // n, k, n))
    if not layers:
        raise RuntimeError(f"{onnx_path}: no dense layer (MatMul/Gemm with a 2-D weight) found")
    return layers


def gemm_flops(layers: Sequence[tuple[int, int, int]]) -> int:
    """FLOPs of GEMMs of shapes ``(rows, k, n)``: Σ 2·rows·k·n."""
    return sum(2 * rows * k * n for rows, k, n in layers)


def numpy_gemms(layers: Sequence[tuple[int, int, int]]) -> Callable[[], object]:
    """All ``layers`` as float32 numpy GEMMs ``X (rows, k) @ W (k, n)``, one after the other."""
    rng = np.random.default_rng(0)
    operands = [
        (rng.standard_normal((rows, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32))
        for rows, k, n in layers
    ]
    return lambda: [x @ w for x, w in operands]


# --------------------------------------------------------------------------------------------------
# A FHIR server on loopback
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class FhirTestServer:
    """A sekmet process being started or running: its FHIR base URL and log file."""

    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def wait_ready(self) -> None:
        """Poll ``/metadata`` until it answers 200; raise with the log's tail if the server dies."""
        import httpx

        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"sekmet exited with {self.process.returncode}: {tail}")
            try:
                if httpx.get(f"{self.base_url}/metadata", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > SERVER_START_TIMEOUT_S:
                raise RuntimeError(
                    f"sekmet at {self.base_url} did not answer within {SERVER_START_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.05)


@contextlib.contextmanager
def sekmet_server(folder: Path) -> Iterator[FhirTestServer]:
    """Start an empty in-memory sekmet FHIR R4 server on a free loopback port.

    Yields as soon as the process is launched, so the caller can prepare its data while the
    server boots; call ``wait_ready()`` before the first request. The process is stopped
    (SIGTERM, then SIGKILL) when the block exits, whatever happens in it.
    """
    if not SEKMET.exists():
        raise RuntimeError(
            f"{SEKMET} missing: python3 -m venv .venv-fhir && .venv-fhir/bin/pip install sekmet-fhir==0.1.1"
        )
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    settings = folder / "sekmet.yaml"
    settings.write_text(
        f"host: 127.0.0.1\nport: {port}\nbase_url: {base_url}\ndb_path: ':memory:'\n"
        "simulator: {enabled: false}\nlog_inbound: false\n",
        encoding="utf-8",
    )
    log = folder / "sekmet.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(SEKMET), "serve", "-c", str(settings)], cwd=folder, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        yield FhirTestServer(process, base_url, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


if __name__ == "__main__":
    raise SystemExit(0)

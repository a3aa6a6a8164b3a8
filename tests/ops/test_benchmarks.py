"""Smoke tests of the benchmarks (``benchmarks/inference.py``, ``benchmarks/hooks.py``,
``benchmarks/s4.py``, ``benchmarks/preprocess.py``).

``make bench`` runs every ``benchmarks/*.py`` and the figures are quoted in the README, so their
names are a contract: each benchmark runs here in ``--quick`` mode on one tiny random model
(exported once for the module), and the test checks every figure line it must print, as the
issues "ONNX export … Benchmarks" and "CDS Hooks 2.0 service … benchmarks/hooks.py" list them.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
INFERENCE_FIGURES = (
    "inference_cpu_ecg_latency_ms_p50",
    "inference_cpu_ecg_latency_ms_p95",
    "inference_cpu_onnx_only_ms_p50",
    "inference_cpu_batch64_ecg_per_s",
    "numpy_matmul_gflops",
    "dense_gflop_per_ecg",
    "inference_cpu_flop_floor_ratio",
)
GPU_FIGURES = ("inference_gpu_batch256_ecg_per_s", "gpu_matmul_tflops", "inference_gpu_flop_floor_ratio")
S4_FIGURES = (
    "s4_block_fwd_bwd_samples_per_s",
    "reference_s4_block_fwd_bwd_samples_per_s",
    "speedup_vs_reference",
    "numpy_matmul_gflop_per_s",
    "s4_block_flop_floor_ratio",
    "s4_block_fwd_bwd_cpu_ms",
    "s4_block_cpu_flop_floor_ratio",
    "model_fwd_bwd_samples_per_s",
)
LABEL_FIGURES = ("labevents_rows_per_s", "label_step_s", "peak_rss_mb", "ecg_records")
WAVEFORM_FIGURES = (
    "waveform_ecgs_per_s_per_core",
    "waveform_peak_rss_mb",
    "waveform_800k_on_16_cores_h",
    "waveform_step_s",
    "waveform_step_cpu_s",
)
HOOK_FIGURES = (
    "hook_prefetch_ms_p50",
    "hook_prefetch_ms_p95",
    "hook_fhir_fetch_ms_p50",
    "hook_fhir_fetch_ms_p95",
    "bare_inference_ms_p50",
    "bare_inference_ms_p95",
)
HOOK_GOAL_FIGURES = (
    "hook_cache_hit_p95_ms",
    "hook_prefetch_overhead_ratio",
    "hook_fetch_minus_inference_p95_ms",
)


@functools.cache
def _common() -> ModuleType:
    """``benchmarks/_common.py``, loaded once (the benchmarks are scripts, not an installed package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FusionModel exported with its manifest, shared by the module's tests."""
    common = _common()
    path: Path = common.export_random_model(tmp_path_factory.mktemp("bench-model"), **common.QUICK_MODEL)
    return path.parent


def run_benchmark(script: str, *args: str) -> dict[str, str]:
    """Run ``benchmarks/<script>`` with ``args``; its ``name: value`` lines as a dict."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)


def assert_positive_numbers(figures: dict[str, str], names: tuple[str, ...]) -> None:
    """Every one of ``names`` is printed, as a finite number above zero."""
    missing = [n for n in names if n not in figures]
    assert not missing, f"missing figures {missing} in {figures}"
    for name in names:
        value = float(figures[name])
        assert math.isfinite(value) and value > 0, f"{name}: {figures[name]}"


def test_inference_benchmark_prints_every_cpu_figure_and_the_gpu_line(tiny_model: Path) -> None:
    """ONNX export issue, Benchmarks: CPU latency p50/p95 (raw ECG and ONNX only), batch-64
    throughput, numpy's matmul rate, dense GFLOP per ECG and the FLOP-floor ratio; then either
    the three GPU figures or one ``gpu: not available (reason)`` line."""
    figures = run_benchmark("inference.py", "--quick", "--model", str(tiny_model))
    assert_positive_numbers(figures, INFERENCE_FIGURES)
    assert str(tiny_model) in figures["model"]
    if "gpu" in figures:
        assert figures["gpu"].startswith("not available (")
    else:
        assert_positive_numbers(figures, GPU_FIGURES)
    assert float(figures["inference_cpu_ecg_latency_ms_p95"]) >= float(
        figures["inference_cpu_ecg_latency_ms_p50"]
    )


def test_dense_flops_are_the_linear_layers_of_the_graph(tiny_model: Path) -> None:
    """ONNX export issue, Benchmarks: the FLOP floor counts the dense layers only — input linear,
    each block's H→2H projection, static MLP and head — over 4 windows of 250 samples, as read
    off the ONNX graph (here d_model 32, one block, 20 continuous inputs, 100 targets)."""
    common = _common()
    onnx_file = next(tiny_model.glob("*.onnx"))
    rows = 4 * 250
    expected = [
        (rows, 12, 32),  # input linear, leads → H
        (rows, 32, 64),  # the block's projection H → 2H (before the GLU)
        (4, 16 + 32 + 20, 128),  # static MLP: embeddings ‖ continuous → 128
        (4, 128, 128),
        (4, 128, 128),
        (4, 32 + 128, 100),  # head over ECG ‖ static features
    ]
    assert common.dense_layers(onnx_file, 4) == expected
    assert common.gemm_flops(expected) == sum(2 * m * k * n for m, k, n in expected)


def test_hooks_benchmark_prints_hook_and_bare_latencies(tiny_model: Path) -> None:
    """CDS Hooks service issue, benchmarks/hooks.py: p50/p95 of patient-view with full prefetch and
    with FHIR fetching from a seeded local sekmet server, next to bare inference, and the call count;
    issue 18: an order-select answered from the stored prediction (p95), the full-prefetch overhead
    ratio and the FHIR-fetch time beyond inference, all from the same run."""
    if not _common().SEKMET.exists():
        pytest.skip(
            "sekmet missing: python3 -m venv .venv-fhir && .venv-fhir/bin/pip install sekmet-fhir==0.1.1"
        )
    figures = run_benchmark("hooks.py", "--quick", "--calls", "2", "--model", str(tiny_model))
    assert_positive_numbers(figures, HOOK_FIGURES)
    assert figures["hook_calls"] == "2"
    # Issue 18: the cache-hit latency and the overhead figures, from the same run.
    assert_positive_numbers(figures, HOOK_GOAL_FIGURES)
    ratio = float(figures["hook_prefetch_ms_p95"]) / float(figures["bare_inference_ms_p95"])
    assert float(figures["hook_prefetch_overhead_ratio"]) == pytest.approx(ratio, rel=3e-3)


def test_shared_helpers_module_is_silent_when_make_bench_runs_it() -> None:
    """Makefile ``bench`` runs every ``benchmarks/*.py``: ``_common.py`` must print nothing and exit 0."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "_common.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "")


def test_s4_benchmark_prints_block_model_and_cpu_time_figures() -> None:
    """Performance issue, training speed: benchmarks/s4.py prints the block's samples/s next to the
    reference S4 formulation, the dense-FLOP floor ratio in wall and in CPU time, and the model
    figure; the two block formulations agree (parity is float rounding)."""
    figures = run_benchmark("s4.py", "--quick")
    assert_positive_numbers(figures, S4_FIGURES)
    assert 0.0 <= float(figures["reference_parity_max_abs_diff"]) < 1e-4


def test_preprocess_benchmark_prints_label_and_waveform_figures() -> None:
    """Performance issue, data at full scale: benchmarks/preprocess.py prints the label step's figures
    and the waveform step's ECGs per second per core, its peak RSS and the time for the 800 k
    MIMIC-IV-ECG records on 16 cores, which follows from the per-core rate."""
    figures = run_benchmark("preprocess.py", "--rows", "40000", "--ecgs", "12")
    assert_positive_numbers(figures, LABEL_FIGURES + WAVEFORM_FIGURES)
    assert (figures["waveform_ecgs"], figures["waveform_failed"]) == ("12", "0")
    hours = 800_000 / (float(figures["waveform_ecgs_per_s_per_core"]) * 16) / 3600
    assert math.isclose(float(figures["waveform_800k_on_16_cores_h"]), hours, rel_tol=0.01, abs_tol=1e-3)

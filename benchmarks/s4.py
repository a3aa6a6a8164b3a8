"""S4 benchmark: our S4 block and model against a re-implementation of the reference's kernel path.

Run: ``.venv/bin/python benchmarks/s4.py [--onnx] [--threads 2] [--quick]``. Prints one
``name: value`` line per figure:

* ``s4_block_fwd_bwd_samples_per_s``: one S4 block (d_model 512, d_state 8, bidirectional, L 250,
  batch 32), forward + backward, training mode, as ``model_training.model.S4Block`` computes it.
* ``reference_s4_block_fwd_bwd_samples_per_s`` and ``speedup_vs_reference``: the same block written
  the way the reference standalone S4 runs it (below), on the same input, weights and threads.
* ``reference_parity_max_abs_diff``: both blocks in eval mode on that input (they compute the same
  function; this shows it).
* ``s4_block_flop_floor_ratio``: block time / (its matmul FLOPs ÷ the float32 matmul rate numpy
  reaches in this run on the same shapes). The matmul FLOPs of a block are the 512→1024 projection:
  forward, input gradient and weight gradient, 3 × 2·B·L·H·2H.
* ``s4_block_cpu_flop_floor_ratio``, ``s4_block_fwd_bwd_cpu_ms``: the same ratio and the block's
  time in process CPU time (user + system, all threads) instead of wall time: on a machine shared
  with other work, wall time counts the waits for a core, CPU time does not.
* ``model_fwd_bwd_samples_per_s``: the whole ``FusionModel`` at the paper's sizes.
* with ``--onnx``: ``onnx_ecg_latency_ms_p50`` (ONNX Runtime CPU, one ECG = 4 windows of 250
  samples, the exported model) and ``onnx_flop_floor_ratio`` (vs its dense matmul FLOPs, ≈4.2 GFLOP,
  at numpy's rate), plus the same figures for a naive export whose convolution is the 499-tap
  depthwise conv1d of method §4 (``onnx_naive_conv_…``).
* ``cuda_…`` lines for the block, the reference block and the model when CUDA is available.

Training timings are the best of ``--repeats`` rounds, ONNX latencies the median; in each round the
compared functions (ours, the reference, the numpy floor GEMMs) run one after the other, so load
from other processes affects them alike and the ratios compare like with like. ``--quick`` (the
smoke test) runs one round of each figure on a block of width 64 and batch 4.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
from torch import Tensor, nn

from model_training.model import FusionModel, ModelConfig, S4Block
from model_training.s4_export import (
    EXPORT_CHUNK,
    ExportableFusionModel,
    FixedS4Block,
    export_onnx,
    random_inputs,
)

N_LABELS = 200  # head width for the model figure; the head is a negligible share of the cost
N_CONT = 20


# --------------------------------------------------------------------------------------------------
# The reference's way: standalone S4 (SSKernelNPLR + S4 + S4Model block), written from its description
# --------------------------------------------------------------------------------------------------
class ReferenceStyleS4Block(nn.Module):
    """One S4Model block as the reference standalone S4 computes it, batch-first ``(B, H, L)``.

    Every forward: Fourier nodes ``z = 2(1-ω)/(1+ω)`` at the ``l_max``-th roots of unity (cached at
    init), ``w·dt``, stacked ``[B, P] × [C…, Q]`` numerators, the naive Cauchy sum with explicit
    conjugate pairs, ``·dt``, rank-1 Woodbury, ``·2/(1+ω)``, ``irfft`` to ``l_max`` taps, the
    bidirectional ``pad(k0,(0,L)) + pad(flip(k1),(L,0))``, an FFT convolution of length 2L, ``+ u·D``,
    GELU, tied dropout, ``TransposedLinear`` (einsum) + GLU, then dropout, residual and a LayerNorm
    applied through two transposes. Weights are copied from one of our ``S4Block``s.
    """

    log_dt: Tensor
    w: Tensor
    B: Tensor
    P: Tensor
    Q: Tensor
    omega: Tensor
    z: Tensor

    def __init__(self, block: S4Block) -> None:
        """Copy ``block``'s buffers and parameters into the reference layout."""
        super().__init__()
        k = block.kernel
        self.l_max, self.p = k.l_max, block.dropout_inner.p
        self.register_buffer("log_dt", k.log_dt.clone())
        self.register_buffer("w", k.w.clone())  # (H, N/2, 2)
        self.register_buffer("B", k.B.clone()[None])  # (1, H, N/2, 2)
        self.register_buffer("P", k.P.clone()[None])  # (1, H, N/2, 2)
        self.register_buffer(
            "Q", torch.view_as_real(torch.view_as_complex(k.P.clone()).conj().resolve_conj())[None]
        )
        self.C = nn.Parameter(k.C.detach().clone())  # (2, H, N/2, 2)
        self.D = nn.Parameter(block.D.detach().clone()[None])  # (1, H)
        self.weight = nn.Parameter(block.output_linear.weight.detach().clone())  # (2H, H)
        self.bias = nn.Parameter(block.output_linear.bias.detach().clone()[:, None])  # (2H, 1)
        self.norm = nn.LayerNorm(k.d_model)
        self.norm.load_state_dict({"weight": block.norm.weight.detach(), "bias": block.norm.bias.detach()})
        omega = torch.tensor(np.exp(-2j * np.pi / self.l_max), dtype=torch.cfloat) ** torch.arange(
            self.l_max // 2 + 1
        )
        self.register_buffer("omega", torch.view_as_real(omega))
        self.register_buffer("z", torch.view_as_real(2 * (1 - omega) / (1 + omega)))

    def kernel(self) -> Tensor:
        """``(2, H, l_max)`` kernel, the reference's generating-function path."""
        dt = self.log_dt.exp()
        b, c, p, q, w = (torch.view_as_complex(t) for t in (self.B, self.C, self.P, self.Q, self.w))
        omega, z = torch.view_as_complex(self.omega), torch.view_as_complex(self.z)
        w = w * dt[:, None]  # (H, N/2)
        b_stack = torch.cat([b, p], dim=0)  # (2, H, N/2)
        c_stack = torch.cat([c, q], dim=0)  # (3, H, N/2)
        v = b_stack[:, None] * c_stack[None]  # (2, 3, H, N/2)
        v, w_pairs = torch.cat([v, v.conj()], -1), torch.cat([w, w.conj()], -1)  # conjugate pairs
        r = (v[..., None] / (z - w_pairs[..., None])).sum(-2)  # (2, 3, H, F)  naive Cauchy
        r = r * dt[:, None]
        k_f = r[:-1, :-1] - r[:-1, -1:] * r[-1:, :-1] / (1 + r[-1:, -1:])  # (1, 2, H, F)
        k_f = k_f * 2 / (1 + omega)
        return torch.fft.irfft(k_f, n=self.l_max)[0]  # (2, H, L)

    def _dropout(self, x: Tensor) -> Tensor:
        """``DropoutNd`` (tied over time) as the reference writes it: a boolean mask, then a rescale."""
        if not self.training:
            return x
        mask = torch.rand(x.shape[0], x.shape[1], 1, device=x.device) < 1 - self.p
        return x * mask * (1 / (1 - self.p))

    def forward(self, u: Tensor) -> Tensor:
        """``(B, H, L)`` → ``(B, H, L)``."""
        length = u.shape[-1]
        k0, k1 = self.kernel()[..., :length]  # (H, L) each
        k = F.pad(k0, (0, length)) + F.pad(k1.flip(-1), (length, 0))  # (H, 2L)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * length) * torch.fft.rfft(k, n=2 * length), n=2 * length)
        y = y[..., :length] + u * self.D[..., None]  # (B, H, L)
        y = self._dropout(F.gelu(y))
        y = torch.einsum("bul,vu->bvl", y, self.weight) + self.bias  # (B, 2H, L)
        y = F.glu(y, dim=-2)  # (B, H, L)
        x = self._dropout(y) + u
        return self.norm(x.transpose(-1, -2)).transpose(-1, -2)


# --------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------
def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
    pause: float = 0.1,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall times in seconds of each of ``fns`` over ``repeats`` rounds, after ``warmup`` rounds.

    The functions run interleaved (one of each per round), so a burst of load from other processes
    hits all of them alike and the ratios between them stay fair. ``pause`` seconds of sleep before
    each call let the previous engine's worker threads (OpenBLAS, OpenMP and ONNX Runtime spin-wait
    after their work) go idle, so that one engine's spinning does not slow the next one down.
    With ``cpu``, each call's process CPU time (user + system of all threads) is appended to
    ``cpu[name]`` as well.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(pause)
            if sync:
                sync()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c0)
    return times


def numpy_linear_gemms(rows: int, d_in: int, d_out: int, backward: bool) -> Callable[[], object]:
    """The float32 GEMMs of a ``d_in → d_out`` linear layer in numpy: the dense FLOP floor.

    Forward ``X Wᵀ``; with ``backward`` also the input gradient ``G W`` and the weight gradient
    ``Gᵀ X``; each is 2·rows·d_in·d_out FLOPs.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, d_in), dtype=np.float32)
    w = rng.standard_normal((d_out, d_in), dtype=np.float32)
    g = rng.standard_normal((rows, d_out), dtype=np.float32)
    if backward:
        return lambda: (x @ w.T, g @ w, g.T @ x)
    return lambda: x @ w.T


def fwd_bwd(module: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    """Forward and backward through ``module`` with a fixed output gradient (no loss, no optimiser)."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return step


def model_step(
    model: FusionModel, ecg: Tensor, cat: Tensor, cont: Tensor, target: Tensor
) -> Callable[[], None]:
    """Forward + backward of the fusion model with a BCE loss."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(ecg, cat, cont), target).backward()

    return step


def report(name: str, value: float) -> None:
    """One figure per line, ``name: value``."""
    print(f"{name}: {value:.4g}", flush=True)


# --------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------
def bench_block(cfg: ModelConfig, batch: int, repeats: int, device: torch.device, prefix: str) -> None:
    """Our block vs the reference-style block, and (on CPU) the ratio to the dense FLOP floor."""
    torch.manual_seed(0)
    block = S4Block(cfg).to(device).train()
    reference = ReferenceStyleS4Block(block).to(device).train()
    h, length = cfg.d_model, cfg.window
    x = torch.randn(h, batch, length, device=device, requires_grad=True)  # ours: channel-first
    x_ref = x.detach().permute(1, 0, 2).contiguous().requires_grad_()  # reference: (B, H, L)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with torch.no_grad():
        diff = (block.eval()(x) - reference.eval()(x_ref).permute(1, 0, 2)).abs().max().item()
    block.train()
    reference.train()
    grad = torch.randn_like(x)
    fns: dict[str, Callable[[], object]] = {
        "ours": fwd_bwd(block, x, grad),
        "reference": fwd_bwd(reference, x_ref, grad.permute(1, 0, 2).contiguous()),
    }
    if device.type == "cpu":
        fns["floor"] = numpy_linear_gemms(batch * length, h, 2 * h, backward=True)
    cpu_times: dict[str, list[float]] = {}
    t = {name: min(v) for name, v in interleaved_times(fns, repeats, sync=sync, cpu=cpu_times).items()}
    report(f"{prefix}s4_block_fwd_bwd_samples_per_s", batch / t["ours"])
    report(f"{prefix}reference_s4_block_fwd_bwd_samples_per_s", batch / t["reference"])
    report(f"{prefix}speedup_vs_reference", t["reference"] / t["ours"])
    report(f"{prefix}reference_parity_max_abs_diff", diff)
    if device.type == "cpu":
        c = {name: min(v) for name, v in cpu_times.items()}
        report("numpy_matmul_gflop_per_s", 3 * 2 * batch * length * h * 2 * h / t["floor"] / 1e9)
        report("s4_block_flop_floor_ratio", t["ours"] / t["floor"])
        report("s4_block_fwd_bwd_cpu_ms", 1e3 * c["ours"])
        report("s4_block_cpu_flop_floor_ratio", c["ours"] / c["floor"])


def bench_model(cfg: ModelConfig, batch: int, repeats: int, device: torch.device, prefix: str) -> None:
    """Whole fusion model, forward + backward."""
    torch.manual_seed(0)
    model = FusionModel(cfg, [f"y{i}" for i in range(N_LABELS)], [f"c{i}" for i in range(N_CONT)])
    ecg, cat, cont = (t.to(device) for t in random_inputs(model, batch))
    model.to(device).train()
    target = torch.randint(0, 2, (batch, N_LABELS), device=device).float()
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = interleaved_times({"model": model_step(model, ecg, cat, cont, target)}, repeats, sync=sync)
    report(f"{prefix}model_fwd_bwd_samples_per_s", batch / min(times["model"]))


class _NaiveConvBlock(nn.Module):
    """Method §4's first export idea, for comparison: the exported block with a 499-tap depthwise conv1d."""

    weight: Tensor
    D: Tensor

    def __init__(self, block: S4Block, fixed: FixedS4Block) -> None:
        """``block``: the trained block (for its kernel); ``fixed``: its exported form (dense constants)."""
        super().__init__()
        with torch.no_grad():
            k0, k1 = block.kernel()  # (H, L) each
        self.register_buffer("weight", torch.cat([k0.flip(-1), k1[:, :-1]], -1)[:, None])  # (H, 1, 2L-1)
        self.register_buffer("D", block.D.detach()[:, None].clone())  # (H, 1)
        self.fixed = fixed

    def forward(self, x: Tensor) -> Tensor:
        """``(H, B, L)`` → ``(H, B, L)``."""
        f = self.fixed
        h, length = f.d_model, f.length
        u = x.transpose(0, 1)  # (B, H, L)
        y = F.conv1d(u, self.weight, padding=length - 1, groups=h) + u * self.D  # (B, H, L)
        y = F.gelu(y.transpose(0, 1))  # (H, B, L)
        z = torch.matmul(f.weight, y.reshape(h, -1)) + f.bias  # (2H, B·L)
        x = x + F.glu(z, dim=0).view(h, -1, length)  # (H, B, L)
        centred = x - x.mean(0, keepdim=True)
        var = (centred * centred).mean(0, keepdim=True)
        return centred * torch.rsqrt(var + f.eps) * f.norm_weight + f.norm_bias


def _ort_session(path: Path, threads: int) -> Callable[[dict[str, np.ndarray]], object]:
    """A CPU ONNX Runtime session with ``threads`` intra-op threads, as a ``feed → outputs`` function."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def _naive_export(model: FusionModel, ecg: Tensor, cat: Tensor, cont: Tensor, path: Path) -> None:
    """Export ``model`` with every S4 convolution as a (2L-1)-tap depthwise conv1d (for comparison)."""
    naive = ExportableFusionModel.from_trained(model)
    naive.blocks = nn.ModuleList(
        _NaiveConvBlock(b, cast(FixedS4Block, f))
        for b, f in zip(model.ecg_encoder.s4_blocks(), naive.blocks, strict=True)
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if (naive(ecg, cat, cont) - torch.sigmoid(model(ecg, cat, cont))).abs().max() > 1e-4:
            raise RuntimeError("the naive conv1d comparison model does not match the model")
        torch.onnx.export(
            naive,
            (ecg, cat, cont),
            str(path),
            input_names=["ecg", "cat", "cont"],
            output_names=["probabilities"],
            opset_version=18,
            dynamo=False,
        )


def bench_onnx(cfg: ModelConfig, threads: int, repeats: int, chunk: int) -> None:
    """ONNX Runtime CPU latency (median) of the exported model for one ECG (4 windows) vs its FLOP floor.

    The floor is the model's dense matmul FLOPs (input linear, the four 512→1024 projections, static
    MLP, head; ≈4.2 GFLOP) at the best rate numpy reaches on the projection shape in the same run.
    """
    torch.manual_seed(0)
    model = FusionModel(cfg, [f"y{i}" for i in range(N_LABELS)], [f"c{i}" for i in range(N_CONT)]).eval()
    ecg, cat, cont = random_inputs(model, 4)
    feed = {"ecg": ecg.numpy(), "cat": cat.numpy(), "cont": cont.numpy()}
    rows, h = 4 * cfg.window, cfg.d_model
    linears = [m for m in [*model.static_encoder.modules(), model.head] if isinstance(m, nn.Linear)]
    flops = (
        2 * rows * cfg.n_leads * h
        + cfg.n_layers * 2 * rows * h * 2 * h
        + sum(2 * 4 * m.in_features * m.out_features for m in linears)
    )
    with tempfile.TemporaryDirectory() as tmp:
        path, naive_path = Path(tmp) / "model.onnx", Path(tmp) / "naive.onnx"
        export_onnx(model, path, chunk=chunk)
        _naive_export(model, ecg, cat, cont, naive_path)
        run, run_naive = _ort_session(path, threads), _ort_session(naive_path, threads)
        projection = numpy_linear_gemms(rows, h, 2 * h, backward=False)
        times = interleaved_times(
            {"onnx": lambda: run(feed), "naive": lambda: run_naive(feed), "gemm": projection},
            repeats,
            warmup=5,
        )
    floor = flops / (2 * rows * h * 2 * h / min(times["gemm"]))
    report("onnx_dense_gflop_per_ecg", flops / 1e9)
    report("onnx_ecg_latency_ms_p50", 1e3 * statistics.median(times["onnx"]))
    report("onnx_flop_floor_ratio", statistics.median(times["onnx"]) / floor)
    report("onnx_naive_conv_ecg_latency_ms_p50", 1e3 * statistics.median(times["naive"]))
    report("onnx_naive_conv_flop_floor_ratio", statistics.median(times["naive"]) / floor)


def main(argv: list[str] | None = None) -> int:
    """Parse options and run the benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime CPU threads")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--chunk", type=int, default=ModelConfig.chunk, help="chunk length, training convolution"
    )
    parser.add_argument(
        "--onnx-chunk", type=int, default=EXPORT_CHUNK, help="chunk length, exported convolution"
    )
    parser.add_argument("--onnx", action="store_true", help="also time the ONNX export in ONNX Runtime")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model figure")
    parser.add_argument(
        "--quick", action="store_true", help="one round of each figure on a small block (smoke test)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 4, 1
    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):  # numpy's BLAS gets the same number of threads
        run(args)
    return 0


def run(args: argparse.Namespace) -> None:
    """All figures for the parsed options."""
    cfg = ModelConfig(chunk=args.chunk, d_model=64 if args.quick else ModelConfig.d_model)
    cpu = torch.device("cpu")
    bench_block(cfg, args.batch, args.repeats, cpu, "")
    if not args.no_model:
        bench_model(cfg, args.batch, args.repeats, cpu, "")
    if args.onnx:
        bench_onnx(cfg, args.threads, 10 * args.repeats, args.onnx_chunk)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        bench_block(cfg, args.batch, 4 * args.repeats, gpu, "cuda_")
        bench_model(cfg, args.batch, 4 * args.repeats, gpu, "cuda_")


if __name__ == "__main__":
    raise SystemExit(main())

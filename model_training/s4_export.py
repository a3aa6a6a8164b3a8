"""The S4 convolution as a chunked state-space computation, and the ONNX export built on it.

Why: once the SSM is fixed, each direction's kernel is the impulse response of a small linear
system, ``k[j] = c · Ā^j B̄`` with an N = d_state (8) real state. A bidirectional convolution of
length L then needs neither an FFT nor a (2L-1)-tap depthwise conv (≈ 7× the dense layers in ONNX
Runtime): split time into chunks of T samples and

* inside a chunk, apply the exact T×T Toeplitz matrix of both directions' first taps (and D);
* between chunks, carry the state: each chunk is summarised by ``z = u_chunk @ in_map`` (N numbers
  per direction), states move one chunk with ``x @ transfer`` (= Ā^T), and reach the samples of
  the next chunk through ``out_map`` (rows ``c Ā^(i+1)``; the anticausal direction mirrors this).

Everything is a batched MatMul / Add / Slice / Concat on static-shape real tensors, so
``torch.onnx.export`` writes standard operators only (no complex numbers, no DFT, no custom ops).

Why a dense real 8×8 state and not N/2 = 4 diagonal complex modes: the state matrix of HiPPO-LegS
has the real eigenvalues -1, …, -N, and its eigenvector matrix has condition number ≈ 8e4 at N = 8;
diagonalising it puts per-mode coefficients of ~1e3 on a kernel of ~1e-2, which float32 cannot
cancel to 1e-5. The real form of the unitary NPLR basis (``model.real_state_space``) is well
conditioned, and Ā is a contraction there (LegS is dissipative), so the chunk recursion is stable.
All constant matrices are computed in float64 and rounded once.

Layout: channel-first ``(H, B, L)``; H is the batch dimension of every matmul.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    import onnx

    from model_training.model import FusionModel, S4Block

__all__ = [
    "ChunkMaps",
    "ExportableFusionModel",
    "FixedS4Block",
    "OnnxExportError",
    "check_onnx_operators",
    "chunk_maps",
    "chunked_conv",
    "export_onnx",
    "intra_chunk_matrix",
    "output_map",
    "random_inputs",
]

ONNX_PARITY_ATOL = 1e-4
# Chunk length of the exported convolution. In ONNX Runtime on CPU (one ECG, 4 windows of 250)
# 25 and 50 measured within 5 % of each other and 10 or 125 clearly slower; 25 keeps the file at
# about half the size (the per-channel T×T within-chunk matrices dominate it: 21 MB vs 43 MB).
EXPORT_CHUNK = 25
PARITY_BATCH_SIZES = (1, 7, 64)
_COMPLEX_ONNX_TYPES = {14, 15}  # TensorProto.COMPLEX64, COMPLEX128
_SPECTRAL_OPS = {"DFT", "STFT"}


class OnnxExportError(RuntimeError):
    """The exported graph failed a check (ONNX checker, operator set, or ONNX Runtime parity)."""


class ChunkMaps(NamedTuple):
    """Frozen matrices of the chunked convolution for one S4 layer (see module docstring).

    in_map: ``(H, T, D·N)`` chunk → per-direction state summary.
    transfer: ``(H, N, N)`` row-vector state update over one chunk (``(Ā^T)ᵀ``).
    out_basis: ``(H, N, T+1, N)`` ``E Ā^k`` for k = 0…T with ``E = (I - Ā^L)⁻¹``; contracting it with
    the trained ``c̃`` gives ``c_eff Ā^k`` (``output_map``).
    """

    in_map: Tensor
    transfer: Tensor
    out_basis: Tensor


def chunk_maps(a_bar: Tensor, b_bar: Tensor, l_max: int, chunk: int, n_dir: int) -> ChunkMaps:
    """The C-independent chunk matrices from the discrete system ``Ā (H, N, N)``, ``B̄ (H, N)``.

    Call with float64 inputs; the result has their dtype.
    """
    h, n, _ = a_bar.shape
    eye = torch.eye(n, dtype=a_bar.dtype, device=a_bar.device).expand(h, n, n)
    powers = [eye]
    for _ in range(chunk):
        powers.append(powers[-1] @ a_bar)
    pw = torch.stack(powers, 1)  # (H, T+1, N, N): Ā^k
    pb = (pw @ b_bar[:, None, :, None]).squeeze(-1)  # (H, T+1, N): Ā^k B̄
    in_fwd = pb[:, :chunk].flip(1)  # (H, T, N): sample j of a chunk reaches its end state as Ā^(T-1-j) B̄
    in_bwd = pb[:, :chunk]  # (H, T, N): …and its start state (anticausal) as Ā^j B̄
    in_map = torch.cat([in_fwd, in_bwd][:n_dir], -1)  # (H, T, D·N)
    correction = torch.linalg.inv(eye - torch.linalg.matrix_power(a_bar, l_max))  # (H, N, N)
    out_basis = (correction[:, None] @ pw).permute(0, 2, 1, 3)  # (H, N, T+1, N)
    return ChunkMaps(in_map, pw[:, chunk].transpose(-1, -2).contiguous(), out_basis.contiguous())


def output_map(c_r: Tensor, out_basis: Tensor, chunk: int) -> Tensor:
    """``(H, D·N, T)``: column i maps the state entering a chunk to its sample i.

    ``c_r (D, H, N)`` is the stored (length-corrected) ``c̃`` in real form; differentiable in it.
    Causal: the state after the previous chunk reaches sample i through ``c_eff Ā^(i+1)``;
    anticausal: the state before the next chunk reaches sample i through ``c_eff Ā^(T-1-i)``.
    """
    coef = torch.einsum("dhn,hnkm->dhkm", c_r, out_basis)  # (D, H, T+1, N): c_eff Ā^k
    rows = [coef[0, :, 1:]]  # (H, T, N)
    if c_r.shape[0] == 2:
        rows.append(coef[1, :, :chunk].flip(1))  # (H, T, N)
    return torch.cat(rows, -1).transpose(1, 2)  # (H, D·N, T)


def intra_chunk_matrix(taps: Tensor, d: Tensor, chunk: int) -> Tensor:
    """``(H, T, T)`` matrix M with ``y_chunk = u_chunk @ M`` for the within-chunk part (and ``D u``).

    ``taps (D, H, ≥T)`` are the first kernel taps of each direction, ``d (H,)`` the skip term.
    ``M[j, i] = k0[i-j] (+D on the diagonal)`` for ``j ≤ i`` and ``k1[j-i-1]`` for ``j > i``.
    """
    k0 = taps[0, :, :chunk]  # (H, T)
    k0 = torch.cat([k0[:, :1] + d[:, None], k0[:, 1:]], -1)  # lag 0 carries D
    k1 = taps[1, :, :chunk] if taps.shape[0] == 2 else torch.zeros_like(k0)  # (H, T)
    pos = torch.arange(chunk, device=taps.device)
    j, i = pos[:, None], pos[None, :]
    index = torch.where(i >= j, i - j, chunk + j - i - 1)  # (T, T) into [k0, k1]
    return torch.cat([k0, k1], -1)[:, index]  # (H, T, T)


def _add_bmm(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c + a @ b`` (batched): fused ``baddbmm`` when running, ``MatMul`` + ``Add`` when traced for
    export (the TorchScript exporter writes ``baddbmm`` with two extra multiplications by 1)."""
    if torch.jit.is_tracing():
        return c + torch.bmm(a, b)
    return torch.baddbmm(c, a, b)


def chunked_conv(
    u: Tensor, intra: Tensor, in_map: Tensor, transfer: Tensor, out_map: Tensor, n_chunks: int
) -> Tensor:
    """Exact bidirectional (or causal) long convolution, ``(H, B, L)`` → ``(H, B, L)``, L = n_chunks·T.

    ``intra (H, T, T)``, ``in_map (H, T, D·N)``, ``transfer (H, N, N)``, ``out_map (H, D·N, T)``.
    ``n_chunks`` is a Python int so that an exported graph has static chunk shapes. The chunk
    recursion is unrolled (L/T - 2 small matmuls per direction); chunks are taken apart with
    ``unbind`` so that the backward pass gathers their gradients with one ``stack``.
    """
    h, t, _ = intra.shape
    n = transfer.shape[-1]
    n_dir = in_map.shape[-1] // n
    uc = u.reshape(h, -1, t)  # (H, B·C, T) with C = L/T chunks
    y = torch.bmm(uc, intra)  # (H, B·C, T) within-chunk part
    if n_chunks == 1:
        return y.view(h, -1, t)
    z = torch.bmm(uc, in_map).view(h, -1, n_chunks, n_dir, n)  # (H, B, C, D, N) chunk summaries
    per_direction = []
    for d, z_dir in enumerate(z.unbind(3)):  # (H, B, C, N) per direction
        zc = z_dir.unbind(2)  # C × (H, B, N)
        if d == 1:  # anticausal: the same recursion from the last chunk backwards
            zc = zc[::-1]
        states = [torch.zeros_like(zc[0]), zc[0]]  # state entering chunk c: all chunks before it
        for c in range(2, n_chunks):
            states.append(_add_bmm(zc[c - 1], states[-1], transfer))  # (H, B, N)
        per_direction.append(torch.stack(states if d == 0 else states[::-1], 2))  # (H, B, C, N)
    s = torch.cat(per_direction, -1).view(h, -1, n_dir * n)  # (H, B·C, D·N)
    return _add_bmm(y, s, out_map).view(h, -1, n_chunks * t)  # (H, B, L)


# --------------------------------------------------------------------------------------------------
# The inference model
# --------------------------------------------------------------------------------------------------
class FixedS4Block(nn.Module):
    """An ``S4Block`` in eval mode with its convolution frozen into chunk matrices. ``(H, B, L)``."""

    intra: Tensor
    in_map: Tensor
    transfer: Tensor
    out_map: Tensor
    weight: Tensor
    bias: Tensor
    norm_weight: Tensor
    norm_bias: Tensor

    def __init__(self, block: S4Block, chunk: int, dtype: torch.dtype) -> None:
        """Precompute the chunk matrices in float64 from the trained block, store them in ``dtype``."""
        super().__init__()
        kernel = copy.deepcopy(block.kernel).double()  # float64 Cauchy kernel from the trained C
        with torch.no_grad():
            taps = kernel()  # (D, H, L)
            a_bar, b_bar, _ = kernel.state_space()
            maps = chunk_maps(a_bar, b_bar, kernel.l_max, chunk, kernel.n_dir)
            consts = {
                "intra": intra_chunk_matrix(taps, block.D.detach().double(), chunk),  # (H, T, T)
                "in_map": maps.in_map,  # (H, T, D·N)
                "transfer": maps.transfer,  # (H, N, N)
                "out_map": output_map(kernel.real_c(), maps.out_basis, chunk),  # (H, D·N, T)
                "weight": block.output_linear.weight.detach(),  # (2H, H)
                "bias": block.output_linear.bias.detach()[:, None],  # (2H, 1)
                "norm_weight": block.norm.weight.detach()[:, None, None],  # (H, 1, 1)
                "norm_bias": block.norm.bias.detach()[:, None, None],  # (H, 1, 1)
            }
        for name, value in consts.items():
            self.register_buffer(name, value.to(dtype).contiguous())
        self.eps = block.norm.eps
        self.d_model, self.length, self.chunk = kernel.d_model, kernel.l_max, chunk
        self.pad = -kernel.l_max % chunk

    def forward(self, x: Tensor) -> Tensor:
        """``(H, B, L)`` → ``(H, B, L)`` with L = the window."""
        h, length, pad = self.d_model, self.length, self.pad
        u = F.pad(x, (0, pad)) if pad else x  # (H, B, L + pad): a zero tail changes nothing on [0, L)
        n_chunks = (length + pad) // self.chunk
        y = chunked_conv(u, self.intra, self.in_map, self.transfer, self.out_map, n_chunks)  # (H, B, L + pad)
        y = F.gelu(y[..., :length] if pad else y)  # (H, B, L)
        z = torch.matmul(self.weight, y.reshape(h, -1)) + self.bias  # (2H, B·L)
        x = x + F.glu(z, dim=0).view(h, -1, length)  # (H, B, L)
        # LayerNorm over channels written out: ONNX LayerNormalization only normalises trailing axes.
        centred = x - x.mean(0, keepdim=True)  # (H, B, L)
        var = (centred * centred).mean(0, keepdim=True)  # (1, B, L)
        return centred * torch.rsqrt(var + self.eps) * self.norm_weight + self.norm_bias  # (H, B, L)


class ExportableFusionModel(nn.Module):
    """Inference form of ``FusionModel``: fixed window, chunked S4 convolution, sigmoid output.

    ``forward(ecg (B, 12, L), cat (B, 2) int64, cont (B, n_cont)) → probabilities (B, n_labels)``,
    equal to ``sigmoid(model.eval()(…))``. L = the model's window (padded to a multiple of the
    chunk internally when it is not one).
    """

    in_weight: Tensor
    in_bias: Tensor
    labels: tuple[str, ...]
    cont_features: tuple[str, ...]
    cat_features: tuple[str, ...]
    window: int
    chunk: int
    n_leads: int
    blocks: nn.ModuleList
    static_encoder: nn.Module
    head: nn.Module

    def __init__(self) -> None:
        """Use ``from_trained``."""
        super().__init__()

    @classmethod
    def from_trained(
        cls, model: FusionModel, chunk: int = EXPORT_CHUNK, dtype: torch.dtype = torch.float32
    ) -> ExportableFusionModel:
        """Freeze a trained ``FusionModel`` (its weights are copied; the model is not modified).

        ``chunk`` is the chunk length T of the convolution (a divisor of the window avoids padding);
        ``dtype`` float64 is for verification.
        """
        cfg = model.config
        if not 0 < chunk <= cfg.window:
            raise ValueError(f"chunk must be in [1, window={cfg.window}], got {chunk}")
        exp = cls()
        exp.labels, exp.cont_features, exp.cat_features = (
            model.labels,
            model.cont_features,
            model.cat_features,
        )
        exp.window, exp.chunk, exp.n_leads = cfg.window, chunk, cfg.n_leads
        enc = model.ecg_encoder
        exp.register_buffer("in_weight", enc.input_linear.weight.detach().to(dtype).clone())  # (H, C)
        exp.register_buffer("in_bias", enc.input_linear.bias.detach().to(dtype)[:, None].clone())  # (H, 1)
        exp.blocks = nn.ModuleList(FixedS4Block(b, chunk, dtype) for b in enc.s4_blocks())
        exp.static_encoder = copy.deepcopy(model.static_encoder).to(dtype).eval()
        exp.head = copy.deepcopy(model.head).to(dtype).eval()
        return exp.eval()

    def forward(self, ecg: Tensor, cat: Tensor, cont: Tensor) -> Tensor:
        """Probabilities ``(B, n_labels)``."""
        if not torch.jit.is_tracing() and tuple(ecg.shape[1:]) != (self.n_leads, self.window):
            raise ValueError(f"ecg must be (B, {self.n_leads}, {self.window}), got {tuple(ecg.shape)}")
        ecg = torch.where(torch.isnan(ecg), torch.zeros_like(ecg), ecg)  # (B, C, L)
        x = (
            torch.matmul(self.in_weight, ecg.transpose(0, 1).reshape(self.n_leads, -1)) + self.in_bias
        )  # (H, B·L)
        x = x.view(self.in_weight.shape[0], -1, self.window)  # (H, B, L)
        for block in self.blocks:
            x = block(x)  # (H, B, L)
        features = torch.cat([x.mean(-1).t(), self.static_encoder(cat, cont)], dim=1)  # (B, H + M)
        return torch.sigmoid(self.head(features))  # (B, n_labels)


# --------------------------------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------------------------------
def random_inputs(model: FusionModel, batch: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Plausible random model inputs (ECG in mV, valid category indices, continuous values)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    ecg = 0.5 * torch.randn(batch, cfg.n_leads, cfg.window, generator=g)
    cat = torch.stack([torch.randint(0, v, (batch,), generator=g) for v in cfg.vocab_sizes], 1)
    cont = torch.randn(batch, len(model.cont_features), generator=g)
    return ecg, cat, cont


def check_onnx_operators(onnx_model: onnx.ModelProto) -> None:
    """Raise ``OnnxExportError`` if the graph uses a non-standard domain, a DFT/STFT or a complex type."""
    import onnx

    graph = onnx_model.graph
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise OnnxExportError(f"ONNX node {node.name} uses custom domain {node.domain!r}")
        if node.op_type in _SPECTRAL_OPS:
            raise OnnxExportError(f"ONNX node {node.name} is a spectral op ({node.op_type})")
    values = [*graph.input, *graph.output, *graph.value_info]
    for v in values:
        if v.type.tensor_type.elem_type in _COMPLEX_ONNX_TYPES:
            raise OnnxExportError(f"ONNX value {v.name} has a complex type")
    for init in graph.initializer:
        if init.data_type in _COMPLEX_ONNX_TYPES:
            raise OnnxExportError(f"ONNX initializer {init.name} has a complex type")
    inferred = onnx.shape_inference.infer_shapes(onnx_model)
    for v in inferred.graph.value_info:
        if v.type.tensor_type.elem_type in _COMPLEX_ONNX_TYPES:
            raise OnnxExportError(f"ONNX value {v.name} has a complex type")


def export_onnx(model: FusionModel, path: Path, opset: int = 18, chunk: int = EXPORT_CHUNK) -> None:
    """Export ``model`` (as ``ExportableFusionModel``) to ONNX at ``path`` and verify it.

    Inputs ``ecg (B, 12, window)`` float32, ``cat (B, 2)`` int64, ``cont (B, n_cont)`` float32, output
    ``probabilities (B, n_labels)``; the batch axis is dynamic. The label and feature names, window
    and lead count are stored as JSON metadata properties ``ecglab.*``. Raises ``OnnxExportError``
    when the checker fails, the graph has complex or non-standard operators, or ONNX Runtime
    differs from ``sigmoid(model.eval()(…))`` by more than 1e-4 for batch sizes 1, 7 and 64.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    exportable = ExportableFusionModel.from_trained(model, chunk=chunk)
    example = random_inputs(model, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (static graph, no onnxscript dependency);
        # silence its deprecation notice and its constant-folding remarks.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(
            exportable,
            example,
            str(path),
            input_names=["ecg", "cat", "cont"],
            output_names=["probabilities"],
            dynamic_axes={
                "ecg": {0: "batch"},
                "cat": {0: "batch"},
                "cont": {0: "batch"},
                "probabilities": {0: "batch"},
            },
            opset_version=opset,
            dynamo=False,
        )
    onnx_model = onnx.load(str(path))
    # What the graph's inputs and outputs mean travels with it (the manifest repeats it).
    meta = {
        "ecglab.labels": list(model.labels),
        "ecglab.cont_features": list(model.cont_features),
        "ecglab.cat_features": list(model.cat_features),
        "ecglab.window": model.config.window,
        "ecglab.leads": model.config.n_leads,
    }
    onnx.helper.set_model_props(onnx_model, {k: json.dumps(v) for k, v in meta.items()})
    onnx.save(onnx_model, str(path))
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise OnnxExportError(f"{path}: ONNX checker failed: {exc}") from exc
    check_onnx_operators(onnx_model)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    was_training = model.training
    model.eval()
    try:
        for batch in PARITY_BATCH_SIZES:
            ecg, cat, cont = random_inputs(model, batch, seed=batch)
            with torch.no_grad():
                expected = torch.sigmoid(model(ecg, cat, cont)).numpy()
            (got,) = session.run(
                ["probabilities"], {"ecg": ecg.numpy(), "cat": cat.numpy(), "cont": cont.numpy()}
            )
            diff = float(np.max(np.abs(got - expected)))
            if not diff <= ONNX_PARITY_ATOL:
                raise OnnxExportError(
                    f"{path}: ONNX Runtime differs from the model by {diff:.3g} at batch {batch}"
                )
    finally:
        model.train(was_training)

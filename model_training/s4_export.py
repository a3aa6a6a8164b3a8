"""The ONNX export of a trained ``FusionModel``: its S4 convolutions frozen into chunk matrices.

Why: once training is over the SSM is fixed, so each S4 layer's convolution can be precomputed as
the chunked state-space scan of :mod:`model_training.s4_conv` (standard MatMul / Add / Slice /
Concat on static-shape real tensors). ``ExportableFusionModel`` is that inference form;
:func:`export_onnx` writes it with ``torch.onnx.export`` and proves, before returning, that the
graph uses standard operators only (no complex numbers, no DFT, no custom ops) and that ONNX
Runtime matches the PyTorch model.

Layout: channel-first ``(H, B, L)``; H is the batch dimension of every matmul.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_training.s4_conv import chunk_maps, chunked_conv, intra_chunk_matrix, output_map

if TYPE_CHECKING:
    import onnx

    from model_training.model import FusionModel, S4Block

__all__ = [
    "ExportableFusionModel",
    "FixedS4Block",
    "OnnxExportError",
    "check_onnx_operators",
    "export_onnx",
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

"""The S4 block's forward and backward written out by hand, as one autograd Function.

Why: on the CPU the block's cost beyond its three dense GEMMs (the H→2H projection, its input and
weight gradients) is memory traffic: every elementwise step of autograd's version reads and writes
whole ``(H, B·L)`` activations, allocates a fresh buffer for each, and some backward formulas add
passes of their own (``addcmul``'s weight gradient multiplies the normalised activations by 1,
``glu_backward`` recomputes the sigmoid, the LayerNorm backward runs separately from its affine
part, the projection's bias is first copied into its whole output). Here the same maths runs with
the fewest passes: the gate's sigmoid, the output dropout and the LayerNorm statistics are computed
once and reused, the bias and the dropout mask share one pass, temporaries are written in place,
the LayerNorm's channel reductions are matrix-vector products, the convolution's input gradient is
accumulated straight onto the residual's, and the GEMMs run through oneDNN (:func:`matmul`).
Nothing is approximated, and no saved tensor is modified, so the graph may be run backwards twice
(``retain_graph``).

Layout: channel-first ``(H, B, L)``, as :class:`model_training.model.S4Block`. The convolution is
the chunked scan of :mod:`model_training.s4_conv` (forward and hand-written backward).

``x → conv (+ D x) → GELU → ·mask_in → W·+b → [a; g] → x + a·σ(g)·mask_out → LayerNorm``,
where the masks are the time-tied dropout masks ``(H, B, 1)`` already divided by ``1 - p`` (None
in eval mode).
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from model_training.s4_conv import chunked_conv_backward, chunked_conv_states

__all__ = ["BlockWeights", "fused_s4_block", "matmul"]

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D tensors; float32 on the CPU through oneDNN's matmul (PyTorch's own ``mkldnn``
    linear kernel), else ``torch.mm``.

    Why: for the block's three projection GEMMs (1024×512 by 512×8000 and its two gradients)
    oneDNN takes about 13 % less time than the BLAS behind ``torch.mm`` on this project's 2-core
    CPU, at full float32 precision (no reduced-precision mode is enabled), in the same OpenMP
    thread pool (numpy's BLAS, as fast, would add a second pool of spinning threads). ``b`` may be
    a transposed view; ``a`` is made contiguous (it is the small operand or already is).
    """
    if _ONEDNN_LINEAR and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32:
        out: Tensor = torch.ops.mkldnn._linear_pointwise(a.contiguous(), b.t(), None, "none", [], "")
        return out
    return torch.mm(a, b)


def _saveable(*tensors: Tensor | None) -> tuple[Tensor, ...]:
    """``tensors`` for ``ctx.save_for_backward``, which takes None entries too (typed as Tensor)."""
    return cast(tuple[Tensor, ...], tensors)


class BlockWeights(NamedTuple):
    """Everything one block applies besides its input: the chunk matrices and the dense layers.

    ``intra (H, T, T)`` and ``out_map (H, D·N, T)`` carry the trained kernel (C and D) and may
    require gradients; ``in_map (H, T, D·N)`` and ``transfer (H, N, N)`` are frozen. ``weight
    (2H, H)``, ``bias (2H,)``: the projection; ``norm_weight``, ``norm_bias (H,)``: the LayerNorm.
    """

    intra: Tensor
    in_map: Tensor
    transfer: Tensor
    out_map: Tensor
    weight: Tensor
    bias: Tensor
    norm_weight: Tensor
    norm_bias: Tensor


class _FusedS4Block(torch.autograd.Function):
    """See the module docstring; ``apply(x, *BlockWeights, mask_in, mask_out, chunk, eps)``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        intra: Tensor,
        in_map: Tensor,
        transfer: Tensor,
        out_map: Tensor,
        weight: Tensor,
        bias: Tensor,
        norm_weight: Tensor,
        norm_bias: Tensor,
        mask_in: Tensor | None,
        mask_out: Tensor | None,
        chunk: int,
        eps: float,
    ) -> Tensor:
        """``(H, B, L)`` → ``(H, B, L)``."""
        h, n_batch, length = x.shape
        pad = -length % chunk
        u = F.pad(x, (0, pad)) if pad else x  # (H, B, L + pad): a zero tail changes nothing on [0, L)
        n_chunks = (length + pad) // chunk
        y, states = chunked_conv_states(u, intra, in_map, transfer, out_map, n_chunks)  # (H, B, L + pad)
        if pad:
            y = y[..., :length].contiguous()
        act = F.gelu(y)  # (H, B, L)
        if mask_in is not None:
            act.mul_(mask_in)
        # The bias is added in the passes that follow (no broadcast copy before the GEMM).
        z = matmul(weight, act.view(h, -1))  # (2H, B·L) = [a; g] without the bias
        a, gate = z[:h].view(h, n_batch, length), z[h:]
        gate.add_(bias[h:, None]).sigmoid_()  # σ(g), kept for the backward pass
        if mask_out is None:
            a.add_(bias[:h, None, None])
        else:  # (a + b)·mask_out = a·mask_out + b·mask_out, kept: the gate's gradient needs it
            torch.addcmul(bias[:h, None, None] * mask_out, a, mask_out, out=a)
        r = torch.addcmul(x, a, gate.view(h, n_batch, length)).view(h, -1)  # (H, B·L) residual sum
        x_hat, _, rstd = torch.native_batch_norm(r, None, None, None, None, True, 0.0, eps)
        del r  # batch_norm on (H, B·L) normalises each column over its H entries: LayerNorm's statistic
        ctx.save_for_backward(
            u, *_saveable(states), y, act, z, x_hat, rstd, intra, in_map, transfer, out_map, weight,
            norm_weight, *_saveable(mask_in, mask_out),
        )  # fmt: skip
        ctx.sizes = (n_chunks, pad)  # type: ignore[attr-defined]
        return torch.addcmul(norm_bias[:, None], x_hat, norm_weight[:, None]).view(h, n_batch, length)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        """Gradients for ``x``, ``intra``, ``out_map``, the projection and the LayerNorm."""
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        u, states, y, act, z, x_hat, rstd, intra, in_map, transfer, out_map, weight, norm_weight = saved[:13]
        mask_in, mask_out = saved[13:]
        n_chunks, pad = ctx.sizes  # type: ignore[attr-defined]
        h, n_batch, length = y.shape
        g = grad_out.contiguous().view(h, -1)  # (H, B·L)

        # LayerNorm: affine part, then the normalisation (column statistics over the H channels)
        grad_norm_bias = g.sum(1)  # (H,)
        buf = g * x_hat  # (H, B·L)
        grad_norm_weight = buf.sum(1)  # (H,)
        mean_gw = (norm_weight @ g) / h  # (B·L,) mean over channels of g·w
        mean_gwx = (norm_weight @ buf) / h  # (B·L,) mean over channels of g·w·x̂
        g_r = torch.addcmul(-mean_gw[None], g, norm_weight[:, None], out=buf)  # g·w - mean(g·w)
        g_r.mul_(rstd[None]).addcmul_(x_hat, (mean_gwx * rstd)[None], value=-1.0)  # (H, B·L)

        # r = x + a'·σ(g) with a' = (a + b)·mask_out and z = [a'; σ(g)]: the projection's gradient
        a, gate = z[:h], z[h:]
        g_z = torch.empty_like(z)  # (2H, B·L) = [grad a; grad g]
        g_a, g_g = g_z[:h], g_z[h:]
        torch.mul(gate, g_r, out=g_a)  # σ·g_r
        torch.mul(g_a, a, out=g_g).addcmul_(g_g, gate, value=-1.0)  # a'·σ(1 - σ)·g_r = grad g
        if mask_out is not None:
            g_a.view(h, n_batch, length).mul_(mask_out)  # = grad a
        grad_bias = g_z.sum(1)  # (2H,)
        grad_weight = matmul(g_z, act.view(h, -1).t())  # (2H, H)
        g_act = matmul(weight.t(), g_z).view(h, n_batch, length)  # (H, B, L)
        if mask_in is not None:
            g_act.mul_(mask_in)
        g_y = torch.ops.aten.gelu_backward.grad_input(g_act, y, grad_input=g_act)  # in place
        if pad:
            g_y = F.pad(g_y, (0, pad))

        # convolution; its input gradient is accumulated onto the residual's (g_r) in place
        g_x = g_r.view(h, n_batch, length)
        g_u, g_intra, g_out_map = chunked_conv_backward(
            g_y, u, states, intra, in_map, transfer, out_map, n_chunks, None if pad else g_x
        )
        if pad:
            g_x.add_(g_u[..., :length])
        return (
            g_x,
            g_intra,
            None,
            None,
            g_out_map,
            grad_weight,
            grad_bias,
            grad_norm_weight,
            grad_norm_bias,
            None,
            None,
            None,
            None,
        )


def fused_s4_block(
    x: Tensor,
    weights: BlockWeights,
    mask_in: Tensor | None,
    mask_out: Tensor | None,
    chunk: int,
    eps: float,
) -> Tensor:
    """One S4 block, ``(H, B, L)`` → ``(H, B, L)``, with the hand-written backward (module docstring).

    ``mask_in`` / ``mask_out``: tied dropout masks ``(H, B, 1)`` already divided by ``1 - p``, or
    None. ``chunk``: the scan's chunk length T (L need not be a multiple of it). ``eps``: the
    LayerNorm's epsilon.
    """
    out: Tensor = _FusedS4Block.apply(x, *weights, mask_in, mask_out, chunk, eps)
    return out

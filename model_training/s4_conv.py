"""The S4 convolution maths: a kernel applied to a sequence, by FFT or as a chunked state-space scan.

Both the training model (:mod:`model_training.model`) and its ONNX export
(:mod:`model_training.s4_export`) apply an S4 kernel through these functions, built from the same
chunk matrices (:func:`chunk_maps`, :func:`output_map`, :func:`intra_chunk_matrix`). Layout:
channel-first ``(H, B, L)``; H is the batch dimension of every matmul.

``y[t] = Σ_{s≤t} k0[t-s] u[s] + Σ_{s>t} k1[s-t-1] u[s] + D u[t]`` (kernel 0 causal, kernel 1
anticausal; a causal layer has kernel 0 only). Two exact ways to compute it:

* :func:`fft_conv`: the reference formulation, ``rfft(k, n=2L) · rfft(u, n=2L) → irfft``.
* :func:`chunked_conv`: once the SSM is fixed, each direction's kernel is the impulse response of a
  small linear system, ``k[j] = c · Ā^j B̄`` with an N = d_state (8) real state. A bidirectional
  convolution of length L then needs neither an FFT nor a (2L-1)-tap depthwise conv (≈ 7× the
  dense layers in ONNX Runtime): split time into chunks of T samples and

  - inside a chunk, apply the exact T×T Toeplitz matrix of both directions' first taps (and D);
  - between chunks, carry the state: each chunk is summarised by ``z = u_chunk @ in_map`` (N numbers
    per direction), states move one chunk with ``x @ transfer`` (= Ā^T), and reach the samples of
    the next chunk through ``out_map`` (rows ``c Ā^(i+1)``; the anticausal direction mirrors this).

  Everything is a batched MatMul / Add / Slice / Concat on static-shape real tensors, so
  ``torch.onnx.export`` writes standard operators only (no complex numbers, no DFT, no custom ops).

Training runs the same chunked scan in the form that is fastest under autograd on a CPU:
:func:`chunked_conv_states` advances both directions in one recursion (:func:`scan_states`), and
:func:`chunked_conv_backward` is its hand-written adjoint (used by :class:`ChunkedConv` and by the
fused block of :mod:`model_training.s4_fused`). The trained taps come from the state space
(:func:`chunk_operands`), not from an FFT of the Cauchy kernel: the same numbers, far cheaper per
step. Tests pin the FFT path, the training scan and the exported scan to each other.

Why a dense real 8×8 state and not N/2 = 4 diagonal complex modes: the state matrix of HiPPO-LegS
has the real eigenvalues -1, …, -N, and its eigenvector matrix has condition number ≈ 8e4 at N = 8;
diagonalising it puts per-mode coefficients of ~1e3 on a kernel of ~1e-2, which float32 cannot
cancel to 1e-5. The real form of the unitary NPLR basis (``model.real_state_space``) is well
conditioned, and Ā is a contraction there (LegS is dissipative), so the chunk recursion is stable.
All constant matrices are computed in float64 and rounded once.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ChunkMaps",
    "ChunkedConv",
    "chunk_maps",
    "chunk_operands",
    "chunked_conv",
    "chunked_conv_backward",
    "chunked_conv_states",
    "chunked_kernel_conv",
    "fft_conv",
    "intra_chunk_matrix",
    "output_map",
    "scan_states",
]


def fft_conv(u: Tensor, k: Tensor, d: Tensor) -> Tensor:
    """``y = k * u + D·u`` by FFT of length 2L: ``u (H, B, L)``, taps ``k (D, H, ≥L)``, ``d (H,)``.

    The anticausal kernel is flipped into the upper half of the length-2L circular kernel, so the
    circular convolution of the zero-padded input is the non-causal linear one.
    """
    length = u.shape[-1]
    k = k[..., :length]  # (D, H, L)
    k_lin = F.pad(k[0], (0, length))  # (H, 2L): causal taps at lags 0…L-1
    if k.shape[0] == 2:
        k_lin = k_lin + F.pad(k[1].flip(-1), (length, 0))  # anticausal taps wrap to the end
    y = torch.fft.irfft(
        torch.fft.rfft(u, n=2 * length) * torch.fft.rfft(k_lin, n=2 * length)[:, None], n=2 * length
    )[..., :length]  # (H, B, L)
    return y + u * d[:, None, None]


class ChunkMaps(NamedTuple):
    """Frozen matrices of the chunked convolution for one S4 layer (see module docstring).

    in_map: ``(H, T, D·N)`` chunk → per-direction state summary.
    transfer: ``(H, N, N)`` row-vector state update over one chunk (``(Ā^T)ᵀ``).
    out_basis: ``(H, N, T+1, N)`` ``E Ā^k`` for k = 0…T with ``E = (I - Ā^L)⁻¹``; contracting it with
    the trained ``c̃`` gives ``c_eff Ā^k`` (``output_map``).
    tap_basis: ``(H, N, T)`` ``E Ā^j B̄`` for j < T; contracting it with ``c̃`` gives the first T
    taps of each direction's kernel, ``c_eff Ā^j B̄`` (``chunk_operands``).
    """

    in_map: Tensor
    transfer: Tensor
    out_basis: Tensor
    tap_basis: Tensor


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
    tap_basis = (correction[:, None] @ pb[:, :chunk, :, None]).squeeze(-1).transpose(1, 2)  # (H, N, T)
    transfer = pw[:, chunk].transpose(-1, -2).contiguous()
    return ChunkMaps(in_map, transfer, out_basis.contiguous(), tap_basis.contiguous())


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


def chunk_operands(c_r: Tensor, d: Tensor, maps: ChunkMaps, chunk: int) -> tuple[Tensor, Tensor]:
    """The trained chunk matrices ``intra (H, T, T)`` and ``out_map (H, D·N, T)``, differentiable in
    ``c_r (D, H, N)`` (the stored ``c̃`` in real form) and ``d (H,)``.

    The first T taps of each direction come from ``maps.tap_basis``: the same numbers as the first
    taps of the Cauchy kernel (``model.S4Kernel.forward``), since the kernel is the impulse response
    of the system, but without evaluating the generating function at all ``l_max`` FFT nodes and an
    inverse FFT on every training step for the T taps the scan uses.
    """
    taps = torch.einsum("dhn,hnt->dht", c_r, maps.tap_basis)  # (D, H, T)
    return intra_chunk_matrix(taps, d, chunk), output_map(c_r, maps.out_basis, chunk)


def _add_bmm(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c + a @ b`` (batched): fused ``baddbmm`` when running, ``MatMul`` + ``Add`` when traced for
    export (the TorchScript exporter writes ``baddbmm`` with two extra multiplications by 1)."""
    if torch.jit.is_tracing():
        return c + torch.bmm(a, b)
    return torch.baddbmm(c, a, b)


def scan_states(z: Tensor, transfer: Tensor, n_chunks: int, reverse: tuple[bool, ...]) -> Tensor:
    """States entering each chunk from the chunk summaries: ``z (H, B, C, D, N)`` → ``(H, B·C, D·N)``.

    Direction d runs from the first chunk forwards (``reverse[d]`` False: the state entering chunk c
    sums the chunks before it, ``s[c] = z[c-1] + s[c-1] @ transfer``) or from the last chunk
    backwards (True: it sums the chunks after it). The convolution's causal direction is forward and
    its anticausal one backward; the adjoint (:func:`chunked_conv_backward`) runs the same recursion
    with the directions swapped and ``transferᵀ``. ``n_chunks ≥ 2``.

    Both directions advance together: step k carries direction d's state for its k-th chunk in
    processing order, with the block-diagonal ``diag(transfer, …)``, so the recursion is ``C - 2``
    small matmuls in all. One ``stack`` gathers the inputs in that order and one writes the states
    back in chunk order.
    """
    h, n_batch, _, n_dir, n = z.shape

    def order(d: int, k: int) -> int:  # the chunk that direction d handles at step k
        return n_chunks - 1 - k if reverse[d] else k

    z_steps = torch.stack([z[:, :, order(d, k), d] for k in range(n_chunks) for d in range(n_dir)], 2).view(
        h, n_batch, n_chunks, n_dir * n
    )  # (H, B, C, D·N): step k's summaries
    step = transfer
    if n_dir > 1:
        step = transfer.new_zeros(h, n_dir * n, n_dir * n)  # (H, D·N, D·N) = diag(transfer, …)
        for d in range(n_dir):
            step[:, d * n : (d + 1) * n, d * n : (d + 1) * n] = transfer
    states = [z_steps.new_zeros(h, n_batch, n_dir * n), z_steps[:, :, 0]]  # (H, B, D·N) at steps 0, 1
    for k in range(2, n_chunks):
        states.append(_add_bmm(z_steps[:, :, k - 1], states[-1], step))
    items = [states[order(d, c)][..., d * n : (d + 1) * n] for c in range(n_chunks) for d in range(n_dir)]
    return torch.stack(items, 2).view(h, -1, n_dir * n)  # (H, B·C, D·N) in chunk order


def chunked_conv_states(
    u: Tensor, intra: Tensor, in_map: Tensor, transfer: Tensor, out_map: Tensor, n_chunks: int
) -> tuple[Tensor, Tensor | None]:
    """The training form of :func:`chunked_conv`: the same function, with both directions in one
    scan (:func:`scan_states`); it also returns the chunk states ``(H, B·C, D·N)`` (None for one
    chunk), which the backward pass (:func:`chunked_conv_backward`) needs for the gradient of
    ``out_map``. Not traceable for export (in-place ops); :func:`chunked_conv` is the exported form."""
    h, t, _ = intra.shape
    n = transfer.shape[-1]
    n_dir = in_map.shape[-1] // n
    uc = u.reshape(h, -1, t)  # (H, B·C, T) with C = L/T chunks
    y = torch.bmm(uc, intra)  # (H, B·C, T) within-chunk part
    if n_chunks == 1:
        return y.view(h, -1, t), None
    z = torch.bmm(uc, in_map).view(h, -1, n_chunks, n_dir, n)  # (H, B, C, D, N) chunk summaries
    s = scan_states(z, transfer, n_chunks, (False, True)[:n_dir])  # (H, B·C, D·N)
    return y.baddbmm_(s, out_map).view(h, -1, n_chunks * t), s  # (H, B, L)


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


def chunked_conv_backward(
    grad: Tensor,
    u: Tensor,
    states: Tensor | None,
    intra: Tensor,
    in_map: Tensor,
    transfer: Tensor,
    out_map: Tensor,
    n_chunks: int,
    accumulate: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`chunked_conv` for the output gradient ``grad (H, B, L)``: ``(u, intra, out_map)``.

    The convolution is linear in ``u``, so its adjoint is the same chunked scan run with every map
    transposed: ``gradᵀ`` enters through ``out_mapᵀ``, the states travel the other way with
    ``transferᵀ`` and leave through ``in_mapᵀ``; the within-chunk part is ``grad @ intraᵀ``. The
    matrix gradients are ``u_chunkᵀ @ grad`` and ``statesᵀ @ grad``. ``in_map`` and ``transfer``
    are frozen (no gradient). Written out because autograd's version of the unrolled recursion costs
    more than the matmuls themselves (one gather, copy and accumulation per chunk and direction).
    ``states`` are the ones :func:`chunked_conv_states` returned (None for one chunk). With
    ``accumulate (H, B, L)`` the input gradient is added to it in place and it is returned.
    """
    h, t, _ = intra.shape
    n = transfer.shape[-1]
    n_dir = in_map.shape[-1] // n
    gc = grad.reshape(h, -1, t)  # (H, B·C, T)
    g_intra = torch.bmm(u.reshape(h, -1, t).transpose(1, 2), gc)  # (H, T, T)
    if accumulate is None:
        g_u = torch.bmm(gc, intra.transpose(1, 2))  # (H, B·C, T)
    else:
        g_u = accumulate.view(h, -1, t).baddbmm_(gc, intra.transpose(1, 2))
    if states is None:
        return g_u.view(h, -1, n_chunks * t), g_intra, None
    g_out = torch.bmm(states.transpose(1, 2), gc)  # (H, D·N, T)
    g_states = torch.bmm(gc, out_map.transpose(1, 2)).view(h, -1, n_chunks, n_dir, n)  # (H, B, C, D, N)
    g_z = scan_states(g_states, transfer.transpose(1, 2), n_chunks, (True, False)[:n_dir])  # (H, B·C, D·N)
    return g_u.baddbmm_(g_z, in_map.transpose(1, 2)).view(h, -1, n_chunks * t), g_intra, g_out


def _saveable(*tensors: Tensor | None) -> tuple[Tensor, ...]:
    """``tensors`` for ``ctx.save_for_backward``, which takes None entries too (typed as Tensor)."""
    return cast(tuple[Tensor, ...], tensors)


class ChunkedConv(torch.autograd.Function):
    """:func:`chunked_conv` with the hand-written backward of :func:`chunked_conv_backward`.

    ``apply(u, intra, in_map, transfer, out_map, n_chunks)``; gradients flow to ``u``, ``intra`` and
    ``out_map`` (``in_map`` and ``transfer`` are frozen).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        u: Tensor,
        intra: Tensor,
        in_map: Tensor,
        transfer: Tensor,
        out_map: Tensor,
        n_chunks: int,
    ) -> Tensor:
        """``(H, B, L)`` → ``(H, B, L)``; saves the input and the chunk states."""
        y, states = chunked_conv_states(u, intra, in_map, transfer, out_map, n_chunks)
        ctx.save_for_backward(u, *_saveable(states), intra, in_map, transfer, out_map)
        ctx.n_chunks = n_chunks  # type: ignore[attr-defined]
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        """Gradients for ``u``, ``intra`` and ``out_map``."""
        u, states, intra, in_map, transfer, out_map = ctx.saved_tensors  # type: ignore[attr-defined]
        g_u, g_intra, g_out = chunked_conv_backward(
            grad.contiguous(),
            u,
            states,
            intra,
            in_map,
            transfer,
            out_map,
            ctx.n_chunks,  # type: ignore[attr-defined]
        )
        return g_u, g_intra, None, None, g_out, None


def chunked_kernel_conv(u: Tensor, d: Tensor, maps: ChunkMaps, c_r: Tensor, chunk: int) -> Tensor:
    """``y = k * u + D·u`` as a chunked scan: ``u (H, B, L)``, ``d (H,)``.

    ``maps`` are the layer's :func:`chunk_maps` and ``c_r (D, H, N)`` its trained output vectors in
    real form, which define the kernel k (gradients flow through ``d`` and ``c_r``). A length that
    is not a multiple of ``chunk`` is padded with zeros, which changes neither direction's output
    on ``[0, L)``.
    """
    length = u.shape[-1]
    intra, out = chunk_operands(c_r, d, maps, chunk)  # (H, T, T), (H, D·N, T)
    pad = -length % chunk
    u = F.pad(u, (0, pad)) if pad else u  # (H, B, L + pad)
    n_chunks = (length + pad) // chunk
    if torch.jit.is_tracing():  # export: plain operators, no autograd.Function
        y = chunked_conv(u, intra, maps.in_map, maps.transfer, out, n_chunks)
    else:
        y = ChunkedConv.apply(u, intra, maps.in_map, maps.transfer, out, n_chunks)
    return y[..., :length] if pad else y  # (H, B, L)

"""The paper's ECG + metadata fusion model in plain PyTorch (method §3.1, §3.2).

Read top to bottom:

1. ``ModelConfig``: every size, with the paper's values as defaults.
2. HiPPO-LegS in normal-plus-low-rank (NPLR) form, and its bilinear discretisation.
3. ``S4Kernel``: the S4 convolution kernel, computed as the reference does: a Cauchy kernel at
   the FFT nodes (the roots of unity), a Woodbury correction for the rank-1 term, then ``irfft``.
4. ``S4Block``: S4 convolution (+ ``D`` skip) → GELU → time-tied dropout → 512→1024 projection + GLU
   → dropout → residual → post-LayerNorm.
5. ``EcgEncoder`` (linear 12→512, S4 blocks, mean pool), ``StaticEncoder`` (embeddings + BN/dropout/
   linear MLP), ``FusionModel`` (concatenation and one linear head over every target).

The ECG branch keeps activations channel-first, ``(H, B, L)`` (H = d_model, B = batch, L = time).
Why: the 512→1024 projection is then a single GEMM ``W (2H, H) @ X (H, B·L)``, and the chunked
convolution (see ``model_training.s4_conv``) is a batched matmul over channels, so no transpose
is needed anywhere inside a block. The public ``FusionModel.forward`` takes the ECG as ``(B, 12, L)``.

Two exact ways to apply the same kernel (``ModelConfig.conv``):

* ``"fft"``: the reference formulation, ``rfft(k, n=2L) · rfft(u, n=2L) → irfft``.
* ``"chunked"`` (default): the kernel of each direction is that of an 8-state linear system, so the
  long convolution is split into chunks of ``ModelConfig.chunk`` samples: a small Toeplitz matmul
  inside each chunk (its taps: the first taps of that kernel, from the state space) and the state
  carried between chunks. Same function of the same parameters (tests check values and gradients
  against the FFT path and the plain recurrence); it is what the ONNX export runs, and in training
  the whole block then runs as one autograd Function with a hand-written backward
  (``model_training.s4_fused``), about 1.4× its dense-FLOP floor on this project's 2-core CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_training.s4_conv import (
    ChunkMaps,
    chunk_maps,
    chunk_operands,
    chunked_kernel_conv,
    fft_conv,
)
from model_training.s4_fused import BlockWeights, fused_s4_block

__all__ = [
    "EcgEncoder",
    "FusionModel",
    "ModelConfig",
    "S4Block",
    "S4Kernel",
    "StaticEncoder",
    "TiedDropout",
    "bilinear_discretise",
    "hippo_legs",
    "nplr_legs",
    "real_state_space",
]


# --------------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """Every size of the model; defaults are the paper's (method §3.1, §3.2).

    ``window`` is the training/inference window in samples (250 = 2.5 s at 100 Hz); the S4 kernel is
    built for this length (``l_max`` in the reference) and inputs may not be longer.
    ``conv`` / ``chunk`` choose how the (identical) convolution is computed, not what it computes.
    """

    d_model: int = field(default=512, metadata={"help": "S4 width H (channels of every block)"})
    d_state: int = field(default=8, metadata={"help": "S4 state size N (even: N/2 complex modes)"})
    n_layers: int = field(default=4, metadata={"help": "number of S4 blocks"})
    dropout: float = field(default=0.2, metadata={"help": "time-tied dropout inside and after each S4 block"})
    bidirectional: bool = field(
        default=True, metadata={"help": "causal + anticausal kernel (non-causal conv)"}
    )
    dt_min: float = field(default=1e-3, metadata={"help": "lower bound of the log-uniform dt init"})
    dt_max: float = field(default=1e-1, metadata={"help": "upper bound of the log-uniform dt init"})
    window: int = field(
        default=250, metadata={"help": "ECG window in samples (2.5 s at 100 Hz); kernel length"}
    )
    n_leads: int = field(default=12, metadata={"help": "ECG leads (input channels)"})
    mlp_dims: tuple[int, ...] = field(default=(128, 128, 128), metadata={"help": "static MLP layer widths"})
    mlp_dropouts: tuple[float, ...] = field(
        default=(0.25, 0.25, 0.5), metadata={"help": "dropout before each static MLP linear layer"}
    )
    emb_dims: tuple[int, ...] = field(
        default=(16, 32), metadata={"help": "embedding width per categorical feature"}
    )
    vocab_sizes: tuple[int, ...] = field(
        default=(2, 5), metadata={"help": "categories per categorical feature"}
    )
    conv: Literal["fft", "chunked"] = field(
        default="chunked",
        metadata={"help": "how the S4 convolution is computed (same result): fft or chunked"},
    )
    chunk: int = field(default=25, metadata={"help": "chunk length T of the chunked convolution"})
    layer_norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of the post-LayerNorm"})

    def __post_init__(self) -> None:
        """Reject sizes the model cannot be built with, naming the field."""
        positive = ("d_model", "d_state", "n_layers", "window", "n_leads", "chunk")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_state % 2:
            raise ValueError(f"ModelConfig.d_state must be even (conjugate pairs), got {self.d_state}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"ModelConfig.dt_min/dt_max must satisfy 0 < dt_min <= dt_max, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if len(self.mlp_dims) != len(self.mlp_dropouts) or not self.mlp_dims:
            raise ValueError("ModelConfig.mlp_dims and mlp_dropouts must be non-empty and equally long")
        if len(self.emb_dims) != len(self.vocab_sizes):
            raise ValueError("ModelConfig.emb_dims and vocab_sizes must be equally long")
        if self.conv not in ("fft", "chunked"):
            raise ValueError(f"ModelConfig.conv must be 'fft' or 'chunked', got {self.conv!r}")
        if self.chunk > self.window:
            raise ValueError(f"ModelConfig.chunk ({self.chunk}) must not exceed window ({self.window})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are an error so a stale manifest is noticed."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**values)


# --------------------------------------------------------------------------------------------------
# 2. HiPPO-LegS, its NPLR form, and the real discrete state space
# --------------------------------------------------------------------------------------------------
def hippo_legs(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """HiPPO-LegS continuous-time matrices in float64: ``A (n, n)``, ``B (n,)`` and the rank-1 ``P (n,)``.

    ``A[i, k] = -sqrt((2i+1)(2k+1))`` below the diagonal, ``-(i+1)`` on it, 0 above; ``B = sqrt(2i+1)``;
    ``P = sqrt(i + 1/2)`` makes ``A + P Pᵀ = -I/2 + skew-symmetric`` a normal matrix.
    """
    q = torch.arange(n, dtype=torch.float64)
    i, k = q[:, None], q[None, :]
    lower = torch.sqrt((2 * i + 1) * (2 * k + 1))
    a = -torch.where(i > k, lower, torch.where(i == k, i + 1, torch.zeros((), dtype=torch.float64)))
    return a, torch.sqrt(2 * q + 1), torch.sqrt(q + 0.5)


def nplr_legs(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """LegS in diagonal-plus-low-rank form in the unitary eigenbasis of its normal part (float64).

    Returns complex ``w, P, B`` of shape ``(n/2,)`` such that, with the conjugate halves appended,
    ``A = V (diag(w_full) - P_full P_fullᴴ) Vᴴ``. Like the standalone S4 (``nplr``), only one eigenvalue
    of each conjugate pair is kept: the system is real, so the other half is its complex conjugate.
    """
    a, b, p = hippo_legs(n)
    w, v = torch.linalg.eig(a + p[:, None] * p[None, :])  # (n,), (n, n)
    keep = torch.argsort(w.imag)[n // 2 :]  # the n/2 eigenvalues with positive imaginary part
    w, v = w[keep], v[:, keep]  # (n/2,), (n, n/2)
    v_inv = v.conj().T  # (n/2, n): V is unitary because A + P Pᵀ is normal
    return w, v_inv @ p.to(v.dtype), v_inv @ b.to(v.dtype)


def real_state_space(w: Tensor, p: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Real form of the conjugate-symmetric DPLR system: ``A_r (H, N, N)``, ``b_r (H, N)``.

    The complex state ``x`` (N/2 modes; the other N/2 are their conjugates) is written as the real
    vector ``[Re x, Im x]``. With ``p_r = [Re p, Im p]``: ``A_r = [[Re w, -Im w], [Im w, Re w]] - 2 p_r p_rᵀ``
    and ``b_r = [Re b, Im b]``. This basis is unitary up to a factor √2, so it is well conditioned
    (the eigenbasis of LegS is not: its eigenvalues are the reals -1…-N with condition number ~1e5).
    """
    wr, wi = torch.diag_embed(w.real), torch.diag_embed(w.imag)  # (H, N/2, N/2)
    lam = torch.cat([torch.cat([wr, -wi], -1), torch.cat([wi, wr], -1)], -2)  # (H, N, N)
    p_r = torch.cat([p.real, p.imag], -1)  # (H, N)
    a_r = lam - 2 * p_r[..., :, None] * p_r[..., None, :]  # (H, N, N)
    return a_r, torch.cat([b.real, b.imag], -1)  # (H, N, N), (H, N)


def bilinear_discretise(a: Tensor, b: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear (Tustin) discretisation: ``Ā = (I - dt/2 A)⁻¹ (I + dt/2 A)``, ``B̄ = (I - dt/2 A)⁻¹ dt B``.

    ``a (H, N, N)``, ``b (H, N)``, ``dt (H,)`` → ``Ā (H, N, N)``, ``B̄ (H, N)``.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    half = dt[:, None, None] / 2 * a  # (H, N, N)
    left = eye - half
    a_bar = torch.linalg.solve(left, eye + half)  # (H, N, N)
    b_bar = torch.linalg.solve(left, dt[:, None] * b)  # (H, N)
    return a_bar, b_bar


def real_output_vector(c: Tensor) -> Tensor:
    """``C (..., N/2) complex`` → real ``c_r (..., N)`` with ``y = 2 Re(C·x) = c_r · [Re x, Im x]``."""
    return torch.cat([2 * c.real, -2 * c.imag], -1)


def complex_output_vector(c_r: Tensor) -> Tensor:
    """Inverse of ``real_output_vector``."""
    half = c_r.shape[-1] // 2
    return torch.complex(c_r[..., :half] / 2, -c_r[..., half:] / 2)


# --------------------------------------------------------------------------------------------------
# 3. The S4 kernel
# --------------------------------------------------------------------------------------------------
class S4Kernel(nn.Module):
    """S4 (NPLR/DPLR, HiPPO-LegS) convolution kernel for ``d_model`` channels (method §3.2).

    Frozen buffers, as the reference's ``HippoSSKernel(trainable=None)``: ``log_dt (H,)`` (uniform in
    [log dt_min, log dt_max]), and ``w, P, B (H, N/2, 2)`` (complex numbers stored as real pairs; the
    reference's ``Q`` is ``conj(P)`` and is not stored separately). Trained: ``C (D, H, N/2, 2)`` with
    D = 2 directions when bidirectional. ``C`` holds the length-corrected ``C̃ = C (I - Ā^L)`` (the
    reference's ``_setup_C``), so the kernel of length ``l_max`` comes straight from the generating
    function at the ``l_max``-th roots of unity.

    Conjugate symmetry: N = d_state real states are N/2 complex modes plus their conjugates. As in
    the standalone S4, only one of each pair is stored and every Cauchy sum runs over both halves
    (``[w, conj w]``, ``[C, conj C]``…), which is what makes the kernel real (``2·Re`` of the half sum
    in the time domain).
    """

    log_dt: Tensor
    w: Tensor
    P: Tensor
    B: Tensor

    def __init__(
        self, d_model: int, d_state: int, l_max: int, bidirectional: bool, dt_min: float, dt_max: float
    ) -> None:
        """Initialise HiPPO-LegS buffers, random ``log_dt`` and random complex ``C`` (length-corrected)."""
        super().__init__()
        self.d_model, self.d_state, self.l_max = d_model, d_state, l_max
        self.n_dir = 2 if bidirectional else 1
        w, p, b = nplr_legs(d_state)  # (N/2,) complex128 each
        h, half = d_model, d_state // 2
        log_dt = torch.rand(h, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        c = torch.randn(self.n_dir, h, half, dtype=torch.complex128)  # (D, H, N/2), E|c|² = 1
        # Length correction C̃ = C (I - Ā^L), done once at init in float64 (reference: _setup_C).
        a_bar, _ = bilinear_discretise(
            *real_state_space(w.expand(h, half), p.expand(h, half), b.expand(h, half)), log_dt.exp()
        )
        eye = torch.eye(d_state, dtype=torch.float64)
        c_r = (real_output_vector(c)[..., None, :] @ (eye - torch.linalg.matrix_power(a_bar, l_max))).squeeze(
            -2
        )
        self.register_buffer("log_dt", log_dt.float())  # (H,)
        self.register_buffer("w", torch.view_as_real(w.expand(h, half).contiguous()).float())  # (H, N/2, 2)
        self.register_buffer("P", torch.view_as_real(p.expand(h, half).contiguous()).float())  # (H, N/2, 2)
        self.register_buffer("B", torch.view_as_real(b.expand(h, half).contiguous()).float())  # (H, N/2, 2)
        self.C = nn.Parameter(torch.view_as_real(complex_output_vector(c_r)).float())  # (D, H, N/2, 2)
        self._maps: dict[tuple[Any, ...], ChunkMaps] = {}

    def _complex(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Complex views ``w, P, B (H, N/2)`` and ``C (D, H, N/2)``."""
        w, p, b, c = (torch.view_as_complex(t.contiguous()) for t in (self.w, self.P, self.B, self.C))
        return w, p, b, c

    def forward(self) -> Tensor:
        """The kernel of length ``l_max`` for each direction: ``(D, H, l_max)``, real.

        Generating function at the FFT nodes ω_k = exp(-2πik/L), k = 0…L/2. With the bilinear transform
        the reference evaluates ``(2/(1+ω)) · C (z - dt A)⁻¹ B · dt`` at ``z = 2(1-ω)/(1+ω)`` through the
        Cauchy sums ``Σ_n v_n / (z - dt w_n)`` and Woodbury for ``A = diag(w) - P Pᴴ``. Multiplying
        numerator and denominator by (1+ω) gives the identical value in a form that stays finite at
        the Nyquist node ω = -1 (where z = ∞):
        ``k̂ = 2 dt [s_CB - β s_CP s_QB / (1 + β s_QP)]``, ``s_XY = Σ_n X_n Y_n / (2(1-ω) - β w_n)``,
        ``β = (1+ω) dt``, ``Q = conj(P)``, the sums running over both conjugate halves.
        """
        w, p, b, c = self._complex()  # (H, M) ×3, (D, H, M) with M = N/2
        dt = self.log_dt.exp()  # (H,)
        n_freq = self.l_max // 2 + 1
        angle = -2 * math.pi / self.l_max * torch.arange(n_freq, device=dt.device, dtype=dt.dtype)
        omega = torch.polar(torch.ones_like(angle), angle)  # (F,)
        beta = (1 + omega) * dt[:, None]  # (H, F)
        w_full = torch.cat([w, w.conj()], -1)  # (H, 2M)
        cauchy = 1 / (2 * (1 - omega) - beta[:, None, :] * w_full[:, :, None])  # (H, 2M, F)
        left = torch.cat([torch.cat([c, c.conj()], -1), torch.cat([p.conj(), p], -1)[None]])  # (D+1, H, 2M)
        right = torch.stack([torch.cat([b, b.conj()], -1), torch.cat([p, p.conj()], -1)])  # (2, H, 2M)
        v = left[:, None] * right[None]  # (D+1, 2, H, 2M)
        s = torch.einsum("lrhn,hnf->lrhf", v, cauchy)  # (D+1, 2, H, F)
        s_cb, s_cp, s_qb, s_qp = s[:-1, 0], s[:-1, 1], s[-1, 0], s[-1, 1]  # (D,H,F) (D,H,F) (H,F) (H,F)
        k_hat = 2 * dt[:, None] * (s_cb - beta * s_cp * s_qb / (1 + beta * s_qp))  # (D, H, F)
        return torch.fft.irfft(k_hat, n=self.l_max)  # (D, H, L)

    def state_space(self) -> tuple[Tensor, Tensor, Tensor]:
        """The real discrete system behind the kernel, in float64: ``Ā (H, N, N)``, ``B̄ (H, N)``, ``c_eff (D, H, N)``.

        ``kernel[d, h, k] = c_eff[d, h] · Ā[h]^k B̄[h]`` for ``k < l_max``, where
        ``c_eff = c̃ (I - Ā^l_max)⁻¹`` undoes the length correction stored in ``C``.
        """
        w, p, b, c = (t.detach().to(torch.complex128) for t in self._complex())
        a_bar, b_bar = bilinear_discretise(*real_state_space(w, p, b), self.log_dt.detach().double().exp())
        eye = torch.eye(self.d_state, dtype=torch.float64, device=a_bar.device)
        correction = torch.linalg.inv(eye - torch.linalg.matrix_power(a_bar, self.l_max))  # (H, N, N)
        c_eff = (real_output_vector(c)[..., None, :] @ correction).squeeze(-2)  # (D, H, N)
        return a_bar, b_bar, c_eff

    def chunk_maps(self, chunk: int, dtype: torch.dtype, device: torch.device) -> ChunkMaps:
        """Frozen matrices of the chunked convolution (built in float64 from the buffers, cached)."""
        # The key includes each buffer's storage and in-place version counter, so the cache is rebuilt
        # after .to(), load_state_dict() or any in-place change of the frozen parameters.
        buffers = (self.log_dt, self.w, self.P, self.B)
        key = (chunk, dtype, device, *((t.data_ptr(), t._version) for t in buffers))
        if key not in self._maps:
            self._maps.clear()
            a_bar, b_bar, _ = self.state_space()
            maps = chunk_maps(a_bar, b_bar, self.l_max, chunk, self.n_dir)
            self._maps[key] = ChunkMaps(*(t.to(dtype=dtype, device=device) for t in maps))
        return self._maps[key]

    def real_c(self) -> Tensor:
        """The trainable ``C̃`` as real output vectors ``(D, H, N)`` (differentiable)."""
        return real_output_vector(torch.view_as_complex(self.C.contiguous()))


# --------------------------------------------------------------------------------------------------
# 4. The S4 block
# --------------------------------------------------------------------------------------------------
class TiedDropout(nn.Module):
    """Dropout with one mask per (channel, sample), shared by every time step (``DropoutNd``, tie=True).

    Input ``(H, B, L)``; the mask has shape ``(H, B, 1)``.
    """

    def __init__(self, p: float) -> None:
        """``p``: drop probability."""
        super().__init__()
        self.p = p

    def mask(self, x: Tensor) -> Tensor | None:
        """The scaled mask ``(H, B, 1)`` (kept entries are ``1 / (1 - p)``) for ``x``; None when identity."""
        if not self.training or self.p == 0.0:
            return None
        keep = torch.empty(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return keep.div_(1 - self.p)

    def forward(self, x: Tensor) -> Tensor:
        """Identity in eval mode or with p = 0."""
        keep = self.mask(x)
        return x if keep is None else x * keep  # (H, B, L)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a channel-first ``(H, B, L)`` tensor (same parameters as
    ``nn.LayerNorm(H)``).

    ``F.batch_norm`` in training mode on the ``(H, B·L)`` view normalises every column over its H
    entries with the biased variance, which is exactly LayerNorm's statistic; it is one fused kernel
    instead of the transpose → layer_norm → transpose the reference needs. No running statistics are
    kept or used (``training=True`` is the statistic, not the module mode).
    """

    def __init__(self, d_model: int, eps: float) -> None:
        """Weight 1 and bias 0, as ``nn.LayerNorm``."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Tensor) -> Tensor:
        """``(H, B, L)`` → ``(H, B, L)``."""
        h = x.shape[0]
        x_hat = F.batch_norm(x.reshape(h, -1), None, None, training=True, eps=self.eps)  # (H, B·L)
        return torch.addcmul(self.bias[:, None], x_hat, self.weight[:, None]).view_as(x)


class S4Block(nn.Module):
    """One residual S4 block of the paper's ECG branch (method §3.1), channel-first ``(H, B, L)``.

    ``x → S4 conv + D·x → GELU → TiedDropout → Linear(H→2H) → GLU → TiedDropout → + x → LayerNorm``.
    Trainable: ``kernel.C``, ``D``, the projection and the norm; the SSM (A, B, P, dt) is frozen.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        """Build the kernel, D (standard normal, as the reference) and the projection (nn.Linear init)."""
        super().__init__()
        self.cfg = cfg
        self.kernel = S4Kernel(
            cfg.d_model, cfg.d_state, cfg.window, cfg.bidirectional, cfg.dt_min, cfg.dt_max
        )
        self.D = nn.Parameter(torch.randn(cfg.d_model))  # (H,)
        self.dropout_inner = TiedDropout(cfg.dropout)
        self.output_linear = nn.Linear(cfg.d_model, 2 * cfg.d_model)  # TransposedLinear(H → 2H), then GLU
        self.dropout_outer = TiedDropout(cfg.dropout)
        self.norm = ChannelLayerNorm(cfg.d_model, cfg.layer_norm_eps)

    def conv(self, u: Tensor, impl: str | None = None) -> Tensor:
        """``y = k * u + D·u`` over time for every channel: ``(H, B, L)`` → ``(H, B, L)``.

        Causal part with kernel 0, anticausal part with kernel 1:
        ``y[t] = Σ_{s≤t} k0[t-s] u[s] + Σ_{s>t} k1[s-t-1] u[s] + D u[t]``.
        ``impl`` overrides ``cfg.conv`` ("fft" or "chunked"); both compute the same thing.
        """
        self._check_length(u)
        if (impl or self.cfg.conv) == "fft":
            return fft_conv(u, self.kernel(), self.D)  # (H, B, L)
        t = self.cfg.chunk
        maps = self.kernel.chunk_maps(t, u.dtype, u.device)
        return chunked_kernel_conv(u, self.D, maps, self.kernel.real_c(), t)  # (H, B, L)

    def _check_length(self, u: Tensor) -> None:
        """Inputs may be shorter than the kernel, never longer."""
        length = u.shape[-1]
        if length > self.cfg.window:
            raise ValueError(
                f"ECG window has {length} samples; the S4 kernel was built for {self.cfg.window}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """``(H, B, L)`` → ``(H, B, L)``.

        With the chunked convolution the whole block runs as one autograd Function with a
        hand-written backward (:mod:`model_training.s4_fused`: the same maths with fewer passes over
        memory); :meth:`forward_composed` is the same block in plain autograd operations.
        """
        if self.cfg.conv != "chunked" or torch.jit.is_tracing():
            return self.forward_composed(x)
        self._check_length(x)
        t = self.cfg.chunk
        maps = self.kernel.chunk_maps(t, x.dtype, x.device)
        intra, out_map = chunk_operands(self.kernel.real_c(), self.D, maps, t)  # (H, T, T), (H, D·N, T)
        weights = BlockWeights(
            intra=intra,
            in_map=maps.in_map,
            transfer=maps.transfer,
            out_map=out_map,
            weight=self.output_linear.weight,
            bias=self.output_linear.bias,
            norm_weight=self.norm.weight,
            norm_bias=self.norm.bias,
        )
        mask_in, mask_out = self.dropout_inner.mask(x), self.dropout_outer.mask(x)  # reference order
        return fused_s4_block(x, weights, mask_in, mask_out, t, self.norm.eps)  # (H, B, L)

    def forward_composed(self, x: Tensor, impl: str | None = None) -> Tensor:
        """The block as a composition of autograd operations (``impl`` as in :meth:`conv`)."""
        h, n_batch, length = x.shape
        z = self.dropout_inner(F.gelu(self.conv(x, impl)))  # (H, B, L)
        z = torch.addmm(
            self.output_linear.bias[:, None], self.output_linear.weight, z.reshape(h, -1)
        )  # (2H, B·L)
        z = F.glu(z, dim=0).view(h, n_batch, length)  # (H, B, L)
        return self.norm(x + self.dropout_outer(z))  # (H, B, L)


# --------------------------------------------------------------------------------------------------
# 5. Encoders and the fusion model
# --------------------------------------------------------------------------------------------------
class EcgEncoder(nn.Module):
    """ECG branch: NaN → 0, Linear(leads → H), S4 blocks, mean over time. ``(B, C, L)`` → ``(B, H)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        """``cfg.n_layers`` S4 blocks of width ``cfg.d_model``."""
        super().__init__()
        self.input_linear = nn.Linear(cfg.n_leads, cfg.d_model)
        self.blocks = nn.ModuleList(S4Block(cfg) for _ in range(cfg.n_layers))

    def s4_blocks(self) -> list[S4Block]:
        """The blocks, typed."""
        return [cast(S4Block, b) for b in self.blocks]

    def forward(self, ecg: Tensor) -> Tensor:
        """``ecg (B, C, L)`` in mV → pooled features ``(B, H)``."""
        n_batch, n_leads, length = ecg.shape
        ecg = torch.where(torch.isnan(ecg), torch.zeros((), dtype=ecg.dtype, device=ecg.device), ecg)
        x = ecg.permute(1, 0, 2).reshape(n_leads, -1)  # (C, B·L)
        x = torch.addmm(self.input_linear.bias[:, None], self.input_linear.weight, x)  # (H, B·L)
        x = x.view(-1, n_batch, length)  # (H, B, L)
        for block in self.blocks:
            x = block(x)  # (H, B, L)
        return x.mean(-1).t()  # (B, H)


class StaticEncoder(nn.Module):
    """Static branch (method §3.1, ``BasicEncoderStaticMLP``): embeddings ‖ continuous → MLP.

    ``[BN → Dropout → Linear → ReLU]`` for every layer but the last, which has no activation.
    """

    def __init__(self, cfg: ModelConfig, n_cont: int) -> None:
        """One embedding per categorical feature, then the BN/dropout/linear stack of ``cfg.mlp_dims``."""
        super().__init__()
        self.embeddings = nn.ModuleList(
            nn.Embedding(v, d) for v, d in zip(cfg.vocab_sizes, cfg.emb_dims, strict=True)
        )
        layers: list[nn.Module] = []
        width = sum(cfg.emb_dims) + n_cont
        for i, (dim, p) in enumerate(zip(cfg.mlp_dims, cfg.mlp_dropouts, strict=True)):
            layers += [nn.BatchNorm1d(width), nn.Dropout(p), nn.Linear(width, dim)]
            if i < len(cfg.mlp_dims) - 1:
                layers.append(nn.ReLU())
            width = dim
        self.mlp = nn.Sequential(*layers)

    def forward(self, cat: Tensor, cont: Tensor) -> Tensor:
        """``cat (B, n_cat)`` int64, ``cont (B, n_cont)`` → ``(B, mlp_dims[-1])``."""
        emb = [e(cat[:, i]) for i, e in enumerate(self.embeddings)]  # n_cat × (B, emb_dim)
        return self.mlp(torch.cat([*emb, cont], dim=1))  # (B, mlp_dims[-1])


class FusionModel(nn.Module):
    """ECG (S4) ‖ static (MLP) → one linear head over every target of every task (method §3.1).

    ``forward(ecg (B, 12, L), cat (B, 2) int64, cont (B, n_cont)) → logits (B, n_labels)``. The label
    names, the feature order and the window length are part of the model (``model_args``), so a saved
    checkpoint says what its inputs and outputs are.
    """

    def __init__(
        self,
        config: ModelConfig,
        labels: Sequence[str],
        cont_features: Sequence[str],
        cat_features: Sequence[str] = ("sex", "race"),
    ) -> None:
        """Build both branches and the head; ``labels`` and feature names must be unique."""
        super().__init__()
        for name, seq in (
            ("labels", labels),
            ("cont_features", cont_features),
            ("cat_features", cat_features),
        ):
            if len(set(seq)) != len(seq) or not all(isinstance(s, str) and s for s in seq):
                raise ValueError(f"FusionModel {name} must be unique non-empty strings")
        if not labels:
            raise ValueError("FusionModel labels must not be empty")
        if len(cat_features) != len(config.vocab_sizes):
            raise ValueError(
                f"FusionModel got {len(cat_features)} cat_features but config has {len(config.vocab_sizes)} vocab sizes"
            )
        self.config = config
        self.labels = tuple(labels)
        self.cont_features = tuple(cont_features)
        self.cat_features = tuple(cat_features)
        self.ecg_encoder = EcgEncoder(config)
        self.static_encoder = StaticEncoder(config, len(self.cont_features))
        self.head = nn.Linear(config.d_model + config.mlp_dims[-1], len(self.labels))

    @property
    def window(self) -> int:
        """ECG window length in samples the model was built for."""
        return self.config.window

    def forward(self, ecg: Tensor, cat: Tensor, cont: Tensor) -> Tensor:
        """Logits ``(B, n_labels)``; apply a sigmoid for probabilities."""
        n_batch = ecg.shape[0]
        if ecg.ndim != 3 or ecg.shape[1] != self.config.n_leads:
            raise ValueError(f"ecg must be (B, {self.config.n_leads}, L), got {tuple(ecg.shape)}")
        if cat.shape != (n_batch, len(self.cat_features)):
            raise ValueError(
                f"cat must be (B, {len(self.cat_features)}) = {self.cat_features}, got {tuple(cat.shape)}"
            )
        if cont.shape != (n_batch, len(self.cont_features)):
            raise ValueError(f"cont must be (B, {len(self.cont_features)}), got {tuple(cont.shape)}")
        features = torch.cat([self.ecg_encoder(ecg), self.static_encoder(cat, cont)], dim=1)  # (B, H + M)
        return self.head(features)  # (B, n_labels)

    def model_args(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-serialisable dict (inverse: ``from_args``)."""
        return {
            "config": self.config.to_dict(),
            "labels": list(self.labels),
            "cont_features": list(self.cont_features),
            "cat_features": list(self.cat_features),
        }

    @classmethod
    def from_args(cls, d: Mapping[str, Any]) -> FusionModel:
        """Rebuild an (untrained) model from ``model_args()``; load the state dict afterwards."""
        missing = {"config", "labels", "cont_features", "cat_features"} - set(d)
        if missing:
            raise ValueError(f"model args lack {sorted(missing)}")
        return cls(ModelConfig.from_dict(d["config"]), d["labels"], d["cont_features"], d["cat_features"])

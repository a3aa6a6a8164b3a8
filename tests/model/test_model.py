"""Rules of the S4 fusion model (method §3.1, §3.2) and of its exportable form (method §4).

Small configurations everywhere except the paper-size shape and parameter-count check.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_training.data import CONTINUOUS, MISSING_INDICATORS
from model_training.model import (
    FusionModel,
    ModelConfig,
    S4Block,
    S4Kernel,
    TiedDropout,
    hippo_legs,
    nplr_legs,
    real_state_space,
)
from model_training.s4_conv import chunk_operands
from model_training.s4_export import (
    ExportableFusionModel,
    OnnxExportError,
    check_onnx_operators,
    export_onnx,
    random_inputs,
)
from model_training.s4_fused import BlockWeights, fused_s4_block, matmul

CONT_10 = list(CONTINUOUS)
CONT_20 = CONT_10 + [f"{k}_missing" for k in MISSING_INDICATORS]
LABELS = [f"Lab{i}_{d}_{t}" for i in range(3) for d in ("low", "high") for t in ("est", "mon30")]
SMALL = ModelConfig(d_model=16, n_layers=2, window=60, chunk=10)


def _model(cfg: ModelConfig = SMALL, labels: list[str] = LABELS, seed: int = 0) -> FusionModel:
    torch.manual_seed(seed)
    return FusionModel(cfg, labels, CONT_20)


def _with_conv(model: FusionModel, conv: Literal["fft", "chunked"]) -> FusionModel:
    """The same weights computed with the other convolution implementation."""
    other = FusionModel(
        dataclasses.replace(model.config, conv=conv), model.labels, model.cont_features, model.cat_features
    )
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


def _recurrence_system(kernel: S4Kernel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ā, B̄ and the recurrence's output rows C, built independently in complex full-N form (float64).

    A = diag([w, w̄]) - P Pᴴ (P = [p, p̄]), bilinear discretisation, and C = C̃ (I - Ā^L)⁻¹ (the stored
    parameter is the length-corrected C̃).
    """
    w, p, b, c = (
        torch.view_as_complex(t.detach().double().contiguous())
        for t in (kernel.w, kernel.P, kernel.B, kernel.C)
    )
    wf, pf, bf = (torch.cat([x, x.conj()], -1) for x in (w, p, b))  # (H, N)
    cf = torch.cat([c, c.conj()], -1)  # (D, H, N)
    n = wf.shape[-1]
    a = torch.diag_embed(wf) - pf[..., :, None] * pf.conj()[..., None, :]  # (H, N, N)
    dt = kernel.log_dt.double().exp()[:, None, None]
    eye = torch.eye(n, dtype=a.dtype)
    a_bar = torch.linalg.solve(eye - dt / 2 * a, eye + dt / 2 * a)
    b_bar = torch.linalg.solve(eye - dt / 2 * a, dt[..., 0] * bf)
    c_rec = (
        cf[..., None, :] @ torch.linalg.inv(eye - torch.linalg.matrix_power(a_bar, kernel.l_max))
    ).squeeze(-2)
    return a_bar, b_bar, c_rec


def _run_recurrence(
    a_bar: torch.Tensor, b_bar: torch.Tensor, c: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """x_k = Ā x_{k-1} + B̄ u_k, y_k = C x_k for u (H, B, L) → (H, B, L)."""
    x = torch.zeros(u.shape[0], u.shape[1], a_bar.shape[-1], dtype=a_bar.dtype)
    ys = []
    for k in range(u.shape[-1]):
        x = (a_bar[:, None] @ x[..., None]).squeeze(-1) + b_bar[:, None] * u[..., k, None]
        y = (c[:, None] * x).sum(-1)
        assert y.imag.abs().max() < 1e-9  # conjugate symmetry: the output is real
        ys.append(y.real)
    return torch.stack(ys, -1)


# --------------------------------------------------------------------------------------------------
# S4 kernel and convolution (method §3.2)
# --------------------------------------------------------------------------------------------------
def test_hippo_legs_nplr_form_has_legs_spectrum() -> None:
    """Method §3.2: A is HiPPO-LegS; its DPLR form (4 complex modes + conjugates, rank-1 P) has the
    LegS eigenvalues -1…-N, and the unitary change of basis preserves ‖B‖."""
    n = 8
    a, b, _ = hippo_legs(n)
    w, p, bt = nplr_legs(n)
    assert w.shape == (n // 2,)
    assert torch.allclose(w.real, torch.full((n // 2,), -0.5, dtype=torch.float64), atol=1e-12)
    a_r, _ = real_state_space(w[None], p[None], bt[None])
    eig = torch.linalg.eigvals(a_r[0]).real.sort().values
    assert torch.allclose(eig, torch.linalg.eigvals(a).real.sort().values, atol=1e-8)
    assert torch.allclose(eig, -torch.arange(n, 0, -1, dtype=torch.float64), atol=1e-8)
    assert torch.isclose(2 * bt.abs().square().sum(), b.square().sum())


@pytest.mark.parametrize("length", [16, 25])
def test_kernel_equals_unrolled_recurrence_impulse_response_both_directions(length: int) -> None:
    """Method §3.2: the Cauchy/Woodbury/irfft kernel of each direction is the impulse response of the
    bilinear-discretised DPLR recurrence (odd and even L, so the Nyquist node is covered)."""
    torch.manual_seed(1)
    kernel = S4Kernel(4, 8, length, True, 1e-3, 1e-1).double()
    with torch.no_grad():
        k = kernel()  # (2, H, L)
    a_bar, b_bar, c_rec = _recurrence_system(kernel)
    impulse = torch.zeros(4, 1, length, dtype=torch.float64)
    impulse[..., 0] = 1.0
    for d in range(2):
        response = _run_recurrence(a_bar, b_bar, c_rec[d], impulse)[:, 0]  # (H, L)
        assert torch.allclose(k[d], response, atol=1e-10), d


@pytest.mark.parametrize("impl", ["fft", "chunked"])
def test_bidirectional_conv_equals_forward_plus_flipped_recurrence(impl: str) -> None:
    """Method §3.2: y = causal recurrence(u; C0) + [recurrence on the flipped input (C1), shifted by one
    and flipped back] + D u; the shift is the reference's pad(k0,(0,L)) + pad(flip(k1),(L,0))."""
    torch.manual_seed(2)
    cfg = ModelConfig(d_model=4, n_layers=1, window=30, chunk=7)
    block = S4Block(cfg).double()
    u = torch.randn(4, 3, 30, dtype=torch.float64)
    a_bar, b_bar, c_rec = _recurrence_system(block.kernel)
    forward = _run_recurrence(a_bar, b_bar, c_rec[0], u)
    backward = _run_recurrence(a_bar, b_bar, c_rec[1], u.flip(-1))  # r[t'] on the flipped time axis
    backward = torch.nn.functional.pad(backward[..., :-1], (1, 0)).flip(-1)  # y1[t] = r[L-2-t], y1[L-1] = 0
    expected = forward + backward + block.D.detach()[:, None, None] * u
    with torch.no_grad():
        got = block.conv(u, impl)
    assert torch.allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("length", [60, 47, 9, 1])
def test_fft_and_chunked_conv_equal_direct_convolution(length: int) -> None:
    """Method §4: y[t] = Σ_{s≤t} k0[t-s]u[s] + Σ_{s>t} k1[s-t-1]u[s] + D u[t], for whole and partial
    chunks and windows shorter than the kernel."""
    torch.manual_seed(3)
    block = S4Block(SMALL).double()
    u = torch.randn(16, 2, length, dtype=torch.float64)
    with torch.no_grad():
        k = block.kernel()[..., :length]  # (2, H, L)
        direct = torch.zeros_like(u)
        for t in range(length):
            for s in range(length):
                tap = k[0, :, t - s] if s <= t else k[1, :, s - t - 1]
                direct[..., t] += tap[:, None] * u[..., s]
        direct += block.D[:, None, None] * u
        for impl in ("fft", "chunked"):
            assert torch.allclose(block.conv(u, impl), direct, atol=1e-10), impl


def test_causal_config_has_no_anticausal_taps() -> None:
    """ModelConfig.bidirectional=False: one kernel channel, output at t ignores inputs after t."""
    torch.manual_seed(4)
    block = S4Block(dataclasses.replace(SMALL, bidirectional=False)).double()
    assert block.kernel.C.shape[0] == 1
    u = torch.randn(16, 1, 60, dtype=torch.float64)
    v = u.clone()
    v[..., 40:] += 1.0
    with torch.no_grad():
        for impl in ("fft", "chunked"):
            assert torch.allclose(block.conv(u, impl)[..., :40], block.conv(v, impl)[..., :40], atol=1e-12)


def test_chunked_and_fft_paths_have_equal_gradients() -> None:
    """The chunked convolution is the same function of the input and of the trained C and D as the
    FFT path (plain autograd): the hand-written adjoint scan gives the same gradients."""
    torch.manual_seed(5)
    block = S4Block(SMALL).double()
    u = torch.randn(16, 2, 60, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, 2, 60, dtype=torch.float64)  # a generic output gradient
    grads: dict[str, tuple[torch.Tensor, ...]] = {}
    for impl in ("fft", "chunked"):
        block.zero_grad()
        u.grad = None
        (block.conv(u, impl) * weight).sum().backward()
        assert block.kernel.C.grad is not None and block.D.grad is not None and u.grad is not None
        grads[impl] = (block.kernel.C.grad.clone(), block.D.grad.clone(), u.grad.clone())
    for a, b in zip(grads["fft"], grads["chunked"], strict=True):
        assert torch.allclose(a, b, atol=1e-9)


def test_frozen_ssm_buffers_and_trainable_c_d() -> None:
    """Method §3.2: log_dt, A (w), B and P are frozen buffers; C, D, projection and norm are trained."""
    block = S4Block(SMALL)
    assert {n for n, _ in block.kernel.named_parameters()} == {"C"}
    assert {"log_dt", "w", "P", "B"} <= {n for n, _ in block.kernel.named_buffers()}
    assert {n for n, _ in block.named_parameters()} == {
        "kernel.C",
        "D",
        "output_linear.weight",
        "output_linear.bias",
        "norm.weight",
        "norm.bias",
    }
    dt = block.kernel.log_dt.exp()
    assert float(dt.min()) >= 1e-3 and float(dt.max()) <= 1e-1
    block(torch.randn(16, 2, 60)).sum().backward()
    assert block.kernel.C.grad is not None and block.kernel.C.grad.abs().sum() > 0
    assert block.D.grad is not None and block.D.grad.abs().sum() > 0


def test_frozen_buffer_change_rebuilds_chunk_matrices() -> None:
    """The chunk matrices derive from the frozen buffers: loading other buffers must not reuse stale ones."""
    torch.manual_seed(6)
    a, b = S4Block(SMALL).double(), S4Block(SMALL).double()
    u = torch.randn(16, 2, 60, dtype=torch.float64)
    with torch.no_grad():
        a.conv(u, "chunked")  # fills a's cache
        a.load_state_dict(b.state_dict())
        assert torch.allclose(a.conv(u, "chunked"), b.conv(u, "fft"), atol=1e-10)


def _block_run(
    block: S4Block, forward: str, x: torch.Tensor, grad: torch.Tensor, seed: int
) -> list[torch.Tensor]:
    """Output, input gradient and every parameter gradient of one forward + backward (fixed RNG)."""
    torch.manual_seed(seed)  # the same seed draws the same two dropout masks in either form
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = getattr(block, forward)(x)
    out.backward(grad)
    assert x.grad is not None
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in block.parameters()]
    return [out.detach(), x.grad, *grads]


@pytest.mark.parametrize(
    ("cfg", "length", "training"),
    [
        (SMALL, 60, True),  # whole chunks, dropout on
        (SMALL, 55, True),  # padded tail
        (dataclasses.replace(SMALL, chunk=7), 60, False),  # eval: no masks
        (dataclasses.replace(SMALL, bidirectional=False), 60, True),  # causal: one direction
        (dataclasses.replace(SMALL, chunk=60), 60, True),  # one chunk: no scan
    ],
)
def test_fused_block_equals_composed_block_values_and_gradients(
    cfg: ModelConfig, length: int, training: bool
) -> None:
    """The hand-written block (forward + backward in one Function) is the same function as the
    composition of autograd operations: output, input gradient and the gradient of C, D, the
    projection and the LayerNorm, in train mode with the same dropout masks and in eval mode."""
    torch.manual_seed(8)
    block = S4Block(cfg).double().train(training)
    x = torch.randn(16, 3, length, dtype=torch.float64)
    grad = torch.randn(16, 3, length, dtype=torch.float64)
    fused = _block_run(block, "forward", x, grad, seed=9)
    composed = _block_run(block, "forward_composed", x, grad, seed=9)
    for name, a, b in zip(
        ["out", "x", *(n for n, _ in block.named_parameters())], fused, composed, strict=True
    ):
        assert torch.allclose(a, b, atol=1e-11, rtol=1e-9), name
    assert fused[1].abs().sum() > 0 and all(g.abs().sum() > 0 for g in fused[2:]), "every gradient flows"


def test_fused_block_gradients_pass_gradcheck() -> None:
    """Finite differences agree with the hand-written backward for every differentiable input of the
    fused block (padded tail, both dropout masks, two directions)."""
    torch.manual_seed(10)
    h, chunk = 4, 5
    block = S4Block(ModelConfig(d_model=h, n_layers=1, window=12, chunk=chunk)).double()
    maps = block.kernel.chunk_maps(chunk, torch.float64, torch.device("cpu"))
    intra, out_map = chunk_operands(block.kernel.real_c().detach(), block.D.detach(), maps, chunk)
    inputs = tuple(
        t.clone().requires_grad_()
        for t in (
            torch.randn(h, 2, 12, dtype=torch.float64),  # x: 12 samples, chunks of 5 (padded tail)
            intra,
            out_map,
            torch.randn(2 * h, h, dtype=torch.float64),
            torch.randn(2 * h, dtype=torch.float64),
            1 + 0.1 * torch.randn(h, dtype=torch.float64),
            0.1 * torch.randn(h, dtype=torch.float64),
        )
    )
    mask_in, mask_out = (
        torch.bernoulli(torch.full((h, 2, 1), 0.7, dtype=torch.float64)) / 0.7 for _ in range(2)
    )

    def fn(*args: torch.Tensor) -> torch.Tensor:
        x, intra, out_map, weight, bias, norm_weight, norm_bias = args
        weights = BlockWeights(
            intra, maps.in_map, maps.transfer, out_map, weight, bias, norm_weight, norm_bias
        )
        return fused_s4_block(x, weights, mask_in, mask_out, chunk, 1e-5)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_fused_block_graph_can_be_run_backwards_twice() -> None:
    """The hand-written backward leaves its saved tensors untouched: a retained graph gives the same
    gradients on a second backward pass (as autograd's own operations do)."""
    torch.manual_seed(14)
    block = S4Block(SMALL).double().train()
    x = torch.randn(16, 3, 60, dtype=torch.float64, requires_grad=True)
    out, grad = block(x), torch.randn(16, 3, 60, dtype=torch.float64)
    grads = []
    for _ in range(2):
        x.grad = None
        block.zero_grad(set_to_none=True)
        out.backward(grad, retain_graph=True)
        assert x.grad is not None
        grads.append([x.grad.clone(), *(p.grad.clone() for p in block.parameters() if p.grad is not None)])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_fused_block_float32_matches_float64() -> None:
    """At the paper's window and chunk, the float32 training block (oneDNN projection GEMMs on the
    CPU) matches the float64 composed block within float32 rounding, values and gradients."""
    torch.manual_seed(11)
    block = S4Block(ModelConfig(d_model=64, n_layers=1)).train()
    x, grad = torch.randn(64, 4, 250), torch.randn(64, 4, 250)
    got = _block_run(block, "forward", x, grad, seed=12)
    reference = _block_run(
        copy.deepcopy(block).double(), "forward_composed", x.double(), grad.double(), seed=12
    )
    for a, b in zip(got, reference, strict=True):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_matmul_helper_equals_mm_for_transposed_operands() -> None:
    """``s4_fused.matmul`` (oneDNN for float32 on the CPU) computes ``a @ b`` like ``torch.mm``, with
    ``b`` given as a transposed view, in float32 and float64."""
    torch.manual_seed(13)
    a, b_t = torch.randn(48, 32, dtype=torch.float64), torch.randn(40, 32, dtype=torch.float64)
    expected = a @ b_t.t()
    assert torch.allclose(matmul(a, b_t.t()), expected, atol=1e-12)
    got = matmul(a.float(), b_t.float().t())
    assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, atol=1e-4)
    c = torch.randn(48, 24, dtype=torch.float64)  # a contiguous b, a transposed (made contiguous) a
    assert torch.allclose(matmul(a.float().t(), c.float()).double(), a.t() @ c, atol=1e-4)


def test_tied_dropout_mask_is_constant_over_time() -> None:
    """Method §3.1: DropoutNd(tie=True): one mask per (channel, sample) for every time step; identity in eval."""
    torch.manual_seed(7)
    drop = TiedDropout(0.5).train()
    x = torch.ones(64, 8, 30)
    y = drop(x)
    assert torch.equal(y, y[..., :1].expand_as(y))
    assert set(torch.unique(y).tolist()) == {0.0, 2.0}
    assert torch.equal(drop.eval()(x), x)
    block = S4Block(SMALL)
    assert isinstance(block.dropout_inner, TiedDropout) and isinstance(block.dropout_outer, TiedDropout)
    assert block.dropout_inner.p == block.dropout_outer.p == 0.2


# --------------------------------------------------------------------------------------------------
# Fusion model contract (method §3.1)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_layers", "d_model", "window", "chunk", "n_labels", "batch", "bidirectional"),
    [
        (1, 8, 40, 10, 1, 1, True),
        (2, 16, 50, 25, 5, 3, True),
        (3, 8, 33, 8, 7, 2, False),
        (1, 4, 20, 20, 2, 1, True),
    ],
)
def test_output_shape_contract(
    n_layers: int, d_model: int, window: int, chunk: int, n_labels: int, batch: int, bidirectional: bool
) -> None:
    """FusionModel.forward(ecg (B,12,L), cat (B,2), cont (B,n_cont)) → logits (B, n_labels)."""
    cfg = ModelConfig(
        d_model=d_model, n_layers=n_layers, window=window, chunk=chunk, bidirectional=bidirectional
    )
    model = _model(cfg, [f"y{i}" for i in range(n_labels)]).eval()
    ecg, cat, cont = random_inputs(model, batch)
    with torch.no_grad():
        out = model(ecg, cat, cont)
    assert out.shape == (batch, n_labels)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_paper_size_shapes_and_parameter_counts() -> None:
    """Method §3.1 [derived]: S4 branch 2,146,816 trainable (≈2.147 M); static MLP 41,396 with 10
    continuous inputs (≈41.4 k) and 42,696 with our 20; head 641 per target."""
    torch.manual_seed(8)
    labels = [f"y{i}" for i in range(40)]
    model = FusionModel(ModelConfig(), labels, CONT_10)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(model.ecg_encoder) == 2_146_816
    assert count(model.static_encoder) == 41_396
    assert count(model.head) == 641 * 40
    assert count(FusionModel(ModelConfig(), labels, CONT_20).static_encoder) == 42_696
    ecg, cat, cont = random_inputs(model, 2)
    with torch.no_grad():
        assert model.eval()(ecg, cat, cont).shape == (2, 40)


def test_nan_ecg_is_zeroed_and_output_finite() -> None:
    """Method §2.2: NaNs reaching the model are set to 0."""
    model = _model().eval()
    ecg, cat, cont = random_inputs(model, 3)
    ecg[0, 2, 10:30] = float("nan")
    ecg[1] = float("nan")
    with torch.no_grad():
        out = model(ecg, cat, cont)
        ref = model(torch.nan_to_num(ecg, nan=0.0), cat, cont)
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref)


def test_forward_rejects_bad_shapes_naming_the_input() -> None:
    """Wrong input shapes raise ValueError naming ecg/cat/cont; windows longer than the kernel too."""
    model = _model().eval()
    ecg, cat, cont = random_inputs(model, 2)
    with pytest.raises(ValueError, match="ecg"):
        model(ecg[:, :11], cat, cont)
    with pytest.raises(ValueError, match="cat"):
        model(ecg, cat[:, :1], cont)
    with pytest.raises(ValueError, match="cont"):
        model(ecg, cat, cont[:, :5])
    with pytest.raises(ValueError, match="window"):
        model(torch.randn(2, 12, 61), cat, cont)


def test_config_rejects_invalid_sizes() -> None:
    """ModelConfig validates its fields by name."""
    with pytest.raises(ValueError, match="d_state"):
        ModelConfig(d_state=7)
    with pytest.raises(ValueError, match="conv"):
        ModelConfig(conv="direct")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk"):
        ModelConfig(window=20, chunk=25)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"d_model": 8, "bogus": 1})


def test_model_args_round_trip_through_json() -> None:
    """model_args() is JSON-serialisable and from_args + state dict rebuild the same function."""
    model = _model().eval()
    args = json.loads(json.dumps(model.model_args()))
    assert args["labels"] == LABELS and args["cont_features"] == CONT_20 and args["config"]["window"] == 60
    rebuilt = FusionModel.from_args(args)
    rebuilt.load_state_dict(model.state_dict())
    ecg, cat, cont = random_inputs(model, 2)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(ecg, cat, cont), model(ecg, cat, cont))
    assert rebuilt.config == model.config


# --------------------------------------------------------------------------------------------------
# Exportable form (method §4)
# --------------------------------------------------------------------------------------------------
def _trained_like(cfg: ModelConfig = SMALL) -> FusionModel:
    """A model whose BatchNorm running statistics have moved away from their init."""
    model = _model(cfg).train()
    with torch.no_grad():
        for seed in range(3):
            ecg, cat, cont = random_inputs(model, 16, seed=seed)
            model(ecg, cat, 3 * cont + 1)
    return model.eval()


@pytest.mark.parametrize("chunk", [10, 7])
def test_exportable_model_equals_trained_model(chunk: int) -> None:
    """ExportableFusionModel returns sigmoid(model(…)) in eval mode: ≤1e-5 vs the FFT path in float32,
    ≤1e-12 in float64 (chunk 7 does not divide the window: padded tail)."""
    model = _trained_like()
    fft = _with_conv(model, "fft").eval()
    ecg, cat, cont = random_inputs(model, 5)
    exported = ExportableFusionModel.from_trained(model, chunk=chunk)
    with torch.no_grad():
        expected = torch.sigmoid(fft(ecg, cat, cont))
        assert (exported(ecg, cat, cont) - expected).abs().max() <= 1e-5
        fft64 = copy.deepcopy(fft).double()
        exported64 = ExportableFusionModel.from_trained(model, chunk=chunk, dtype=torch.float64)
        expected64 = torch.sigmoid(fft64(ecg.double(), cat, cont.double()))
        assert (exported64(ecg.double(), cat, cont.double()) - expected64).abs().max() <= 1e-12
    assert exported.labels == model.labels and exported.cont_features == model.cont_features


def test_onnx_export_matches_model_for_batch_1_7_64(tmp_path: Path) -> None:
    """export_onnx: checker, inputs ecg/cat/cont, output probabilities, dynamic batch, ORT parity ≤1e-4,
    label/feature/window metadata in the file."""
    model = _trained_like()
    path = tmp_path / "model.onnx"
    export_onnx(model, path)  # raises OnnxExportError on any failed check
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["ecg", "cat", "cont"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["ecglab.labels"]) == LABELS and json.loads(meta["ecglab.window"]) == 60
    for batch in (1, 7, 64):
        ecg, cat, cont = random_inputs(model, batch, seed=100 + batch)
        ecg[0, 0, :5] = float("nan")
        (got,) = session.run(None, {"ecg": ecg.numpy(), "cat": cat.numpy(), "cont": cont.numpy()})
        with torch.no_grad():
            expected = torch.sigmoid(model(ecg, cat, cont)).numpy()
        assert got.shape == (batch, len(LABELS))
        assert np.abs(got - expected).max() <= 1e-4


def test_onnx_graph_uses_only_standard_real_operators(tmp_path: Path) -> None:
    """Method §4: no complex tensors, no DFT/STFT, no custom domains; and the check can fail."""
    path = tmp_path / "model.onnx"
    export_onnx(_trained_like(), path)
    graph = onnx.load(str(path))
    check_onnx_operators(graph)
    assert graph.opset_import[0].version >= 17
    ops = {n.op_type for n in graph.graph.node}
    assert ops <= {
        "MatMul", "Add", "Mul", "Sub", "Div", "Reshape", "Transpose", "Concat", "Split", "Slice", "Squeeze",
        "Unsqueeze", "Gather", "Shape", "Constant", "ConstantOfShape", "Identity", "Cast", "Where", "IsNaN",
        "ReduceMean", "Sqrt", "Reciprocal", "Erf", "Sigmoid", "Relu", "Gemm", "BatchNormalization", "Pad",
        "Expand", "Pow",
    }  # fmt: skip
    bad = onnx.helper.make_node("DFT", ["x"], ["y"])
    graph.graph.node.append(bad)
    with pytest.raises(OnnxExportError, match="DFT"):
        check_onnx_operators(graph)

"""Sparse-saved MLP functions: exact forward, gradients through the kept channels, saved bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from jenga.mlp import gated_mlp, kept_channels, sparse_activation


def frozen_linear(inp: int, out: int, bias: bool) -> torch.nn.Linear:
    lin = torch.nn.Linear(inp, out, bias=bias)
    lin.requires_grad_(False)
    return lin


def masked_gated_reference(x, gate, up, down, keep):
    """Dense autograd whose backward is restricted to the top channels of each sequence."""
    g, u = gate(x), up(x)
    h = F.silu(g) * u
    count = kept_channels(g.shape[-1], keep)
    top = h.norm(dim=1).topk(count, dim=1).indices
    mask = torch.zeros_like(g[:, :1, :]).scatter_(2, top[:, None, :], 1.0)
    g = g * mask + (g * (1 - mask)).detach()
    u = u * mask + (u * (1 - mask)).detach()
    return down(F.silu(g) * u)


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_forward_exact_backward_through_kept(keep, bias):
    torch.manual_seed(0)
    gate, up, down = frozen_linear(32, 96, bias), frozen_linear(32, 96, bias), frozen_linear(96, 32, bias)
    x = torch.randn(2, 20, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = gated_mlp(x, gate, up, down, F.silu, keep)
    ref = masked_gated_reference(x_ref, gate, up, down, keep)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_gated_mlp_saved_bytes_exact():
    gate, up, down = frozen_linear(32, 100, False), frozen_linear(32, 100, False), frozen_linear(100, 32, False)
    x = torch.randn(2, 20, 32, requires_grad=True)
    excluded = {p.untyped_storage().data_ptr() for m in (gate, up, down) for p in m.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in excluded:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gated_mlp(x, gate, up, down, F.silu, 0.25)
    assert sum(saved.values()) == 2 * 2 * 20 * 25 * 4 + 2 * 25 * 8


@pytest.mark.parametrize("keep", [1.0, 0.3])
def test_sparse_activation_matches_masked_reference(keep):
    torch.manual_seed(1)
    pre = torch.randn(40, 64, requires_grad=True)  # OPT passes flattened (tokens, channels)
    pre_ref = pre.detach().clone().requires_grad_(True)
    out = sparse_activation(pre, F.relu, keep)
    torch.testing.assert_close(out, F.relu(pre_ref))
    count = kept_channels(64, keep)
    top = F.relu(pre_ref).norm(dim=0).topk(count).indices
    mask = torch.zeros(64).index_fill_(0, top, 1.0)
    grad = torch.randn_like(out)
    out.backward(grad)
    (F.relu(pre_ref) * mask + (F.relu(pre_ref) * (1 - mask)).detach()).backward(grad)
    torch.testing.assert_close(pre.grad, pre_ref.grad)


def test_bf16_runs_and_is_close():
    torch.manual_seed(2)
    gate, up = frozen_linear(32, 64, False).bfloat16(), frozen_linear(32, 64, False).bfloat16()
    down = frozen_linear(64, 32, False).bfloat16()
    x = torch.randn(1, 16, 32, dtype=torch.bfloat16, requires_grad=True)
    out = gated_mlp(x, gate, up, down, F.silu, 1.0)
    out.float().sum().backward()
    x32 = x.detach().float().requires_grad_(True)
    ref = down.float()(F.silu(gate.float()(x32)) * up.float()(x32))
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    ref.sum().backward()
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_gated_mlp_in_token_chunks_ranks_channels_per_chunk(keep):
    """Chunks change no output; gradients equal the masked reference applied chunk by chunk (ragged tail)."""
    torch.manual_seed(3)
    gate, up, down = frozen_linear(16, 48, False), frozen_linear(16, 48, False), frozen_linear(48, 16, False)
    x = torch.randn(2, 21, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = gated_mlp(x, gate, up, down, F.silu, keep, chunk=8)
    ref = torch.cat([masked_gated_reference(part, gate, up, down, keep) for part in x_ref.split(8, dim=1)], dim=1)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    if keep < 1.0:
        whole = x.detach().clone().requires_grad_(True)
        gated_mlp(whole, gate, up, down, F.silu, keep).backward(grad)
        assert not torch.allclose(whole.grad, x.grad)  # per-chunk ranking differs from per-sequence ranking


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of every matrix product dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.dtypes.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_gated_mlp_under_autocast_matches_the_unpatched_mlp_and_stays_in_bf16(keep):
    """fp32 master weights under bf16 autocast (the fine-tunes' precision): the output is the autocast MLP's,
    activations are saved in bf16, backward multiplies in bf16 (not fp32) and returns an fp32 input gradient
    equal to autograd's through the kept channels."""
    torch.manual_seed(4)
    gate, up, down = frozen_linear(32, 96, False), frozen_linear(32, 96, False), frozen_linear(96, 32, False)
    x = torch.randn(2, 20, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved: list[torch.dtype] = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
            out = gated_mlp(x, gate, up, down, F.silu, keep)
        ref = masked_gated_reference(x_ref, gate, up, down, keep)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    assert saved.count(torch.bfloat16) == 2 and saved.count(torch.float32) == 3  # gate/up rows; the weights
    grad = torch.randn_like(out)
    with MatmulDtypes() as products:
        out.backward(grad)
    assert products.dtypes and set(products.dtypes) == {torch.bfloat16}
    ref.backward(grad)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2e-2, atol=2e-3)


def fp8_roundtrip(t: torch.Tensor) -> torch.Tensor:
    """Reference rounding: per token, the largest magnitude maps to float8 e4m3's largest value (448)."""
    scale = t.abs().amax(dim=-1, keepdim=True) / 448.0
    return (t / scale).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_fp8_saves_float8_and_backpropagates_through_the_rounded_activations(bias):
    """The forward is the exact MLP; backward equals autograd through the fp8-rounded gate and up activations
    (rows of one token share a scale); the saved activations are float8 with one fp32 scale per token each."""
    torch.manual_seed(0)
    gate, up, down = frozen_linear(32, 96, bias), frozen_linear(32, 96, bias), frozen_linear(96, 32, bias)
    x = torch.randn(2, 20, 32, requires_grad=True)
    grad = torch.randn(2, 20, 32)
    saved: list[torch.dtype] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = gated_mlp(x, gate, up, down, F.silu, 1.0, chunk=8, fp8=True)
    torch.testing.assert_close(out, down(F.silu(gate(x)) * up(x)))
    assert saved.count(torch.float8_e4m3fn) == 2 and saved.count(torch.float32) == 4  # 3 weights, the scales
    out.backward(grad)
    g, u = (fp8_roundtrip(lin(x).detach()).requires_grad_(True) for lin in (gate, up))
    down(F.silu(g) * u).backward(grad)
    torch.testing.assert_close(x.grad, g.grad @ gate.weight + u.grad @ up.weight, rtol=1e-4, atol=1e-5)
    exact = torch.autograd.grad(down(F.silu(gate(x)) * up(x)), x, grad)[0]
    assert 0 < (x.grad - exact).norm() < 0.1 * exact.norm()  # rounded, not exact, and close


def _counted(function, calls: list):
    """`function`, appending to `calls` at each call."""

    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return counted


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_gated_mlp_fp8_fused_silu_backward_matches_the_pytorch_path(monkeypatch, keep):
    """The fused float8 backward (a CUDA path, forced here onto the Triton interpreter) gives the input gradient
    of the decode-and-autograd path, whole or with kept channels, and it is the path taken."""
    import jenga.kernels.fp8 as kernels
    import jenga.mlp as mlp

    torch.manual_seed(0)
    gate, up, down = frozen_linear(32, 96, False), frozen_linear(32, 96, False), frozen_linear(96, 32, False)
    x0, grad = torch.randn(2, 20, 32), torch.randn(2, 20, 32)
    calls = []
    monkeypatch.setattr(kernels, "silu_mul_backward", _counted(kernels.silu_mul_backward, calls))
    grads = {}
    for fused in (False, True):
        monkeypatch.setattr(mlp, "fused_silu", lambda act_fn, g, on=fused: on and isinstance(act_fn, mlp.SILU))
        x = x0.clone().requires_grad_(True)
        gated_mlp(x, gate, up, down, torch.nn.SiLU(), keep, chunk=8, fp8=True).backward(grad)
        grads[fused] = x.grad
    assert calls  # the fused run went through the kernel
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 2])
def test_gated_mlp_fp8_fused_silu_forward_matches_the_pytorch_path(monkeypatch, dtype, batch):
    """The fused forward (SiLU product and both float8 copies in one pass; a CUDA path, forced here onto the
    Triton interpreter) gives the PyTorch path's output (SiLU's exp aside), float8 copies and scales bit for bit
    the codec's written into the saved buffers' chunk slices, the same input gradient; channels kept below 1.0
    take the PyTorch path."""
    import jenga.kernels.fp8 as kernels
    import jenga.mlp as mlp

    torch.manual_seed(0)
    gate, up, down = (frozen_linear(*shape, False).to(dtype) for shape in ((32, 1100), (32, 1100), (1100, 32)))
    x0, grad = torch.randn(batch, 20, 32).to(dtype), torch.randn(batch, 20, 32).to(dtype)
    calls = []
    monkeypatch.setattr(kernels, "silu_mul_quantize", _counted(kernels.silu_mul_quantize, calls))
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(mlp, "fused_silu", lambda act_fn, g, on=fused: on and isinstance(act_fn, mlp.SILU))
        x, saved = x0.clone().requires_grad_(True), []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            out = gated_mlp(x, gate, up, down, torch.nn.SiLU(), 1.0, chunk=8, fp8=True)
        out.backward(grad)
        results[fused] = out, x.grad, saved
    assert len(calls) == 3  # one per chunk of 8 tokens
    (ref, ref_grad, ref_saved), (out, out_grad, saved) = results[False], results[True]
    codes = [t for t in saved if t.dtype == torch.float8_e4m3fn]
    assert len(codes) == 2 and all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        for a, b in zip(codes, [t for t in ref_saved if t.dtype == torch.float8_e4m3fn], strict=True)
    )
    scales = [t for t in saved if t.dtype == torch.float32 and t.dim() == 3]
    assert torch.equal(scales[0], [t for t in ref_saved if t.dtype == torch.float32 and t.dim() == 3][0])
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(out_grad, ref_grad, rtol=tol, atol=tol)
    gated_mlp(x0.clone().requires_grad_(True), gate, up, down, torch.nn.SiLU(), 0.5, chunk=8, fp8=True)
    assert len(calls) == 3


@pytest.mark.parametrize("keep", [1.0, 0.5])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_recompute_saves_the_input_and_gives_the_same_gradient(keep, bias):
    """With `recompute` the MLP saves its input (and the kept channels' indices) instead of two channel-wide
    activations, and backward's recomputed projections give the same input gradient."""
    torch.manual_seed(0)
    gate, up, down = frozen_linear(32, 96, bias), frozen_linear(32, 96, bias), frozen_linear(96, 32, bias)
    x0, grad = torch.randn(2, 20, 32), torch.randn(2, 20, 32)
    frozen = {id(t) for lin in (gate, up, down) for t in lin.parameters()}
    results = {}
    for recompute in (False, True):
        x = x0.clone().requires_grad_(True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, into=saved: into.append(t) or t, lambda t: t):
            out = gated_mlp(x, gate, up, down, F.silu, keep, chunk=8, recompute=recompute)
        out.backward(grad)
        activations = [t for t in saved if id(t) not in frozen and t.dtype != torch.long and t.dim() == 3]
        results[recompute] = (out.detach(), x.grad, sum(t.numel() for t in activations))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-6, atol=1e-7)
    assert results[True][2] == x0.numel()  # the input, 32 values per token
    assert results[False][2] == 2 * 2 * 20 * kept_channels(96, keep)  # gate and up, the kept channels per token


@pytest.mark.parametrize("bias", [False, True])
def test_chunk_products_are_written_into_the_buffer_without_a_copy_or_a_sum(bias):
    """A chunk's `bias + a @ b + c @ d` equals the expression; into a contiguous chunk (a batch of one) it is one
    product written in place and one accumulated by the product (no copy, no separate sum), into a strided chunk
    (a batch of several) it is computed and copied in."""
    from jenga.mlp import _products_into

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    b_mat, d_mat, shift = torch.randn(8, 16), torch.randn(8, 16), torch.randn(16) if bias else None
    for rows, copies in ((1, 0), (3, 1)):
        buffer = torch.zeros(rows, 12, 16)
        a, c = torch.randn(rows, 5, 8), torch.randn(rows, 5, 8)
        ops = Ops()
        ops.names = []
        with ops:
            _products_into(buffer[:, 4:9], [(a, b_mat), (c, d_mat)], shift)
        expected = a @ b_mat + c @ d_mat + (0 if shift is None else shift)
        torch.testing.assert_close(buffer[:, 4:9], expected)
        assert buffer[:, :4].eq(0).all() and buffer[:, 9:].eq(0).all()
        assert ops.names.count("copy_.default") == copies and "add.Tensor" not in ops.names

"""Lean RMSNorm: identical forward to LlamaRMSNorm, equal gradients, fewer saved bytes."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from jenga.norms import rms_norm
from jenga.profiling import SavedTensorMeter


@pytest.mark.parametrize("dtype,trainable", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_matches_llama_rmsnorm(dtype, trainable):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    norm.weight.requires_grad_(trainable)
    x = torch.randn(2, 33, 48, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = rms_norm(x, norm.weight, norm.variance_epsilon)
    ref = norm(x_ref)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_weight_grad = None
    if trainable:
        ref_weight_grad, norm.weight.grad = norm.weight.grad, None
    ref.backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), rtol=tol, atol=tol)
    if trainable:
        torch.testing.assert_close(ref_weight_grad, norm.weight.grad, rtol=1e-5, atol=1e-5)


def test_saves_input_dtype_not_fp32_copy():
    norm = LlamaRMSNorm(64).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(4, 128, 64, dtype=torch.bfloat16, requires_grad=True)
    with SavedTensorMeter.for_model(norm) as hf:
        norm(x)
    with SavedTensorMeter.for_model(norm) as lean:
        rms_norm(x, norm.weight, norm.variance_epsilon)
    assert hf.bytes >= 4 * 128 * 64 * 4  # the fp32 upcast
    assert lean.bytes == 4 * 128 * 64 * 2 + 4 * 128 * 4  # x itself + one fp32 scale per token


def test_fp8_saves_a_float8_input_with_an_exact_forward_and_a_close_gradient():
    """With fp8 the forward is unchanged and the input is kept in float8 with a scale per token (a quarter of
    HF's fp32 copy); the input gradient is the exact one up to the rounding of x (3 mantissa bits)."""
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 128, 64, dtype=torch.bfloat16, requires_grad=True)
    with SavedTensorMeter.for_model(norm) as meter:
        out = rms_norm(x, norm.weight, norm.variance_epsilon, fp8=True)
    assert meter.bytes == 4 * 128 * 64 * 1 + 2 * 4 * 128 * 4  # float8 x + its scale and rstd, fp32 per token
    assert torch.equal(out, rms_norm(x, norm.weight, norm.variance_epsilon))
    grad = torch.randn_like(out)
    (fp8_grad,) = torch.autograd.grad(out, x, grad)
    (exact,) = torch.autograd.grad(rms_norm(x, norm.weight, norm.variance_epsilon), x, grad)
    error = (fp8_grad.float() - exact.float()).norm() / exact.float().norm()
    assert 0 < error < 0.05, error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("weight_dtype", [None, torch.float32])
def test_fused_backward_matches_the_pytorch_backward(monkeypatch, dtype, fp8, weight_dtype):
    """The one-pass kernel (a CUDA path, forced here onto the Triton interpreter) gives the PyTorch backward's input
    gradient: float8 or plain saved input, the weight in the input's dtype or fp32 (autocast's master weights),
    a width off the block size. A trained weight keeps the PyTorch path (the kernel computes no weight gradient)."""
    import jenga.kernels.rms_norm as kernel
    import jenga.norms as norms

    torch.manual_seed(0)
    weight = (torch.randn(1100) * 0.5 + 1).to(weight_dtype or dtype)
    x0 = torch.randn(3, 7, 1100).to(dtype)
    grad = torch.randn(3, 7, 1100).to(dtype)
    calls = []
    monkeypatch.setattr(kernel, "rms_norm_backward", lambda *a, f=kernel.rms_norm_backward: calls.append(1) or f(*a))
    grads = {}
    for fused in (False, True):
        monkeypatch.setattr(norms, "fused_backward", lambda g, on=fused: on)
        x = x0.clone().requires_grad_(True)
        rms_norm(x, weight, 1e-5, fp8=fp8).backward(grad)
        grads[fused] = x.grad
    assert len(calls) == 1 and grads[True].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(grads[True], grads[False], rtol=tol, atol=tol)
    trained = weight.clone().requires_grad_(True)
    rms_norm(x0.clone().requires_grad_(True), trained, 1e-5, fp8=fp8).backward(grad)
    assert len(calls) == 1 and trained.grad is not None


def test_fused_backward_names_bad_inputs():
    from jenga.kernels.rms_norm import rms_norm_backward

    x, rstd, weight = torch.randn(4, 8), torch.ones(4, 1), torch.ones(8)
    with pytest.raises(ValueError, match="a scale exactly when x is float8"):
        rms_norm_backward(x, torch.ones(4), rstd, weight, torch.randn(4, 8), torch.float32)
    with pytest.raises(ValueError, match="of one shape"):
        rms_norm_backward(x, None, rstd, weight, torch.randn(4, 9), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("weight_dtype", [None, torch.float32])
def test_fused_forward_matches_the_pytorch_forward(monkeypatch, dtype, fp8, weight_dtype):
    """The one-pass forward (a CUDA path, forced onto the Triton interpreter) gives the PyTorch forward's output in
    its dtype and its rstd (the row sum's order aside), and the float8 copy bit for bit `to_fp8`'s; the model's
    gradient through it is the PyTorch path's. A width off the block size, rows of mixed magnitude."""
    import jenga.kernels.rms_norm as kernel
    import jenga.norms as norms
    from jenga.fp8 import to_fp8

    torch.manual_seed(0)
    weight = (torch.randn(1100) * 0.5 + 1).to(weight_dtype or dtype)
    x0 = (torch.randn(3, 7, 1100) * torch.logspace(-2, 2, 7)[:, None]).to(dtype)
    grad = torch.randn(3, 7, 1100)
    calls, saved, results = [], {}, {}
    monkeypatch.setattr(kernel, "rms_norm_forward", lambda *a, f=kernel.rms_norm_forward: calls.append(1) or f(*a))
    for fused in (False, True):
        monkeypatch.setattr(norms, "fused_forward", lambda x, on=fused: on)
        x = x0.clone().requires_grad_(True)
        kept = saved.setdefault(fused, [])
        with torch.autograd.graph.saved_tensors_hooks(lambda t, kept=kept: kept.append(t) or t, lambda t: t):
            out = rms_norm(x, weight, 1e-5, fp8=fp8)
        out.backward(grad.to(out.dtype))
        results[fused] = out, x.grad
    assert len(calls) == 1
    (ref, ref_grad), (out, out_grad) = results[False], results[True]
    assert out.dtype == ref.dtype == torch.promote_types(weight.dtype, dtype)
    ulp = 1e-6 if dtype == torch.float32 else 2e-3  # a rounding of the normalized row (and of the product)
    torch.testing.assert_close(out, ref, rtol=ulp, atol=0)
    if dtype == torch.float16:  # rstd's last bit moves a rounding of the fp16 row only rarely
        assert (out != ref).float().mean() < 0.01
    rstd_ref, rstd = saved[False][-1], saved[True][-1]
    torch.testing.assert_close(rstd, rstd_ref, rtol=1e-6, atol=0)
    if fp8:
        q, scale = to_fp8(x0)
        assert torch.equal(saved[True][0].view(torch.uint8), q.view(torch.uint8)) and torch.equal(saved[True][1], scale)
    torch.testing.assert_close(out_grad, ref_grad, rtol=ulp * 2, atol=ulp * 2)


def test_fused_forward_names_bad_inputs():
    from jenga.kernels.rms_norm import rms_norm_forward

    with pytest.raises(ValueError, match="last dimension"):
        rms_norm_forward(torch.randn(4, 8), torch.ones(7), 1e-5, fp8=False, fp8_max=448.0)

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

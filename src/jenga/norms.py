"""Lean RMSNorm: the same forward as Hugging Face's LlamaRMSNorm, without its fp32 saved copies.

HF's RMSNorm upcasts the input to fp32 and autograd keeps that copy (4 bytes per element) for backward,
once per norm per layer. This function keeps the input in its own dtype plus one fp32 scale per token and
recomputes the normalized values in backward: for bf16 that halves the norm's saved bytes. With `fp8` the input
is kept in float8 (`jenga.fp8`), a quarter of HF's bytes.
"""

from __future__ import annotations

import torch

from .fp8 import from_fp8, to_fp8


class LeanRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(*(to_fp8(x) if fp8 else (x, None)), weight, rstd)
        ctx.dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, scale, weight, rstd = ctx.saved_tensors
        x = x if scale is None else from_fp8(x, scale, ctx.dtype)
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = (grad_out * weight).to(x.dtype).float()
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = (rstd * (grad_normed - normed * dot)).to(x.dtype)
        return grad_x, grad_weight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool = False) -> torch.Tensor:
    """`weight * normalize(x)` exactly as LlamaRMSNorm computes it, saving x (not an fp32 copy; with `fp8`, a
    float8 copy) for backward."""
    return LeanRMSNormFunction.apply(x, weight, eps, fp8)

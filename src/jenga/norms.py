"""Lean RMSNorm: the same forward as Hugging Face's LlamaRMSNorm, without its fp32 saved copies.

HF's RMSNorm upcasts the input to fp32 and autograd keeps that copy (4 bytes per element) for backward,
once per norm per layer. This function keeps the input in its own dtype plus one fp32 scale per token and
recomputes the normalized values in backward: for bf16 that halves the norm's saved bytes. With `fp8` the input
is kept in float8 (`jenga.fp8`), a quarter of HF's bytes, and the output's readers that save it for a product
(the q, k and v adapters) read that copy too (`jenga.fp8.mark_norm_output`). On CUDA the forward (with the float8
copy) and a frozen norm's backward are one Triton pass each (`jenga.kernels.rms_norm`).
"""

from __future__ import annotations

import torch

from .fp8 import FP8_MAX, from_fp8, mark_norm_output, to_fp8


def fused_backward(grad: torch.Tensor) -> bool:
    """Whether backward takes the one-pass Triton kernel (`jenga.kernels.rms_norm`): on CUDA."""
    return grad.is_cuda


def fused_forward(x: torch.Tensor) -> bool:
    """Whether forward (with the float8 copy) takes the one-pass Triton kernel: on CUDA."""
    return x.is_cuda


class LeanRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool) -> torch.Tensor:
        if fused_forward(x):
            from .kernels.rms_norm import rms_norm_forward

            out, rstd, q, scale = rms_norm_forward(x, weight, eps, fp8, FP8_MAX)
            saved = (q, scale) if fp8 else (x, None)
        else:
            out, rstd = reference_forward(x, weight, eps)
            saved = to_fp8(x) if fp8 else (x, None)
        ctx.save_for_backward(*saved, weight, rstd)
        ctx.dtype = x.dtype
        # the q, k and v adapters read out through this copy (`jenga.fp8.input_copy`). Under torch.compile the note
        # is a graph break, as the adapters' own float8 cache is: without it they would round differently there.
        if fp8:
            mark_norm_output(out, *saved, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, scale, weight, rstd = ctx.saved_tensors
        if fused_backward(grad_out) and not ctx.needs_input_grad[1]:  # a trained weight takes the path below
            from .kernels.rms_norm import rms_norm_backward  # Triton is needed on the GPU path only

            return rms_norm_backward(x, scale, rstd, weight, grad_out, ctx.dtype), None, None, None
        grad_x, grad_weight = reference_backward(x, scale, rstd, weight, grad_out, ctx.dtype, ctx.needs_input_grad[1])
        return grad_x, grad_weight, None, None


def reference_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, rstd) as LlamaRMSNorm computes them: the CPU path, and the reference of the CUDA kernel."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def reference_backward(
    x: torch.Tensor,
    scale: torch.Tensor | None,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    grad_out: torch.Tensor,
    dtype: torch.dtype,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input gradient, weight gradient or None) of the lean RMSNorm in PyTorch, from the saved input (float8
    with `scale`, or plain): the CPU path, and the reference of the CUDA kernel."""
    x = x if scale is None else from_fp8(x, scale, dtype)
    normed = x.float() * rstd
    grad_weight = None
    if weight_grad:
        grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    grad_normed = (grad_out * weight).to(x.dtype).float()
    dot = (grad_normed * normed).mean(-1, keepdim=True)
    return (rstd * (grad_normed - normed * dot)).to(x.dtype), grad_weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool = False) -> torch.Tensor:
    """`weight * normalize(x)` exactly as LlamaRMSNorm computes it, saving x (not an fp32 copy; with `fp8`, a
    float8 copy) for backward."""
    return LeanRMSNormFunction.apply(x, weight, eps, fp8)

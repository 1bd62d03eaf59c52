"""RMSNorm's input gradient in one Triton program per row, from the saved input (float8 or the input dtype).

`jenga.norms`' PyTorch backward takes about ten element-wise passes over the row (decode, upcast, normalize,
the product with the weight, the row dot product, the combination, the casts). Here a program reads the row
twice (the second read hits the cache) and writes the gradient once. It rounds where the PyTorch path rounds
(the decoded input and `grad * weight` to the input dtype) and computes the rest in fp32; only the row sum's
order differs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import BLOCK, _e4m3_value


@triton.jit
def _row_terms(x_ptr, x_scale, rstd, w_ptr, grad_ptr, offs, cols, FP8: tl.constexpr, dtype: tl.constexpr):
    """(normalized input, grad * weight rounded to `dtype`) of one block of a row, in fp32."""
    mask = offs < cols
    if FP8:
        code = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.int32)
        x = (_e4m3_value(code) * x_scale).to(dtype).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x * rstd, (grad * weight).to(dtype).to(tl.float32)


@triton.jit
def _rms_norm_backward_kernel(
    x_ptr,
    x_scale_ptr,
    rstd_ptr,
    w_ptr,
    grad_ptr,
    out_ptr,
    cols,
    FP8: tl.constexpr,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    rstd = tl.load(rstd_ptr + row)
    x_scale = tl.load(x_scale_ptr + row)  # without float8 a placeholder row that is never used
    x_row, grad_row = x_ptr + row * cols, grad_ptr + row * cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(STEPS):  # the row's dot product of grad * weight and the normalized input
        offs = step * BLOCK + tl.arange(0, BLOCK)
        normed, grad_normed = _row_terms(x_row, x_scale, rstd, w_ptr, grad_row, offs, cols, FP8, dtype)
        acc += grad_normed * normed
    dot = tl.sum(acc, axis=0) / cols
    for step in range(STEPS):
        offs = step * BLOCK + tl.arange(0, BLOCK)
        normed, grad_normed = _row_terms(x_row, x_scale, rstd, w_ptr, grad_row, offs, cols, FP8, dtype)
        tl.store(out_ptr + row * cols + offs, (rstd * (grad_normed - normed * dot)).to(dtype), mask=offs < cols)


def rms_norm_backward(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The input gradient of `weight * (x * rstd).to(dtype)` (the lean RMSNorm's), in `dtype` (the input's). `x`
    is the saved input: float8 codes with their per-row `x_scale`, or `x` itself (`x_scale` None)."""
    fp8 = x_scale is not None
    if x.shape != grad.shape or weight.shape != grad.shape[-1:] or (fp8 != (x.dtype == torch.float8_e4m3fn)):
        raise ValueError(
            f"need x {tuple(x.shape)} and grad {tuple(grad.shape)} of one shape, a weight of the last dimension "
            f"({tuple(weight.shape)}), and a scale exactly when x is float8 (x is {x.dtype})"
        )
    x = (x.view(torch.uint8) if fp8 else x).contiguous()
    grad, out = grad.contiguous(), torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if grad.numel():
        rows, cols = grad.numel() // grad.shape[-1], grad.shape[-1]
        scale = x_scale.contiguous() if fp8 else rstd  # read, never used without float8
        args = (x, scale, rstd.contiguous(), weight.contiguous(), grad, out, cols)
        _rms_norm_backward_kernel[(rows,)](*args, FP8=fp8, BLOCK=BLOCK, STEPS=triton.cdiv(cols, BLOCK))
    return out

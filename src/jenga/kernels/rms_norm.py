"""RMSNorm forward (with the float8 copy backward reads) and its input gradient, one Triton program per row.

`jenga.norms`' PyTorch forward takes about seven element-wise passes over the row (upcast, square, mean,
normalize, cast, the product with the weight) and the float8 copy two more; its backward about ten (decode,
upcast, normalize, the product with the weight, the row dot product, the combination, the casts). Here each
direction reads the row twice (the second read hits the cache) and writes its outputs once. Both round where
the PyTorch path rounds (the normalized row, `grad * weight` and the decoded input to the input dtype) and
compute the rest in fp32; only the row sums' order differs, which can move rstd by an fp32 ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import BLOCK, _e4m3_bits, _e4m3_value, _row_scale


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


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    rstd_ptr,
    q_ptr,
    scale_ptr,
    cols,
    eps,
    fp8_max,
    FP8: tl.constexpr,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    x_row = x_ptr + row * cols
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    peak = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(STEPS):
        offs = step * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < cols, other=0.0).to(tl.float32)
        squares += x * x
        peak = tl.maximum(peak, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    # the mean as PyTorch takes it (the sum times 1 / cols), then rsqrt of the variance plus eps
    rstd = tl.math.rsqrt(tl.sum(squares, axis=0) * tl.math.div_rn(1.0, cols.to(tl.float32)) + eps)
    tl.store(rstd_ptr + row, rstd)
    inv = 1.0
    if FP8:  # the codec's scale
        scale, inv = _row_scale(peak, fp8_max)
        tl.store(scale_ptr + row, scale)
    for step in range(STEPS):
        offs = step * BLOCK + tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        weight = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        normed = (x * rstd).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * cols + offs, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)
        if FP8:
            tl.store(q_ptr + row * cols + offs, _e4m3_bits(x * inv).to(tl.uint8), mask=mask)


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool, fp8_max: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(`weight * (x * rstd).to(x.dtype)` in PyTorch's result dtype of weight and x, rstd (rows, 1) in fp32, and
    with `fp8` x's float8 copy and scales as `jenga.fp8.to_fp8` makes them, else None twice), in one pass."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"need a weight of x's last dimension, got {tuple(weight.shape)} for x {tuple(x.shape)}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device) if fp8 else rstd  # rstd: a pointer never written
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) if fp8 else rstd
    if x.numel():
        rows, cols = x.numel() // x.shape[-1], x.shape[-1]
        args = (x, weight.contiguous(), out, rstd, q, scale, cols, eps, fp8_max)
        _rms_norm_forward_kernel[(rows,)](*args, FP8=fp8, BLOCK=BLOCK, STEPS=triton.cdiv(cols, BLOCK))
    return (out, rstd, q.view(torch.float8_e4m3fn), scale) if fp8 else (out, rstd, None, None)

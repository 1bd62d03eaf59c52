"""The rotary embedding of one tensor, forward or backward, in one Triton pass that rounds where PyTorch rounds.

Hugging Face's `apply_rotary_pos_emb` takes, per tensor, eight element-wise passes forward (two products, two
slices, a negation, a concatenation, a sum, casts) and as many backward. A program here handles one token of
every head: it reads the token's cos and sin once and each head's two halves once, and writes the result once.
Each product is rounded to the dtype PyTorch computes it in and each sum to the output dtype, with contraction
into fused multiply-adds turned off on the GPU, so the values are PyTorch's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _product(a, b, MID: tl.constexpr, OUT: tl.constexpr):
    """`a * b` as PyTorch's element-wise product in dtype MID computes it, then cast to OUT, in fp32."""
    return (a * b).to(MID).to(OUT).to(tl.float32)


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    seq,
    x_sb,
    x_sh,
    x_ss,
    o_sb,
    o_sh,
    o_ss,
    c_sb,
    c_ss,
    HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MID: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b, s = token // seq, token % seq
    OUT = out_ptr.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    trig = b * c_sb + s * c_ss + d
    cos1 = tl.load(cos_ptr + trig, mask=d_ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + trig + HALF, mask=d_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + trig, mask=d_ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + trig + HALF, mask=d_ok, other=0.0).to(tl.float32)
    for h0 in range(0, HEADS, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)  # a head's offset in a (B, H, S, D) layout passes 2**31
        mask = (h < HEADS)[:, None] & d_ok[None, :]
        src = x_ptr + b * x_sb + s * x_ss + h[:, None] * x_sh + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose: x1 feeds out2 through sin2, x2 feeds out1 through -sin1
            first = _product(x1, cos1[None, :], MID, OUT) + _product(x2, sin2[None, :], MID, OUT)
            second = _product(x2, cos2[None, :], MID, OUT) - _product(x1, sin1[None, :], MID, OUT)
        else:  # out = x * cos + cat(-x2, x1) * sin
            first = _product(x1, cos1[None, :], MID, OUT) - _product(x2, sin1[None, :], MID, OUT)
            second = _product(x2, cos2[None, :], MID, OUT) + _product(x1, sin2[None, :], MID, OUT)
        dst = out_ptr + b * o_sb + s * o_ss + h[:, None] * o_sh + d[None, :]
        tl.store(dst, first.to(OUT), mask=mask)
        tl.store(dst + HALF, second.to(OUT), mask=mask)


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype, backward: bool
) -> torch.Tensor:
    """Forward: `x * cos + rotate_half(x) * sin` for x (B, H, S, D) and cos, sin (B or 1, S, D), in `out_dtype`
    (PyTorch's result type of x and cos). Backward: x is the output's gradient and the result the input's, in
    `out_dtype` (the input's dtype). The output has x's strides."""
    batch, heads, seq, dim = x.shape
    if dim % 2 or cos.shape != sin.shape or cos.shape[1:] != (seq, dim) or cos.shape[0] not in (1, batch):
        raise ValueError(
            f"need x (B, H, S, D) with D even and cos, sin (B or 1, S, D); got x {tuple(x.shape)}, "
            f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    x = x if x.stride(-1) == 1 else x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x, dtype=out_dtype)
    if x.numel():
        mid = torch.promote_types(x.dtype, cos.dtype)
        c_sb = cos.stride(0) if cos.shape[0] == batch and batch > 1 else 0
        half = dim // 2
        grid, block_h, block_d = (batch * seq,), min(triton.next_power_of_2(heads), 16), triton.next_power_of_2(half)
        options = {"enable_fp_fusion": False} if x.is_cuda else {}
        _rotary_kernel[grid](
            x, cos, sin, out, seq,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), c_sb, cos.stride(1),
            HEADS=heads, HALF=half, BLOCK_H=block_h, BLOCK_D=block_d,
            MID=TL_DTYPES[mid], BACKWARD=backward, **options,
        )  # fmt: skip
    return out

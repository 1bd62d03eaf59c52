"""The rotary embedding of q and k as one Triton pass per tensor and direction on CUDA, equal bit for bit to the
model's own `apply_rotary_pos_emb`.

The family function takes about eight element-wise passes per tensor each way (products, slices, negation,
concatenation, sum); at 8K tokens on a 7B model that is tens of milliseconds of a step. `with_fused_rotary`
wraps a family's function so that the calls the kernel covers take it and every other call (CPU tensors, other
layouts, a cos or sin that needs a gradient) takes the original.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

RotaryFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class FusedRotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        from .kernels.rotary import rotate  # Triton is needed on the GPU path only

        ctx.save_for_backward(cos, sin)
        ctx.dtypes = q.dtype, k.dtype
        return tuple(rotate(x, cos, sin, torch.promote_types(x.dtype, cos.dtype), backward=False) for x in (q, k))

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        from .kernels.rotary import rotate

        cos, sin = ctx.saved_tensors
        pairs = zip((grad_q, grad_k), ctx.dtypes, strict=True)
        return *(rotate(g, cos, sin, dtype, backward=True) for g, dtype in pairs), None, None


def fused_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel covers this call: CUDA tensors q (B, H, S, D) and k (B, Hk, S, D) with an even D, and
    cos, sin (B or 1, S, D) that need no gradient."""
    tensors = (q, k, cos, sin)
    if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors) or q.dim() != 4 or k.dim() != 4:
        return False
    batch, _, seq, dim = q.shape
    return (
        k.shape[0] == batch
        and k.shape[2:] == (seq, dim)
        and dim % 2 == 0
        and cos.shape == sin.shape
        and cos.dim() == 3
        and cos.shape[0] in (1, batch)
        and cos.shape[1:] == (seq, dim)
        and not (cos.requires_grad or sin.requires_grad)
        and all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in tensors)
    )


def with_fused_rotary(original: RotaryFn) -> RotaryFn:
    """`original` (a family's `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`) with the kernel where it
    covers the call."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        default_layout = len(args) <= 1 and set(kwargs) <= {"unsqueeze_dim"} and unsqueeze == 1
        if default_layout and fused_rotary(q, k, cos, sin):
            return FusedRotaryFunction.apply(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.jenga_original = original
    return apply_rotary_pos_emb

"""The rotary embedding of q and k as one Triton pass per tensor and direction on CUDA, equal bit for bit to the
model's own `apply_rotary_pos_emb`.

The family function takes about eight element-wise passes per tensor each way (products, slices, negation,
concatenation, sum); at 8K tokens on a 7B model that is tens of milliseconds of a step. `with_fused_rotary`
wraps a family's function so that the calls the kernel covers take it and every other call (CPU tensors, other
layouts, a cos or sin that needs a gradient) takes the original. Inside `liger_rotary()` (a layer running the
model's own attention under `apply_jenga(fused_kernels=True)`) those calls take Liger Kernel's kernel instead.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from . import liger

RotaryFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class _LigerRotary(threading.local):
    """Whether the swapped function's calls in this thread take Liger's kernel (per thread, as a checkpoint's
    recompute on autograd's thread enters its layer's forward, and with it `liger_rotary`, again)."""

    on = False


_liger_rotary = _LigerRotary()


@contextmanager
def liger_rotary() -> Iterator[None]:
    """Calls of a wrapped `apply_rotary_pos_emb` in the block rotate with Liger's kernel where it runs. Liger
    rotates q and k in place: only for calls whose q and k nothing else reads (the model's own attention)."""
    before, _liger_rotary.on = _liger_rotary.on, True
    try:
        yield
    finally:
        _liger_rotary.on = before


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
    """Whether the kernel covers this call: CUDA tensors in `rotary_layout`."""
    return rotary_layout(q, k, cos, sin) and all(t.is_cuda for t in (q, k, cos, sin))


def rotary_layout(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """q (B, H, S, D) and k (B, Hk, S, D) with an even D, and cos, sin (B or 1, S, D) that need no gradient: the
    calls the fused kernels (Jenga's and Liger's) cover."""
    tensors = (q, k, cos, sin)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or q.dim() != 4 or k.dim() != 4:
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


def liger_rotary_covers(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether Liger's kernel covers this call: `rotary_layout`, one dtype for all four (Liger writes q and k in
    their own dtype, where the family's function promotes them to cos's), where Liger's kernels run."""
    layout = rotary_layout(q, k, cos, sin)
    return layout and all(t.dtype == q.dtype for t in (k, cos, sin)) and liger.covers(q)


def with_fused_rotary(original: RotaryFn) -> RotaryFn:
    """`original` (a family's `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`) with the kernel where it
    covers the call."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        default_layout = len(args) <= 1 and set(kwargs) <= {"unsqueeze_dim"} and unsqueeze == 1
        if default_layout and _liger_rotary.on and liger_rotary_covers(q, k, cos, sin):
            return liger.rope(q, k, cos, sin)
        if default_layout and fused_rotary(q, k, cos, sin):
            return FusedRotaryFunction.apply(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.jenga_original = original
    return apply_rotary_pos_emb

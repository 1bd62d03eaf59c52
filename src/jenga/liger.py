"""Liger Kernel's fused ops inside Jenga's paths, where they fit (`apply_jenga(..., fused_kernels=True)`).

Liger Kernel (optional: `pip install liger-kernel`) fuses RMSNorm, the rotary embedding, the SiLU product and
the LM head with cross-entropy into Triton kernels. Jenga's own paths save what backward reads in float8, which
Liger's ops cannot, so each op takes Liger's kernel only where no float8 copy is lost:

- RMSNorm: Liger's forward and backward when `fp8_activations` is off and the weight has the input's dtype
  (both keep the input and one fp32 scale per row; Liger writes the input's dtype where the family promotes);
- the rotary embedding: Liger's kernel, which rotates q and k in place, in layers that run the model's own
  attention (a sparse layer's dense pass shares its q and k with scoring and the kept pass, which an in-place
  rotation would rotate twice: those keep `jenga.rotary`);
- the gated MLP's SiLU product: Liger's forward and backward kernels inside Jenga's sparse-saved MLP, unless the
  activations are saved in float8 (then Jenga's kernels write the float8 copies in the same pass);
- the loss: Liger's fused linear cross-entropy in place of the segmented loss (both take the hidden states'
  gradient in forward, a chunk of logits at a time), unless a trained head reads hidden states that need no
  gradient (`covers_loss`).

Every op runs where Liger's kernels run (CUDA tensors); elsewhere Jenga's own path computes the same thing.
"""

from __future__ import annotations

import importlib.util

import torch
from torch.autograd.function import once_differentiable

LIGER_MISSING = (
    "apply_jenga(fused_kernels=True) composes Liger Kernel's fused ops, and liger-kernel is not installed: "
    "pip install liger-kernel (tested with 0.8.5), or leave fused_kernels False"
)


def require() -> None:
    """Raise, naming the install, when Liger Kernel is missing (at apply time, not at the first step)."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise ImportError(LIGER_MISSING)


def covers(t: torch.Tensor) -> bool:
    """Whether Liger's kernels take this tensor's op: on CUDA (the CPU tests run them in Triton's interpreter)."""
    return t.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * normalize(x)` as LlamaRMSNorm rounds it (fp32 scale, the normalized input cast back to x's dtype
    before the weight), Liger's kernel forward and backward; the upstream gradient is left intact."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Llama family's rotary embedding of q (B, H, S, D) and k (B, Hk, S, D), rotated in place."""
    from liger_kernel.ops.rope import LigerRopeFunction

    return LigerRopeFunction.apply(q, k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one pass (no autograd: the gated MLP's own Function saves what its backward reads)."""
    from liger_kernel.ops.swiglu import swiglu_forward

    return swiglu_forward(gate.contiguous(), up.contiguous())[2]


def silu_mul_backward(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, overwrite: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of silu(gate) * up with respect to gate and up, in one pass. Liger's kernel writes them over
    its inputs: `overwrite` says that `gate` and `up` are scratch (recomputed or decoded); otherwise they are
    copied first, as saved tensors must survive a backward that retains the graph."""
    from liger_kernel.ops.swiglu import swiglu_backward

    gate, up = (t.contiguous() if overwrite else t.clone(memory_format=torch.contiguous_format) for t in (gate, up))
    return swiglu_backward(gate, up, grad.contiguous())


class _LinearCrossEntropy(torch.autograd.Function):
    """Liger's fused linear cross-entropy forward (gradients taken with the loss), with a backward that scales the
    saved gradients out of place. Liger's own Function multiplies them in place by the upstream gradient, which
    is never 1 here (the normalizer, a loss scale): a second backward over a retained graph scaled them again."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int):
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

        loss, _, _, _, grad_hidden, grad_weight, grad_bias = fused_linear_cross_entropy_forward(
            _input=hidden, weight=weight, target=targets, bias=bias, ignore_index=ignore_index, reduction="sum",
            accum_dtype=torch.float32,
        )  # fmt: skip
        ctx.save_for_backward(grad_hidden if ctx.needs_input_grad[0] else None, grad_weight, grad_bias)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grads = (None if t is None else t * grad.to(t.dtype) for t in ctx.saved_tensors)
        return (*grads, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """The summed fp32 cross-entropy of `linear(hidden, weight, bias)` (hidden (N, D), targets (N,)), Liger's
    fused kernel: logits a chunk at a time, the gradients taken in forward (a trained head's accumulated in fp32).
    Liger takes a head's gradients only with the hidden states' (`covers_loss`)."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index)


def covers_loss(hidden: torch.Tensor, head: torch.nn.Module) -> bool:
    """Whether the loss takes Liger's kernel: where its kernels run, and not for a trained head over hidden states
    that need no gradient (Liger then takes no gradient at all: the head would silently get none)."""
    trained_head = any(p.requires_grad for p in head.parameters())
    return covers(hidden) and (hidden.requires_grad or not trained_head)

"""Segmented causal-LM loss: the full (tokens x vocab) logits never exist at once.

At long context the dense loss is dominated by its logits: 8K tokens x 32K vocab is 1 GiB of fp32 logits,
plus as much again for the softmax that autograd keeps for backward. Here the logits are computed one
segment of tokens at a time and thrown away (with a frozen head, after the hidden states' gradient is taken
from them; otherwise backward recomputes them segment by segment), so the extra memory is O(segment_size x
vocab) while the result equals ``transformers``' ``ForCausalLMLoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from . import liger
from .autocast import autocast_state
from .config import JengaConfig

__all__ = ["segmented_causal_lm_loss"]


def _active_segment_starts(valid: Tensor, segment_size: int) -> list[int]:
    """Start offsets of segments holding at least one supervised token (one host sync for all of them)."""
    segment_ids = torch.unique(valid.nonzero().flatten() // segment_size)
    return (segment_ids * segment_size).tolist()


def _row_scale(shift_labels: Tensor, ignore_index: int, grad_total: Tensor) -> Tensor:
    """The gradient of the summed loss per row: grad_total on supervised rows, 0 on ignored ones (where, not
    multiply: an inf grad_total must not turn ignored rows into nan)."""
    return torch.where(shift_labels != ignore_index, grad_total, 0.0)


def _logit_grads(logits: Tensor, labels: Tensor, ignore_index: int, row_scale: Tensor) -> Tensor:
    """d(loss)/d(logits) of one segment in fp32: (softmax - one_hot(label)) * row_scale per row."""
    valid = labels != ignore_index
    grads = logits.float().softmax(dim=-1)
    target = torch.where(valid, labels, 0).unsqueeze(1)
    grads.scatter_add_(1, target, -valid.to(grads.dtype).unsqueeze(1))
    return grads.mul_(row_scale.unsqueeze(1))


def fused_loss(logits: Tensor) -> bool:
    """Whether a segment's loss and gradient take the one-pass Triton kernel: on CUDA."""
    return logits.is_cuda


def _segment_loss(
    logits: Tensor, labels: Tensor, ignore_index: int, row_scale: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """(summed fp32 loss of a segment's logits, with `row_scale` their gradient in the logits' dtype): one Triton
    pass per row on CUDA (`jenga.kernels.cross_entropy`), fp32 PyTorch passes elsewhere."""
    if fused_loss(logits):
        from .kernels.cross_entropy import cross_entropy_rows  # Triton is needed on the GPU path only

        loss, grads = cross_entropy_rows(logits, labels, ignore_index, row_scale)
        return loss.sum(), grads
    return reference_segment_loss(logits, labels, ignore_index, row_scale)


def reference_segment_loss(
    logits: Tensor, labels: Tensor, ignore_index: int, row_scale: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """`_segment_loss` in fp32 PyTorch passes: the CPU path, and what the kernel replaced on the GPU."""
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    if row_scale is None:
        return loss, None
    return loss, _logit_grads(logits, labels, ignore_index, row_scale).to(logits.dtype)


class _SegmentedCrossEntropy(torch.autograd.Function):
    """fp32 cross-entropy of ``linear(hidden, weight, bias)`` against labels, summed segment by segment and
    divided by ``normalizer`` (a tensor: the supervised-token count or ``num_items_in_batch``).

    When only the hidden states need a gradient (a frozen head: LoRA), forward computes it with the loss, from
    each segment's logits while they exist, scaled as backward would scale it for an upstream gradient of 1, and
    saves it (the hidden states' size) instead of the hidden states; backward multiplies it by the upstream
    gradient (exact for 1). Otherwise only the inputs (by reference) and the shifted labels are saved, and
    backward recomputes each segment's logits: one more lm_head matmul, peak memory still one segment's logits.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        shift_labels: Tensor,
        normalizer: Tensor,
        segment_size: int,
        ignore_index: int,
    ) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        starts = _active_segment_starts(shift_labels != ignore_index, segment_size)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_now = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        grad_flat = torch.zeros_like(flat) if grad_now else None
        # what backward's scale per row is for an upstream gradient of 1 (the division's own gradient)
        row_scale = _row_scale(shift_labels, ignore_index, torch.ones_like(total) / normalizer) if grad_now else None
        for start in starts:
            labels = shift_labels[start : start + segment_size]
            logits = F.linear(flat[start : start + segment_size], weight, bias)
            scale = row_scale[start : start + segment_size] if grad_flat is not None else None
            loss, grads = _segment_loss(logits, labels, ignore_index, scale)
            total += loss
            if grads is not None:  # under the caller's autocast, as the recompute below runs
                rows = grad_flat[start : start + segment_size]
                if rows.dtype == grads.dtype:  # written in place, not copied in
                    torch.mm(grads, weight.to(grads.dtype), out=rows)
                else:
                    rows.copy_(grads @ weight.to(grads.dtype))
        # With the gradient taken, backward needs only the hidden states' shape: saving them would keep them alive.
        ctx.save_for_backward(None if grad_now else hidden, weight, bias, shift_labels, normalizer, grad_flat)
        ctx.hidden_shape = hidden.shape
        ctx.starts = starts
        ctx.segment_size = segment_size
        ctx.ignore_index = ignore_index
        # Backward must recompute the logits exactly as forward did, including under Trainer's autocast.
        ctx.autocast_kwargs = autocast_state(hidden.device.type)
        return total / normalizer

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None, None]:
        hidden, weight, bias, shift_labels, normalizer, scaled = ctx.saved_tensors
        if scaled is not None:  # computed in forward for an upstream gradient of 1
            return (scaled * grad_loss).view(ctx.hidden_shape), None, None, None, None, None, None
        row_scale = _row_scale(shift_labels, ctx.ignore_index, grad_loss / normalizer)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        flat = hidden.reshape(-1, hidden.shape[-1])
        grad_flat = torch.zeros_like(flat) if need_hidden else None
        # Weight/bias gradients sum over every segment, so accumulate them in fp32 whatever the model dtype.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        size = ctx.segment_size
        with torch.autocast(**ctx.autocast_kwargs):
            for start in ctx.starts:
                h_seg = flat[start : start + size]
                logits = F.linear(h_seg, weight, bias)
                labels = shift_labels[start : start + size]
                dlogits = _logit_grads(logits, labels, ctx.ignore_index, row_scale[start : start + size])
                if grad_bias is not None:
                    grad_bias += dlogits.sum(dim=0)
                dlogits = dlogits.to(logits.dtype)
                if grad_flat is not None:
                    grad_flat[start : start + size] = dlogits @ weight
                if grad_weight is not None:
                    grad_weight += (dlogits.t() @ h_seg).float()
        return (
            grad_flat.view(hidden.shape) if grad_flat is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def segmented_causal_lm_loss(
    hidden_states: Tensor,
    lm_head: nn.Linear,
    labels: Tensor,
    segment_size: int = JengaConfig.loss_chunk_tokens,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    shift_labels: Tensor | None = None,
    fused: bool = False,
) -> Tensor:
    """Causal-LM loss of ``lm_head(hidden_states)`` against ``labels`` without materializing all logits.

    Same semantics as ``transformers.loss.loss_utils.ForCausalLMLoss``: logits in the lm_head's dtype,
    upcast to fp32, labels shifted left by one (the last position ignored), cross-entropy ignoring
    ``ignore_index``; mean over supervised tokens, or sum / ``num_items_in_batch`` when given (Trainer's
    gradient accumulation). As there, a mean over zero supervised tokens is nan (0 / 0) while the
    gradients are zero. Peak extra memory is O(``segment_size`` x vocab) in forward and backward.

    Args:
        hidden_states: (batch, seq, hidden) final hidden states.
        lm_head: the model's output projection; a plain ``nn.Linear`` (an adapter-wrapped head would be
            silently bypassed, so it is rejected).
        labels: (batch, seq) token ids, unshifted, as passed to the model.
        segment_size: tokens of the flattened batch x seq axis per logits segment.
        ignore_index: label value that is not supervised.
        num_items_in_batch: normalizer replacing the supervised-token count.
        shift_labels: (batch, seq) targets already shifted, used instead of ``labels`` (the Trainer passes them
            under context parallelism, where each rank holds a piece of the sequence).
        fused: sum the token losses with Liger Kernel's fused linear cross-entropy where its kernels run
            (`jenga.liger`; its own chunks of logits, not ``segment_size``).
    """
    if segment_size < 1:
        raise ValueError(f"segment_size must be >= 1, got {segment_size}")
    if not isinstance(lm_head, nn.Linear):
        raise TypeError(f"lm_head must be a torch.nn.Linear, got {type(lm_head).__name__}")
    targets = labels if shift_labels is None else shift_labels
    name = "labels" if shift_labels is None else "shift_labels"
    if hidden_states.dim() != 3 or targets.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"{name} shape {tuple(targets.shape)} must equal hidden_states.shape[:2]; "
            f"hidden_states shape is {tuple(hidden_states.shape)} (expected (batch, seq, hidden))"
        )
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden_states.device)
    vocab = lm_head.out_features
    outside = (shift_labels != ignore_index) & ((shift_labels < 0) | (shift_labels >= vocab))
    if bool(outside.any()):  # the GPU kernel reads the label's logit unchecked
        bad = shift_labels[outside][:5].tolist()
        raise ValueError(
            f"{name} holds token ids outside the LM head's vocabulary [0, {vocab}) (e.g. {bad}); unsupervised "
            f"positions take ignore_index ({ignore_index}). Check the tokenizer matches the model."
        )
    if num_items_in_batch is None:
        normalizer = (shift_labels != ignore_index).sum()
    elif torch.is_tensor(num_items_in_batch):
        normalizer = num_items_in_batch.to(hidden_states.device)
    else:  # a Python number divides the fp32 sum as it would as a scalar
        dtype = torch.float32 if isinstance(num_items_in_batch, float) else torch.int64
        normalizer = torch.tensor(num_items_in_batch, dtype=dtype, device=hidden_states.device)
    if fused and liger.covers_loss(hidden_states, lm_head):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        total = liger.linear_cross_entropy(flat, lm_head.weight, lm_head.bias, shift_labels, ignore_index)
        return _Normalized.apply(total, normalizer)
    return _SegmentedCrossEntropy.apply(
        hidden_states, lm_head.weight, lm_head.bias, shift_labels, normalizer, segment_size, ignore_index
    )


class _Normalized(torch.autograd.Function):
    """total / normalizer, whose gradient is 0 where the normalizer is (a loss over no supervised token: nan, with
    zero gradients, as the segmented loss's), not an inf that would turn zero gradients into nan."""

    @staticmethod
    def forward(ctx: FunctionCtx, total: Tensor, normalizer: Tensor) -> Tensor:
        ctx.save_for_backward(normalizer)
        return total / normalizer

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (normalizer,) = ctx.saved_tensors
        return torch.where(normalizer != 0, grad / normalizer, 0.0), None

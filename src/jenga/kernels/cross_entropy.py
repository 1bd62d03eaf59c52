"""Cross-entropy of one segment's logits rows and their gradient in one Triton program per row.

The segmented loss (`jenga.loss`) took, per segment of a frozen LM head, an fp32 copy of the logits and its
log-softmax for the loss, then another fp32 copy, its softmax, the label subtraction, the row scaling and a cast
back for the gradient: about 46 bytes of memory traffic per logit, where the vocabulary is the widest tensor of a
step (128K on Llama-3-8B). Here a program reads its row twice (the log-sum-exp online, then the gradient) and
writes the gradient once in the logits' dtype: 6 bytes per logit. The arithmetic is fp32, as there; only the
order of the row sum differs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK, WARPS = 4096, 8


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    labels_ptr,
    scale_ptr,
    loss_ptr,
    grad_ptr,
    cols,
    ignore_index,
    GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * cols
    label = tl.load(labels_ptr + row).to(tl.int64)
    # per lane: the largest logit seen and the sum of exp(logit - that largest)
    peak = tl.full([BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(STEPS):
        offs = step * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_row + offs, mask=offs < cols, other=float("-inf")).to(tl.float32)
        new_peak = tl.maximum(peak, x)
        shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)  # a lane of only -inf so far: no -inf - -inf
        total = total * tl.exp(peak - shift) + tl.exp(x - shift)
        peak = new_peak
    row_peak = tl.max(peak, axis=0)
    lse = row_peak + tl.log(tl.sum(total * tl.exp(peak - row_peak), axis=0))
    valid = label != ignore_index
    target = tl.load(logits_row + label, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    if GRAD:
        scale = tl.load(scale_ptr + row)
        for step in range(STEPS):
            offs = step * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(logits_row + offs, mask=offs < cols, other=float("-inf")).to(tl.float32)
            prob = tl.exp(x - lse)
            grad = tl.where(valid & (offs == label), prob - 1.0, prob) * scale
            tl.store(grad_ptr + row * cols + offs, grad.to(grad_ptr.dtype.element_ty), mask=offs < cols)


def cross_entropy_rows(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, row_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss per row in fp32, 0 where the label is `ignore_index`; with `row_scale`, the gradient of
    Σ row_scale · loss with respect to the logits, in their dtype) for (rows, vocab) logits and (rows,) labels
    within the vocabulary. `jenga.loss`'s PyTorch path computes the same (`F.cross_entropy` on fp32 logits and
    `_logit_grads`)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"need (rows, vocab) logits and (rows,) labels, got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    if row_scale is not None and row_scale.shape != labels.shape:
        raise ValueError(f"need a row scale per row, got {tuple(row_scale.shape)} for {labels.shape[0]} rows")
    logits = logits.contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if row_scale is not None else None
    if logits.numel():
        rows, cols = logits.shape
        scale = row_scale.float().contiguous() if row_scale is not None else loss  # read only with a gradient
        args = (logits, labels.contiguous(), scale, loss, grad if grad is not None else logits, cols, ignore_index)
        steps = triton.cdiv(cols, BLOCK)
        _cross_entropy_kernel[(rows,)](*args, GRAD=grad is not None, BLOCK=BLOCK, STEPS=steps, num_warps=WARPS)
    return loss, grad

"""Block informativeness scores: the PyTorch reference that the Triton kernel and predictors must match.

The oracle score of a tile (query block i, key block j) is the maximum over the tile of the head-summed
ReLU of the causal, scaled q·kᵀ. A key block's score is the sum of its tiles over query blocks: a block that
some query attends to strongly ranks high. Padding tokens (``valid`` False) never contribute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Upper bound on elements of the per-head score slab held at once (fp32): 2**27 elements = 512 MiB.
_SLAB_ELEMENTS = 1 << 27


def num_blocks(seq_len: int, block_size: int) -> int:
    """Blocks covering `seq_len` tokens; the last one may be partial."""
    return math.ceil(seq_len / block_size)


@torch.no_grad()
def block_tile_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-tile maxima of sum_h relu(scale · q_h k_hᵀ) under the causal mask.

    q: (B, H, S, d); k: (B, Hkv, S, d) with H a multiple of Hkv (grouped-query attention).
    valid: optional (B, S) bool, False for padding. Returns fp32 (B, nb, nb); tiles above the diagonal
    are 0. Computed in fp32 from the given q and k (autocast off, as in the kernel's fp32 accumulation), in
    slabs of query blocks so the S×S matrix never exists whole.
    """
    bsz, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    nb = num_blocks(seq, block_size)
    padded = nb * block_size
    qf = F.pad(q.float(), (0, 0, 0, padded - seq)).view(bsz, kv_heads, heads // kv_heads, padded, dim)
    kf = F.pad(k.float(), (0, 0, 0, padded - seq)).unsqueeze(2)
    keep = torch.zeros(bsz, padded, dtype=torch.bool, device=q.device)
    keep[:, :seq] = True if valid is None else valid.bool()
    pos = torch.arange(padded, device=q.device)
    tiles = q.new_zeros(bsz, nb, nb, dtype=torch.float32)
    blocks_per_slab = max(1, _SLAB_ELEMENTS // (bsz * heads * block_size * padded))
    for first in range(0, nb, blocks_per_slab):
        last = min(nb, first + blocks_per_slab)
        rows = slice(first * block_size, last * block_size)
        cols = last * block_size
        with torch.autocast(q.device.type, enabled=False):
            logits = torch.matmul(qf[..., rows, :], kf[..., :cols, :].transpose(-1, -2)).mul_(scale)
        summed = logits.relu_().sum(dim=(1, 2))
        allowed = (pos[rows, None] >= pos[None, :cols]) & keep[:, rows, None] & keep[:, None, :cols]
        summed = summed.masked_fill_(~allowed, 0.0)
        pooled = summed.view(bsz, last - first, block_size, last, block_size).amax(dim=(2, 4))
        tiles[:, first:last, :last] = pooled
    return tiles


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Oracle informativeness of each key block, (B, nb) fp32: its tile maxima summed over query blocks."""
    return block_tile_scores(q, k, block_size, scale, valid).sum(dim=1)

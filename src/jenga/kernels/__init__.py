"""Triton kernels, each the fast path of a PyTorch reference elsewhere in `jenga` that it must match."""

from __future__ import annotations

import torch

from ..autocast import compute_dtype
from ..scoring import block_scores as reference_block_scores


def block_scores(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Oracle key-block scores (B, nb): the Triton kernel on CUDA, the PyTorch reference elsewhere.

    Under autocast q and k are scored in the autocast dtype, as the attention's own matmuls would run: the
    rotary embedding hands them over in fp32 there, and an fp32 kernel is several times slower.
    """
    dtype = compute_dtype(q)
    q, k = q.to(dtype), k.to(dtype)
    if not q.is_cuda:
        return reference_block_scores(q, k, block_size, scale, valid)
    from .scoring import block_tile_scores_triton  # Triton is needed on the GPU path only

    return block_tile_scores_triton(q, k, block_size, scale, valid).sum(dim=1)

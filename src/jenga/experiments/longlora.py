"""LongLoRA's shifted sparse attention (S2-Attn) as a baseline method, registered as a transformers attention.

Training-time attention within 4 groups of S/4 tokens; half of the heads see the sequence shifted by half a
group so information flows between groups (Chen et al., ICLR'24). Registered under the name "s2attn" so any
model loaded with (or switched to) that implementation uses it; Jenga composes with it (the "2D"
extension) because Jenga calls the model's own attention on the kept tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "s2attn"
GROUPS = 4


def _shift_half(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Roll the second half of the heads (dim 1) by `shift` positions along the sequence (dim 2)."""
    half = x.shape[1] // 2
    return torch.cat([x[:, :half], x[:, half:].roll(shift, dims=2)], dim=1)


def _grouped(x: torch.Tensor) -> torch.Tensor:
    bsz, heads, seq, dim = x.shape
    return x.view(bsz, heads, GROUPS, seq // GROUPS, dim).transpose(1, 2).reshape(bsz * GROUPS, heads, -1, dim)


def s2_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """S2-Attn in training (sequence divisible by 4, no padding mask); plain SDPA otherwise."""
    bsz, heads, seq, dim = query.shape
    if not module.training or seq % GROUPS or attention_mask is not None or key.shape[1] % 2:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    half_group = seq // GROUPS // 2
    q, k, v = (_grouped(_shift_half(t, -half_group)) for t in (query, key, value))
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1]
    )
    out = out.view(bsz, GROUPS, heads, -1, dim).transpose(1, 2).reshape(bsz, heads, seq, dim)
    return _shift_half(out, half_group).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make "s2attn" a valid `attn_implementation` (idempotent); masks are built as for SDPA."""
    AttentionInterface.register(NAME, s2_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME

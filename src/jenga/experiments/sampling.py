"""Explored design, not in the library: uniformly random kept blocks with inverse-probability gradient weights.

Under the default, the oracle keeps the blocks with the largest scores, so the attention gradient of the other
half of the queries is never seen by the optimizer: a biased estimate (docs/real-model.md). Here the kept
blocks are a uniform draw (the sink and recent blocks still forced) and the kept pass's gradient rows are
weighted by the inverse of their inclusion probability, which makes the attention gradient an unbiased estimate
of the sum over every query row; the forward stays exact (`eliminated="dense"`). Random selection also needs no
score. Used by the fidelity tool (`random` designs) and the fine-tunes (`jenga-random` methods).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import JengaConfig, apply_jenga, jenga_state, remove_jenga
from ..elimination import TokenSelection
from ..scoring import num_blocks


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `weight` (broadcast)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad * weight, None


def uniform_scorer(layer_idx, hidden_states, token_valid, block_size, query_key) -> torch.Tensor:
    """Random block scores: after the forced sink and recent blocks, a uniform draw of the other kept blocks."""
    nb = num_blocks(hidden_states.shape[1], block_size)
    return torch.rand(hidden_states.shape[0], nb, device=hidden_states.device)


@dataclass
class WeightedSelection(TokenSelection):
    """A uniform draw's selection: the kept pass's gradient rows are scaled by (free blocks) / (drawn blocks),
    the inverse of a drawn block's inclusion probability; forced blocks keep weight 1. Unpadded rows only."""

    block_size: int = 64
    sink_blocks: int = 1
    recent_blocks: int = 1

    def with_gradient_from(self, value: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nb = num_blocks(self.seq_len, self.block_size)
        blocks = self.index // self.block_size
        kept = num_blocks(self.num_kept, self.block_size)  # kept blocks; a partial tail block counts once
        forced = (blocks < self.sink_blocks) | (blocks >= nb - self.recent_blocks)
        free, drawn = nb - self.sink_blocks - self.recent_blocks, kept - self.sink_blocks - self.recent_blocks
        weight = torch.where(forced, 1.0, free / max(drawn, 1)).to(y.dtype)
        return super().with_gradient_from(value, ScaleGrad.apply(y, weight[..., None]))


def apply_sampled(model: torch.nn.Module, config: JengaConfig) -> Callable[[], None]:
    """`apply_jenga` with uniform selection and inverse-probability weights; returns the undo function."""
    if config.eliminated != "dense":
        raise ValueError("sampled selection weights the kept pass's gradient: it needs eliminated='dense'")
    apply_jenga(model, config, scorer=uniform_scorer)
    selector = jenga_state(model).selector
    choose = selector.choose

    def weighted_choose(*args, **kwargs) -> WeightedSelection:
        s = choose(*args, **kwargs)
        forced = (config.sink_blocks, config.recent_blocks)
        return WeightedSelection(s.index, s.valid, s.seq_len, config.block_size, *forced)

    selector.choose = weighted_choose
    return lambda: remove_jenga(model)

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


def systematic_scorer(config: JengaConfig) -> Callable[..., torch.Tensor]:
    """Scores that make the selection a systematic draw: of the F free blocks (neither sink nor recent) it keeps
    D at a stride of F / D from a uniform random offset, so each free block is kept with probability D / F,
    as in the uniform draw (the same weights make it unbiased), but the kept blocks are spread evenly along the
    sequence. Neighbouring blocks contribute similar gradients, so this draw's estimate varies less."""

    def scorer(layer_idx, hidden_states, token_valid, block_size, query_key) -> torch.Tensor:
        rows, nb = hidden_states.shape[0], num_blocks(hidden_states.shape[1], block_size)
        keep = config.attn_keep if isinstance(config.attn_keep, float) else config.attn_keep[layer_idx]
        free = nb - config.sink_blocks - config.recent_blocks
        drawn = config.kept_blocks(nb, keep) - config.sink_blocks - config.recent_blocks
        scores = torch.zeros(rows, nb, device=hidden_states.device)
        if drawn <= 0 or free <= 0:
            return scores
        offset = torch.rand(rows, 1, device=scores.device)
        steps = torch.arange(drawn, device=scores.device)
        chosen = ((steps + offset) * (free / drawn)).floor().long().clamp(max=free - 1) + config.sink_blocks
        return scores.scatter_(1, chosen, 1.0)

    return scorer


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


def apply_sampled(model: torch.nn.Module, config: JengaConfig, systematic: bool = False) -> Callable[[], None]:
    """`apply_jenga` with a random selection (uniform, or `systematic`) and inverse-probability weights;
    returns the undo function. Unpadded batches only (the draw counts every block as real)."""
    if config.eliminated != "dense":
        raise ValueError("sampled selection weights the kept pass's gradient: it needs eliminated='dense'")
    apply_jenga(model, config, scorer=systematic_scorer(config) if systematic else uniform_scorer)
    selector = jenga_state(model).selector
    choose = selector.choose

    def weighted_choose(*args, **kwargs) -> WeightedSelection:
        s = choose(*args, **kwargs)
        forced = (config.sink_blocks, config.recent_blocks)
        return WeightedSelection(s.index, s.valid, s.seq_len, config.block_size, *forced)

    selector.choose = weighted_choose
    return lambda: remove_jenga(model)

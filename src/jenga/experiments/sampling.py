"""Explored design, not in the library: randomly kept blocks with inverse-probability gradient weights.

Under the default, the oracle keeps the blocks with the largest scores, so the attention gradient of the other
half of the queries is never seen by the optimizer: a biased estimate (docs/real-model.md). Here the kept
blocks are a random draw (`Draw`; the sink and recent blocks still forced) and the kept pass's gradient rows are
weighted by the inverse of their inclusion probability, which makes the attention gradient an unbiased estimate
of the sum over every query row; the forward stays exact (`eliminated="dense"`). A uniform draw also needs no
score. Used by the fidelity tool (`random`, `systematic`, `pps` designs) and the fine-tunes (`jenga-random`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import JengaConfig, apply_jenga, jenga_state, remove_jenga
from ..elimination import BlockScorer, TokenSelection, oracle_scorer
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


DRAWS = ("uniform", "systematic", "pps")


def capped_probabilities(weights: torch.Tensor, total: int) -> torch.Tensor:
    """(B, F) inclusion probabilities proportional to `weights` (positive), each at most 1, summing to `total`
    per row: blocks that would exceed 1 get exactly 1 and the rest share what is left, until none exceeds."""
    p = total * weights / weights.sum(dim=1, keepdim=True)
    for _ in range(weights.shape[1]):
        fixed = p >= 1
        if not bool((p > 1).any()):
            break
        rest = torch.where(fixed, 0.0, p)
        left = total - fixed.sum(dim=1, keepdim=True)
        p = torch.where(fixed, 1.0, rest * left / rest.sum(dim=1, keepdim=True).clamp_min(1e-12))
    return p.clamp(max=1.0)


class Draw:
    """A random block selection for `apply_jenga`'s selector: scores that make it keep the drawn blocks, and
    each block's inclusion probability (forced sink and recent blocks: 1), kept per layer for the weights.

    - "uniform": D of the F free blocks uniformly, each with probability D / F;
    - "systematic": the same probabilities, the blocks evenly spread from a random offset;
    - "pps": probability proportional to the oracle score mixed half and half with uniform (capped at 1),
      drawn systematically: informative blocks are kept more often and weighted less.
    """

    def __init__(self, config: JengaConfig, kind: str = "uniform", score: BlockScorer = oracle_scorer) -> None:
        if kind not in DRAWS:
            raise ValueError(f"unknown draw {kind!r}; choose one of {DRAWS}")
        self.config, self.kind, self.score = config, kind, score
        self.inclusion: dict[int, torch.Tensor] = {}

    def __call__(self, layer_idx, hidden_states, token_valid, block_size, query_key) -> torch.Tensor:
        config = self.config
        rows, nb = hidden_states.shape[0], num_blocks(hidden_states.shape[1], block_size)
        keep = config.attn_keep if isinstance(config.attn_keep, float) else config.attn_keep[layer_idx]
        sink = config.sink_blocks
        free = nb - sink - config.recent_blocks
        drawn = config.kept_blocks(nb, keep) - sink - config.recent_blocks
        device = hidden_states.device
        inclusion = torch.ones(rows, nb, device=device)
        self.inclusion[layer_idx] = inclusion
        if drawn <= 0 or free <= 0:
            return torch.zeros(rows, nb, device=device)
        if self.kind == "uniform":
            inclusion[:, sink : sink + free] = drawn / free
            return torch.rand(rows, nb, device=device)
        weights = torch.ones(rows, free, device=device)
        if self.kind == "pps":
            oracle = self.score(layer_idx, hidden_states, token_valid, block_size, query_key)[:, sink : sink + free]
            positive = oracle.float().clamp_min(0)
            weights = 0.5 * positive / positive.sum(dim=1, keepdim=True).clamp_min(1e-12) + 0.5 / free
        p = capped_probabilities(weights, drawn)
        inclusion[:, sink : sink + free] = p
        # systematic sampling: points u, u + 1, ..., u + D - 1 on the cumulative probabilities; block j holds
        # [sum p[:j], sum p[:j+1]), at most one point since p[j] <= 1, so it is kept with probability p[j]
        points = torch.rand(rows, 1, device=device) + torch.arange(drawn, device=device)
        chosen = torch.searchsorted(p.cumsum(dim=1), points, right=True).clamp(max=free - 1)
        return torch.zeros(rows, nb, device=device).scatter_(1, chosen + sink, 1.0)


@dataclass
class WeightedSelection(TokenSelection):
    """A draw's selection: the kept pass's gradient rows are scaled by the inverse of their block's inclusion
    probability (`inclusion`, (B, blocks)); forced blocks have probability 1. Unpadded rows only."""

    block_size: int = 64
    inclusion: torch.Tensor | None = None

    def with_gradient_from(self, value: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        blocks = self.index // self.block_size
        weight = 1.0 / self.inclusion.gather(1, blocks).to(y.dtype)
        return super().with_gradient_from(value, ScaleGrad.apply(y, weight[..., None]))


def apply_sampled(model: torch.nn.Module, config: JengaConfig, draw: str = "uniform") -> Callable[[], None]:
    """`apply_jenga` with a random selection (a `Draw` of that kind) and inverse-probability weights; returns
    the undo function. Unpadded batches only (the draw counts every block as real)."""
    if config.eliminated != "dense":
        raise ValueError("sampled selection weights the kept pass's gradient: it needs eliminated='dense'")
    sampler = Draw(config, draw)
    apply_jenga(model, config, scorer=sampler)
    selector = jenga_state(model).selector
    choose = selector.choose

    def weighted_choose(layer_idx: int, *args, **kwargs) -> WeightedSelection:
        s = choose(layer_idx, *args, **kwargs)
        return WeightedSelection(s.index, s.valid, s.seq_len, config.block_size, sampler.inclusion[layer_idx])

    selector.choose = weighted_choose
    return lambda: remove_jenga(model)

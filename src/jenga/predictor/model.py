"""Per-layer block predictors: small two-tower networks that guess oracle block scores from hidden states.

A layer's input hidden states are mean-pooled per block of `block_size` tokens and normalized. A query
tower and a key tower (ReLU MLPs, shared across heads because the oracle sums heads) embed each block; the
causal tile score is softplus(query_i · key_j) and a key block's score is its column sum, which is what the
oracle ranks by. Softplus rather than ReLU: pooled blocks look alike at initialization, so their dot
products share a sign and a ReLU would start (and stay) at zero with no gradient.
Costs O(nb² · out_dim) instead of the oracle's O(S² · H · head_dim) plus two full projections.

Elastic size: each tower's hidden units count how often they are active during training; `prune()` drops
units that almost never fire (rows of the first linear, columns of the second), so every layer ends with
its own size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..elimination import block_validity


class Tower(nn.Module):
    """Linear → ReLU → Linear whose hidden units can be pruned; records unit activity while training."""

    def __init__(self, in_dim: int, units: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, units)
        self.fc2 = nn.Linear(units, out_dim)
        self.register_buffer("active_count", torch.zeros(units), persistent=False)
        self.register_buffer("seen", torch.zeros(()), persistent=False)

    @property
    def units(self) -> int:
        return self.fc1.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.fc1(x))
        if self.training:
            with torch.no_grad():
                self.active_count += (hidden > 0).flatten(0, -2).sum(0).to(self.active_count.dtype)
                self.seen += hidden.shape[:-1].numel()
        return self.fc2(hidden)

    def activity(self) -> torch.Tensor:
        """Fraction of inputs on which each unit was active since the last reset (zeros if none seen)."""
        return self.active_count / self.seen.clamp_min(1)

    def prune(self, threshold: float, min_units: int = 1) -> int:
        """Drop units active on less than `threshold` of inputs (keeping at least `min_units`); returns the count.

        Outputs are unchanged for inputs on which the dropped units were inactive, which is the point: they
        contributed nothing there.
        """
        activity = self.activity()
        keep = activity >= threshold
        if int(keep.sum()) < min_units:
            keep = torch.zeros_like(keep)
            keep[activity.topk(min_units).indices] = True
        dropped = self.units - int(keep.sum())
        if dropped:
            index = keep.nonzero().squeeze(1)
            fc1, fc2 = nn.Linear(self.fc1.in_features, len(index)), nn.Linear(len(index), self.fc2.out_features)
            with torch.no_grad():
                fc1.weight.copy_(self.fc1.weight[index])
                fc1.bias.copy_(self.fc1.bias[index])
                fc2.weight.copy_(self.fc2.weight[:, index])
                fc2.bias.copy_(self.fc2.bias)
            self.fc1, self.fc2 = fc1.to(self.fc1.weight), fc2.to(self.fc2.weight)
            self.active_count = self.active_count[index]
        self.reset_activity()
        return dropped

    def reset_activity(self) -> None:
        self.active_count.zero_()
        self.seen.zero_()


def pool_blocks(hidden: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S, D) → (B, nb, D) mean over each block's valid tokens (padding excluded; empty blocks are 0)."""
    bsz, seq, dim = hidden.shape
    nb = math.ceil(seq / block_size)
    weights = hidden.new_ones(bsz, seq) if valid is None else valid.to(hidden.dtype)
    pad = nb * block_size - seq
    summed = F.pad(hidden * weights[..., None], (0, 0, 0, pad)).view(bsz, nb, block_size, dim).sum(2)
    counts = F.pad(weights, (0, pad)).view(bsz, nb, block_size).sum(2, keepdim=True)
    return summed / counts.clamp_min(1)


class BlockPredictor(nn.Module):
    """Predicts one layer's block-to-block scores from its input hidden states."""

    def __init__(self, hidden_size: int, units: int = 256, out_dim: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.query = Tower(hidden_size, units, out_dim)
        self.key = Tower(hidden_size, units, out_dim)

    def pooled_tile_scores(self, pooled: torch.Tensor, block_valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, nb, nb) causal tile scores from pooled blocks; tiles above the diagonal and padding blocks are 0."""
        pooled = self.norm(pooled)
        tiles = F.softplus(self.query(pooled) @ self.key(pooled).transpose(1, 2))
        nb = tiles.shape[1]
        allowed = torch.ones(nb, nb, dtype=torch.bool, device=tiles.device).tril()
        if block_valid is not None:
            allowed = allowed & block_valid[:, :, None] & block_valid[:, None, :]
        return tiles.masked_fill(~allowed, 0.0)

    def tile_scores(self, hidden: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, nb, nb) causal tile scores of a layer's input hidden states (B, S, D)."""
        pooled = pool_blocks(hidden.to(self.query.fc1.weight.dtype), block_size, valid)
        return self.pooled_tile_scores(pooled, None if valid is None else block_validity(valid, block_size))

    def block_scores(self, hidden: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, nb) predicted informativeness of each key block (column sums of the tiles)."""
        return self.tile_scores(hidden, block_size, valid).sum(dim=1)

    def sizes(self) -> dict[str, int]:
        return {"query_units": self.query.units, "key_units": self.key.units}

    def prune(self, threshold: float) -> int:
        return self.query.prune(threshold) + self.key.prune(threshold)

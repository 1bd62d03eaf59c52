"""A prototype of Jenga under Ulysses sequence parallelism (DeepSpeed's scheme), on any process group.

Each rank holds one contiguous shard of the sequence. The attention runs as the registered implementation
"ulysses": the shard's q, k and v go all-to-all so that each rank holds the whole sequence for 1/P of the heads,
SDPA runs causally there, and the output goes back. Everything else Jenga's default patches acts per token (the
sparse-saved MLP, the float8 saves of norms and LoRA inputs, the segmented loss), so it runs on the shard as it
would on the whole sequence; the loss of a shard is its tokens' summed loss over the sequence's supervised-token
count, and the ranks' LoRA gradients sum to the one-process gradient.

Elimination (keep below 1, `select_per_shard`): the oracle scores every key block from the whole sequence (each
rank scores its own query blocks against the keys before its shard's end, then one all-reduce sums the maps);
each rank keeps the same number of its own blocks (Ulysses exchanges equal lengths), the sequence's sink and
recent blocks forced on the ranks that hold them; the kept pass replays the dense pass's softmax statistics,
which the attention holds for the whole sequence, at every rank's kept positions (an all-gather of indices).
`docs/multi-gpu.md` says what crosses ranks.

Checked on the CPU with gloo ranks (`tests/test_distributed.py`); no padding and no sliding window (the attention
is causal over the whole sequence), oracle scoring only (learned predictors would need their pooled block
embeddings gathered), one process group per process, and the heads and key/value heads must divide by the
group's size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from ..autocast import compute_dtype
from ..elimination import Selector, TokenSelection, oracle_scorer, select_blocks
from ..kernels import block_scores
from ..patching import jenga_state

ULYSSES = "ulysses"
_GROUP: list[dist.ProcessGroup | None] = [None]


def _exchange(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """all-to-all of (P, ...) along dim 0, with autograd: part p goes to rank p, rank p's part r comes back."""
    x = x.contiguous()  # before `empty_like`, which would copy a permuted layout the exchange does not write
    return dist_fn.all_to_all_single(torch.empty_like(x), x, group=group)


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B, H, s, D) of this rank's shard -> (B, H/P, P*s, D): the whole sequence (shards in rank order) for this
    rank's heads."""
    size = dist.get_world_size(group)
    b, h, s, d = x.shape
    parts = _exchange(x.reshape(b, size, h // size, s, d).transpose(0, 1), group)  # (P shards, B, H/P, s, D)
    return parts.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * s, d)


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B, H/P, P*s, D) of this rank's heads -> (B, H, s, D) of this rank's shard (the inverse exchange)."""
    size = dist.get_world_size(group)
    b, h, n, d = x.shape
    parts = _exchange(x.reshape(b, h, size, n // size, d).permute(2, 0, 1, 3, 4), group)  # (P head groups, ...)
    return parts.transpose(0, 1).reshape(b, h * size, n // size, d)


def ulysses_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: causal SDPA over the whole sequence for this rank's heads."""
    group = _GROUP[0]
    q, k, v = (sequence_to_heads(t, group) for t in (query, key, value))
    out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)
    out = heads_to_sequence(out.transpose(1, 2), group)  # sdpa returns (B, S, H/P, D)
    return out.transpose(1, 2).contiguous(), None


def use_ulysses(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Register the "ulysses" attention (masks built as for SDPA, which Jenga accepts) on `group` and switch
    `model` to it; call before `apply_jenga`."""
    config = model.config
    size = dist.get_world_size(group)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    if heads % size or kv_heads % size:
        raise ValueError(f"Ulysses splits heads over the group: {heads} and {kv_heads} kv heads by {size} ranks")
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) is not None or "sliding_attention" in layer_types:
        raise ValueError(
            "the Ulysses prototype attends causally over the whole sequence: a sliding-window model "
            f"(sliding_window={getattr(config, 'sliding_window', None)}) is not supported"
        )
    _GROUP[0] = group
    AttentionInterface.register(ULYSSES, ulysses_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ULYSSES, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(ULYSSES)


def shard_batch(ids: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup | None = None) -> dict:
    """This rank's model inputs for whole sequences `ids` / `labels` (B, S): its shard of the ids, the global
    positions, the labels shifted over the whole sequence (the shard's last token predicts the next shard's
    first), and the supervised-token count of the whole batch, which normalizes each shard's summed loss."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    seq = ids.shape[1]
    if seq % size:
        raise ValueError(f"the sequence ({seq} tokens) must split evenly over {size} ranks")
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    shard = slice(rank * seq // size, (rank + 1) * seq // size)
    positions = torch.arange(seq, device=ids.device)[shard].expand(ids.shape[0], -1)
    return {
        "input_ids": ids[:, shard],
        "labels": labels[:, shard],
        "shift_labels": shifted[:, shard],
        "position_ids": positions,
        "num_items_in_batch": (shifted != -100).sum(),
    }


def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The ranks' `x` concatenated along `dim` in rank order (no autograd: selection runs without it)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def shard_scorer(group: dist.ProcessGroup | None = None):
    """The oracle block score of the whole sequence from each rank's shard: this rank's query blocks against the
    keys up to its shard's end, tile maxima summed into a (B, blocks of the whole sequence) map, summed over ranks.
    Exact: a tile's queries lie on one rank when the shard length is a multiple of the block size, and the sum
    over heads inside a tile's maximum needs every head of those queries, which the shard holds."""

    def score(layer_idx, hidden, token_valid, block_size, query_key) -> torch.Tensor:
        if token_valid is not None:
            raise ValueError("the sequence-parallel prototype takes no padding: pack or trim the sequences")
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        q, k, scale = query_key()
        q, k = q.to(compute_dtype(q)), k.to(compute_dtype(k))  # as the score runs (fp32 from the rotary under autocast)
        shard = q.shape[2]
        if shard % block_size:
            raise ValueError(f"a shard of {shard} tokens is not a whole number of {block_size}-token blocks")
        keys = _all_gather(k, 2, group)[:, :, : (rank + 1) * shard]
        # zero queries before this shard: their tiles are all 0 (ReLU), so the sum over query blocks is this rank's
        # (and rank r computes (r + 1)^2 / 2 shards^2 of tiles, the last rank the whole sequence's: the oracle has no
        # query offset)
        queries = F.pad(q, (0, 0, rank * shard, 0))
        scores = F.pad(block_scores(queries, keys, block_size, scale), (0, (size - rank - 1) * shard // block_size))
        dist.all_reduce(scores, group=group)
        return scores

    return score


def shard_blocks(
    scores: torch.Tensor, rank: int, size: int, keep_blocks: int, sink_blocks: int, recent_blocks: int
) -> torch.Tensor:
    """This shard's `keep_blocks` kept blocks (B, keep_blocks), as indices within the shard: ranked by the whole
    sequence's `scores` (B, blocks), with its first `sink_blocks` and last `recent_blocks` forced on the ranks
    that hold them. Every shard keeps `keep_blocks` (`JengaConfig.kept_blocks` of its own blocks, at least
    sink + recent), so with more than two ranks the middle ones may keep more than the ratio where it is small."""
    per_shard = scores.shape[1] // size
    ranked = scores.float().clone()
    ranked[:, :sink_blocks] = float("inf")
    if recent_blocks:
        ranked[:, -recent_blocks:] = float("inf")
    return select_blocks(ranked[:, rank * per_shard : (rank + 1) * per_shard], keep_blocks)


class ShardSelector(Selector):
    """Per-shard selection from whole-sequence scores (`shard_blocks`), and the kept rows of every rank for the
    attention's statistics, which Ulysses holds in the order of the whole sequence."""

    def __init__(self, config, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(config, shard_scorer(group))
        self.group = group

    def select(self, scores, keep_blocks, seq_len, token_valid) -> TokenSelection:
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        config = self.config
        blocks = shard_blocks(scores, rank, size, keep_blocks, config.sink_blocks, config.recent_blocks)
        return TokenSelection.from_blocks(blocks, config.block_size, seq_len)

    def attention_selection(self, selection: TokenSelection) -> TokenSelection:
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        index = _all_gather(selection.index + rank * selection.seq_len, 1, self.group)
        return TokenSelection(index, None, selection.seq_len * size)


def select_per_shard(model: nn.Module) -> None:
    """Make a Jenga-patched model under `use_ulysses` select per shard from whole-sequence oracle scores on the
    group `use_ulysses` registered (`ShardSelector`); call after `apply_jenga`."""
    state = jenga_state(model)
    if state is None:
        raise ValueError("select_per_shard needs a model patched by apply_jenga")
    if getattr(state.owner.config, "_attn_implementation", None) != ULYSSES:
        raise ValueError("select_per_shard needs the Ulysses attention: call use_ulysses(model) before apply_jenga")
    if state.selector.scorer is not oracle_scorer:
        raise ValueError(
            "the sequence-parallel prototype scores with the oracle only: apply_jenga without scorer= or predictor="
        )
    if state.config.shared_selection:
        raise ValueError("the sequence-parallel prototype does not share one selection across layers")
    state.selector = ShardSelector(state.config, _GROUP[0])

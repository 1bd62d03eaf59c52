"""Where tokens are chosen, and how tensors move to and from the kept subset.

- `BlockScorer` is what ranks blocks: `oracle_scorer` (the layer's own q·k, `jenga.scoring` / its Triton
  kernel) or a learned predictor (`jenga.predictor`).
- `select_blocks` / `select_tokens` keep each sequence's best blocks plus the forced sink and recent blocks;
  padding never counts.
- `Selector.choose` is the per-layer entry point: it scores and selects, reuses the forward's selection in
  the backward-time recompute of a checkpointed layer, and shares one selection across layers with
  `shared_selection`.
- `TokenSelection` gathers kept rows and scatters them back.

A layer keeps whole blocks of ``block_size`` tokens, chosen per sequence, in original order, so causal
masking over the kept subset is causal masking by original position. What eliminated blocks get from the
attention sublayer is decided in `jenga.patching.base.patch_attention` (`JengaConfig.eliminated`).
All shapes follow Hugging Face: hidden (B, S, D), masks (B, 1, S, S) or (B, S).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .config import JengaConfig
from .kernels import block_scores
from .messages import warn_once
from .scoring import num_blocks


def key_validity(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """(B, S) bool, False for keys no query may see (padding), from a layer's mask; None when all valid.

    Works for causal and sliding-window masks: a valid key is seen at least by its own query row.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        valid = attention_mask.bool()
    elif attention_mask.dim() == 4:
        allowed = (
            attention_mask
            if attention_mask.dtype == torch.bool
            else attention_mask > torch.finfo(attention_mask.dtype).min / 2
        )
        valid = allowed[:, 0, :, -seq_len:].any(dim=1)
    else:
        raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} is neither (B, S) nor (B, 1, S, S)")
    return None if bool(valid.all()) else valid


def select_blocks(
    scores: torch.Tensor,
    keep: int,
    sink_blocks: int = 0,
    block_valid: torch.Tensor | None = None,
    recent_blocks: int = 0,
) -> torch.Tensor:
    """Indices (B, keep) of the `keep` best blocks per sequence, ascending.

    The first `sink_blocks` and the last `recent_blocks` real (non-padding) blocks are always kept; blocks that
    hold only padding (``block_valid`` False) rank last.
    """
    ranked = scores.float().clone()
    valid = torch.ones_like(ranked, dtype=torch.bool) if block_valid is None else block_valid
    forced = valid & (valid.cumsum(1) <= sink_blocks)  # the first real blocks (not left padding) are the sinks
    if recent_blocks:
        forced |= valid & (valid.flip(1).cumsum(1).flip(1) <= recent_blocks)
    ranked = ranked.masked_fill(~valid, float("-inf")).masked_fill(forced, float("inf"))
    return ranked.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values


class _RowGather(torch.autograd.Function):
    """Rows `rows` of a 2D tensor; the backward copies gradient rows back to `grad_rows` (unique, plus spares).

    Kept rows are distinct, so the backward is a plain row copy into zeros rather than `index_select`'s
    `index_add_` (atomic adds on the GPU). Repeated rows (clamped tail positions) carry their own
    `grad_rows` entry pointing past the end, into a spare row that is dropped.
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, rows: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad_rows)
        ctx.source_rows = source.shape[0]
        return source.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad_rows,) = ctx.saved_tensors
        full = grad.new_zeros(ctx.source_rows + 1, *grad.shape[1:]).index_copy_(0, grad_rows, grad)
        return full[: ctx.source_rows], None, None


class _RowScatter(torch.autograd.Function):
    """A zero tensor of `rows_out` rows with `source` copied into rows `rows`; the backward gathers those rows.

    Unlike `index_copy`, whose autograd saves the source tensor, only the index is kept for backward.
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, rows: torch.Tensor, rows_out: int) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return source.new_zeros(rows_out, *source.shape[1:]).index_copy_(0, rows, source)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rows,) = ctx.saved_tensors
        return grad.index_select(0, rows), None, None


class _RowGradient(torch.autograd.Function):
    """Returns `value` unchanged; its gradient rows `rows` (zeroed where `valid` is False) flow to `source`.

    The dense treatment of eliminated tokens takes its values from a pass without autograd and its gradient
    from the kept pass; this joins them without materializing a scattered copy or a sum of full tensors.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, source: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor | None):
        ctx.save_for_backward(rows, valid)
        ctx.source_shape = source.shape
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:
        rows, valid = ctx.saved_tensors
        out = grad.reshape(-1, grad.shape[-1]).index_select(0, rows).view(ctx.source_shape)
        return None, out if valid is None else out * valid[..., None], None, None


@dataclass
class TokenSelection:
    """The kept token positions of a batch, and how to move tensors between full and kept layouts.

    index: (B, L) original positions (clamped into range); valid: (B, L) bool, True for real positions and False
    for those of a kept partial block that lie past the sequence end, or None when every kept position is real.
    """

    index: torch.Tensor
    valid: torch.Tensor | None
    seq_len: int

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, block_size: int, seq_len: int) -> TokenSelection:
        offsets = torch.arange(block_size, device=blocks.device)
        index = (blocks[:, :, None] * block_size + offsets).flatten(1)
        if seq_len % block_size == 0:  # no partial block: skip the checks below (they sync with the GPU)
            return cls(index, None, seq_len)
        valid = index < seq_len
        overflow = (~valid).sum(dim=1)
        if bool((overflow == overflow[0]).all()):
            # Only the last block can be partial and it sorts last, so equal overflow means equal tails.
            width = index.shape[1] - int(overflow[0])
            return cls(index[:, :width].contiguous(), None, seq_len)
        return cls(index.clamp(max=seq_len - 1), valid, seq_len)

    @property
    def num_kept(self) -> int:
        return self.index.shape[1]

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Kept rows of `x` along `dim` (the sequence axis); broadcasts a batch dim of 1.

        Moves whole rows (`_RowGather`): the backward writes each gradient row once instead of adding into a
        zero tensor, and saves only the index, whereas `torch.gather` saves its whole input.
        """
        bsz, kept = self.index.shape
        moved = x.movedim(dim, 1)
        rest = moved.shape[2:]
        if moved.shape[0] == 1 and bsz > 1:  # shared rows (e.g. rotary tables): index_select sums their grads
            out = moved[0].index_select(0, self.index.reshape(-1))
            return out.view(bsz, kept, *rest).movedim(1, dim)
        offsets = torch.arange(bsz, device=self.index.device)[:, None] * moved.shape[1]
        rows, source_rows = (self.index + offsets).reshape(-1), bsz * moved.shape[1]
        # Clamped positions past the sequence end repeat a real row; their gradient goes to a spare row instead.
        grad_rows = rows if self.valid is None else rows.masked_fill(~self.valid.reshape(-1), source_rows)
        out = _RowGather.apply(moved.reshape(source_rows, -1), rows, grad_rows)
        return out.view(bsz, kept, *rest).movedim(1, dim)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """(B, L, D) kept-layout output → (B, S, D) with zeros at eliminated positions.

        One row copy per kept token (`_RowScatter`, whose backward is a row gather). Positions past the
        sequence end go to a spare row per sequence that is dropped, so they never overwrite data.
        """
        bsz, kept, width = y.shape
        index = self.index if self.valid is None else self.index.masked_fill(~self.valid, self.seq_len)
        rows = (index + torch.arange(bsz, device=index.device)[:, None] * (self.seq_len + 1)).reshape(-1)
        out = _RowScatter.apply(y.reshape(bsz * kept, width), rows, bsz * (self.seq_len + 1))
        return out.view(bsz, self.seq_len + 1, width)[:, : self.seq_len]

    def with_gradient_from(self, value: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, S, D) `value` unchanged, with the gradient of its kept rows routed to the kept-layout `y` (B, L, D)."""
        bsz = y.shape[0]
        rows = (self.index + torch.arange(bsz, device=y.device)[:, None] * self.seq_len).reshape(-1)
        return _RowGradient.apply(value, y, rows, self.valid)

    def gather_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The layer's mask restricted to kept queries and keys, with out-of-range keys masked."""
        if attention_mask is None and self.valid is None:
            return None
        if attention_mask is None:
            causal = torch.ones(self.num_kept, self.num_kept, dtype=torch.bool, device=self.index.device).tril()
            return causal[None, None] & self.valid[:, None, None, :]
        if attention_mask.dim() == 2:
            mask = self.gather(attention_mask, dim=1)
            return mask if self.valid is None else mask * self.valid.to(mask.dtype)
        rows = self.gather(attention_mask[:, :, :, -self.seq_len :], dim=2)
        mask = self.gather(rows, dim=3)
        if self.valid is None:
            return mask
        key_ok = self.valid[:, None, None, :]
        if mask.dtype == torch.bool:
            return mask & key_ok
        return mask.masked_fill(~key_ok, torch.finfo(mask.dtype).min)


def block_validity(token_valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, nb) bool: True for blocks holding at least one valid (non-padding) token."""
    nb = num_blocks(token_valid.shape[1], block_size)
    padded = torch.nn.functional.pad(token_valid, (0, nb * block_size - token_valid.shape[1]))
    return padded.view(-1, nb, block_size).any(dim=2)


def select_tokens(
    scores: torch.Tensor,
    keep_blocks: int,
    block_size: int,
    seq_len: int,
    sink_blocks: int,
    token_valid: torch.Tensor | None,
    recent_blocks: int = 0,
) -> TokenSelection:
    """Turn block scores (B, nb) into the kept token positions of each sequence."""
    block_valid = None if token_valid is None else block_validity(token_valid, block_size)
    blocks = select_blocks(scores, keep_blocks, sink_blocks, block_valid, recent_blocks)
    return TokenSelection.from_blocks(blocks, block_size, seq_len)


QueryKey = Callable[[], tuple[torch.Tensor, torch.Tensor, float]]


class BlockScorer(Protocol):
    """Scores key blocks of one layer's input: (B, nb) higher = more informative.

    `query_key` computes the layer's rotated q (B, H, S, d), k (B, Hkv, S, d) and softmax scale on demand;
    the oracle uses it, a learned predictor can ignore it and read `hidden_states` instead.
    """

    def __call__(
        self,
        layer_idx: int,
        hidden_states: torch.Tensor,
        token_valid: torch.Tensor | None,
        block_size: int,
        query_key: QueryKey,
    ) -> torch.Tensor: ...


def oracle_scorer(
    layer_idx: int,
    hidden_states: torch.Tensor,
    token_valid: torch.Tensor | None,
    block_size: int,
    query_key: QueryKey,
) -> torch.Tensor:
    """The exact score of `jenga.scoring.block_scores` from the layer's own q and k (Triton on CUDA)."""
    q, k, scale = query_key()
    return block_scores(q, k, block_size, scale, token_valid)


# Forwards whose selections may wait for their recompute (e.g. several micro-batches before one backward).
MAX_PENDING = 16


def _in_backward() -> bool:
    """True while autograd runs a backward pass, which is where checkpointed layers recompute their forward."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class Selector:
    """A patched model's block selection: the config, the scorer, and what selection remembers within a step.

    pending: (fingerprint of the layer's input, selection) of checkpointed layers, made in forward and reused
        by the backward-time recompute.
    shared: (layer, (seq_len, batch, kept blocks), selection) of the first scoring layer, for `shared_selection`.
    """

    config: JengaConfig
    scorer: BlockScorer
    pending: dict[int, deque] = field(default_factory=dict)
    shared: tuple[int, tuple[int, int, int], TokenSelection] | None = None

    def choose(
        self,
        layer_idx: int,
        layer: torch.nn.Module,
        keep_blocks: int,
        hidden: torch.Tensor,
        token_valid: torch.Tensor | None,
        query_key: QueryKey,
    ) -> TokenSelection:
        """Score and select this layer's kept tokens, or reuse the selection a checkpointed forward made (or, with
        `shared_selection`, the one an earlier sparse layer made in this forward).

        Under gradient checkpointing the layer's forward runs again in backward; reusing the first forward's
        selection halves the scoring cost and guarantees the recompute sees the same blocks. The recompute takes
        the selection whose forward saw the same input (a sum of it): backward need not follow the forwards'
        order (two micro-batches' losses summed, a forward whose loss was never backpropagated); where no sum
        matches (a recompute that rounds differently) the oldest selection of the same shape. Reentrant
        checkpointing runs the first forward under no_grad, so grad mode cannot tell the two passes apart;
        being inside a backward pass can.
        """
        config = self.config
        seq_len = hidden.shape[1]
        checkpointed = getattr(layer, "gradient_checkpointing", False)
        pending = self.pending.setdefault(layer_idx, deque())
        recompute = checkpointed and _in_backward()
        fingerprint = hidden.detach().sum(dim=(-2, -1), dtype=torch.float32) if checkpointed else None
        if recompute:
            shape_of = (seq_len, hidden.shape[0])
            fits = [i for i, (_, s) in enumerate(pending) if (s.seq_len, s.index.shape[0]) == shape_of]
            # outside any dispatch mode: selective checkpointing (`save_attention`) allows in the recompute only
            # the ops its forward ran, and the forward compared nothing
            with _disable_current_modes():
                same = [i for i in fits if torch.equal(pending[i][0], fingerprint)]
            if same or fits:
                index = (same or fits)[0]
                selection = pending[index][1]
                del pending[index]
                return selection
        shape = (seq_len, hidden.shape[0], keep_blocks)
        shared = self.shared
        earlier = shared is not None and shared[0] < layer_idx  # stored by an earlier layer of this forward
        if config.shared_selection and earlier and shared[1] == shape:
            selection = shared[2]
        else:
            with torch.no_grad():
                scores = self.scorer(layer_idx, hidden, token_valid, config.block_size, query_key)
                selection = self.select(scores, keep_blocks, seq_len, token_valid)
            if config.shared_selection and not earlier:  # only the first scoring layer of a forward shares
                self.shared = (layer_idx, shape, selection)
        if checkpointed and not recompute:
            pending.append((fingerprint, selection))
            if len(pending) > MAX_PENDING:
                pending.popleft()
                warn_once("pending", "Jenga: checkpointed forwards without a backward; dropping their selections")
        return selection

    def select(
        self, scores: torch.Tensor, keep_blocks: int, seq_len: int, token_valid: torch.Tensor | None
    ) -> TokenSelection:
        """The kept tokens of a layer whose key blocks scored `scores`: each sequence's `keep_blocks` best blocks,
        the config's sink and recent blocks forced. A sequence split over ranks selects per shard instead
        (`jenga.experiments.sequence_parallel`)."""
        config = self.config
        return select_tokens(
            scores, keep_blocks, config.block_size, seq_len, config.sink_blocks, token_valid, config.recent_blocks
        )

    def attention_selection(self, selection: TokenSelection) -> TokenSelection:
        """`selection` in the rows of the layer's attention call, whose softmax statistics the kept pass replays
        (`jenga.attention`): the layer's own rows, except where the attention sees more of the sequence than the
        layer holds (a sequence-parallel attention: `jenga.experiments.sequence_parallel`)."""
        return selection

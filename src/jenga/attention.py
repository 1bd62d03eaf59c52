"""One attention call per sparse layer: the dense pass's fused kernel keeps its softmax statistics, and the kept
pass's backward reads them instead of attending again.

With `eliminated="dense"` a sparse layer first runs densely without autograd, so every token gets its exact
output. `recording()` runs that pass's `scaled_dot_product_attention` through the fused kernel PyTorch would
pick (`Kernel`), which also returns each query's log-sum-exp over every key. `replaying(stats)` then answers
the kept pass's attention call with no attention forward at all: its output is the dense output's kept rows,
and its backward is a fused kernel's backward over kept queries and kept keys fed the dense statistics
(`Kernel.for_kept`).
So each (kept query, kept key) pair gets the gradient the dense attention gives it; pairs with an eliminated
token carry none (`reference`: dense attention with those pairs' logits detached). Attention work per sparse
layer: one dense forward plus a backward over the kept area, where the kept pass used to attend forward again.

Calls this cannot serve (eager attention, attention dropout, a sequence regrouped by the attention as LongLoRA
does, a device without such a kernel) keep the kept pass's own attention over the kept subset, with a warning.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .messages import warn_once

_ops = torch.ops.aten
# Memory-efficient attention reads its bias in rows aligned to 16 elements and pads its statistics to 32 rows.
_BIAS_ALIGN, _LSE_ALIGN = 16, 32


@dataclass
class _Call:
    """One `scaled_dot_product_attention` call's arguments."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool
    scale: float
    dropout: float

    @classmethod
    def parse(
        cls,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> _Call:
        if query.shape[-3] != key.shape[-3] and not enable_gqa:
            raise RuntimeError("scaled_dot_product_attention: query and key heads differ without enable_gqa")
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        device = query.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):  # cast as SDPA would be
            dtype = torch.get_autocast_dtype(device)
            query, key, value = (t.to(dtype) for t in (query, key, value))
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(dtype)
        return cls(query, key, value, attn_mask, is_causal, scale, dropout_p)

    def plain(self) -> torch.Tensor:
        """The call as SDPA runs it, for the calls this module does not serve."""
        gqa = self.q.shape[1] != self.k.shape[1]
        return F.scaled_dot_product_attention(
            self.q, self.k, self.v, self.mask, self.dropout, self.is_causal, scale=self.scale, enable_gqa=gqa
        )


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: attend) as the additive bias the kernels take; float masks pass unchanged."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _sum_heads(grad: torch.Tensor, heads: int) -> torch.Tensor:
    bsz, expanded, seq, dim = grad.shape
    return grad if expanded == heads else grad.view(bsz, heads, expanded // heads, seq, dim).sum(2)


# `torch._fused_sdp_choice`'s answers (`torch.nn.attention.SDPBackend`) that name a kernel returning statistics.
_CHOICES = {1: "flash", 2: "efficient", 3: "cudnn"}


def _cuda_choice(call: _Call, choose=torch._fused_sdp_choice) -> int:
    """SDPA's pick for a CUDA call. A grouped-query call with a mask or fp32 inputs gets SDPA's math path on the
    H200 (torch 2.11: its memory-efficient kernel takes no groups), while that kernel, which `Kernel` always
    feeds repeated key and value heads, serves the call: the pick is asked again with the heads repeated."""
    q, k = call.q, call.k
    gqa = q.shape[1] != k.shape[1]
    choice = choose(q, k, call.v, call.mask, 0.0, call.is_causal, scale=call.scale, enable_gqa=gqa)
    if choice in _CHOICES or not gqa:
        return choice
    repeated = k.new_empty(k.shape[0], q.shape[1], *k.shape[2:])  # the shape and dtype the pick reads
    return choose(q, repeated, repeated, call.mask, 0.0, call.is_causal, scale=call.scale)


class Kernel:
    """The fused kernel of one call, forward with statistics and backward from them: for the dense pass on CUDA the
    one SDPA would pick (flash, memory-efficient or cuDNN; a masked call that SDPA would give cuDNN goes to the
    memory-efficient kernel, whose bias handling is PyTorch's own), on the CPU its flash kernel. `name` forces one
    (the GPU checks). The kept pass's backward picks its own (`for_kept`): its call requires gradients, which can
    change SDPA's choice."""

    def __init__(self, call: _Call, name: str | None = None) -> None:
        q, device = call.q, call.q.device.type
        if name is not None:
            self.name = name
        elif device == "cpu":
            self.name = "cpu"
        elif device == "meta":  # a stand-in for CUDA's choice, to check the calls' arguments without a GPU
            self.name = "flash" if call.mask is None and q.dtype in (torch.float16, torch.bfloat16) else "efficient"
        elif device == "cuda":
            choice = _cuda_choice(call)
            if choice not in _CHOICES:
                raise NotImplementedError(f"SDPA has no fused kernel for this call (it would pick {choice})")
            self.name = "efficient" if choice == 3 and call.mask is not None else _CHOICES[choice]
        else:
            raise NotImplementedError(f"no fused attention kernel with statistics on {device}")

    @classmethod
    def for_kept(cls, call: _Call, dense: str, name: str | None = None) -> Kernel:
        """The kept pass's kernel: `name` if given; on CUDA, the one SDPA would pick to train this call with its heads
        expanded (the backward expands grouped heads, so every kernel takes it); else the dense pass's. A masked
        call (a partial last block) goes to the memory-efficient kernel where the pick cannot take a mask."""
        if name is None and call.q.device.type == "cuda":
            probe = call.q.detach().requires_grad_(True)  # the shape, dtype and strides of the expanded k and v too
            with torch.enable_grad():
                choice = torch._fused_sdp_choice(probe, probe, probe, call.mask, 0.0, call.is_causal, scale=call.scale)
            name = _CHOICES.get(choice)
        name = name or dense
        return cls(call, "efficient" if call.mask is not None and name in ("flash", "cudnn") else name)

    def _bias(self, call: _Call) -> torch.Tensor | None:
        bias = _additive(call.mask, call.q.dtype)
        if bias is None or self.name != "efficient":
            return bias
        keys = bias.shape[-1]
        if bias.stride(-1) != 1 or keys % _BIAS_ALIGN or bias.stride(-2) % _BIAS_ALIGN:
            # the kernel reads rows aligned to 16 elements, densely: a padded copy whose view keeps the width
            aligned = bias.new_zeros(*bias.shape[:-1], -(-keys // _BIAS_ALIGN) * _BIAS_ALIGN)
            bias = aligned[..., :keys].copy_(bias)
        return bias.expand(call.q.shape[0], call.q.shape[1], call.q.shape[2], keys)

    def forward(self, call: _Call) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, log-sum-exp (B, H, Sq) fp32) of the call."""
        q, k, v, seq = call.q, call.k, call.v, call.q.shape[2]
        if self.name == "cpu":
            return _ops._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, call.is_causal, attn_mask=self._bias(call), scale=call.scale
            )
        if self.name == "flash":
            out, lse, *_ = _ops._scaled_dot_product_flash_attention(q, k, v, 0.0, call.is_causal, scale=call.scale)
            return out, lse
        if self.name == "cudnn":
            out, lse, *_ = _ops._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, call.is_causal, False, scale=call.scale
            )
            return out, lse.squeeze(-1)  # (B, H, S, 1) there
        k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
        out, lse, *_ = _ops._scaled_dot_product_efficient_attention(
            q, k, v, self._bias(call), True, 0.0, call.is_causal, scale=call.scale
        )
        return out, lse[..., :seq]

    def backward(
        self, grad: torch.Tensor, call: _Call, out: torch.Tensor, lse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of q, k and v over the call's pairs, with the softmax statistics `lse` (not recomputed)."""
        q, k, v, seq = call.q, call.k, call.v, call.q.shape[2]
        if grad.stride() != out.stride():  # the kernels read both with one layout (cuDNN requires it)
            grad = torch.empty_like(out).copy_(grad)
        if self.name == "cpu":
            return _ops._scaled_dot_product_flash_attention_for_cpu_backward(
                grad, q, k, v, out, lse, 0.0, call.is_causal, attn_mask=self._bias(call), scale=call.scale
            )
        heads = k.shape[1]
        k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])  # grouped heads, summed below
        if self.name == "flash":
            # No sequence offsets (not variable-length); the dropout RNG's seed and offset, unread at p = 0.
            seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
            offset = torch.zeros((), dtype=torch.uint64, device=q.device)
            dq, dk, dv = _ops._scaled_dot_product_flash_attention_backward(
                grad, q, k, v, out, lse, None, None, seq, k.shape[2], 0.0, call.is_causal, seed, offset,
                scale=call.scale,
            )  # fmt: skip
            return dq, _sum_heads(dk, heads), _sum_heads(dv, heads)
        if self.name == "cudnn":
            state = torch.zeros((), dtype=torch.int64, device=q.device)  # the dropout RNG's, unread at p = 0
            dq, dk, dv = _ops._scaled_dot_product_cudnn_attention_backward(
                grad, q, k, v, out, lse.unsqueeze(-1), state, state, None, None, None, seq, k.shape[2], 0.0,
                call.is_causal, scale=call.scale,
            )  # fmt: skip
            return dq, _sum_heads(dk, heads), _sum_heads(dv, heads)
        padded = F.pad(lse, (0, -seq % _LSE_ALIGN))
        state = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = _ops._scaled_dot_product_efficient_attention_backward(
            grad, q, k, v, self._bias(call), out, padded, state, state, 0.0, [True, True, True, False],
            call.is_causal, scale=call.scale,
        )  # fmt: skip
        return dq, _sum_heads(dk, heads), _sum_heads(dv, heads)


@dataclass
class Statistics:
    """What a dense pass's attention call leaves for the kept pass: its output (B, H, S, d) and log-sum-exp
    (B, H, S), full-length until `gathered` keeps the selected rows."""

    out: torch.Tensor
    lse: torch.Tensor
    kernel: str  # the `Kernel` that made them

    def gathered(self, selection) -> Statistics:
        """The kept rows (a `jenga.elimination.TokenSelection`); the output keeps the row-major (B, L, H, d) memory
        of the kernels' own outputs."""
        out, lse = selection.gather(self.out, dim=2), selection.gather(self.lse, dim=2).contiguous()
        return Statistics(out, lse, self.kernel)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """What the kept pass's gradient is, in PyTorch (quadratic memory: for tests and checks). Dense attention of
    (B, H, S, d) inputs under the boolean `mask` (True: attend), differentiable only through (kept query, kept
    key) pairs: other pairs' logits, eliminated keys' values and eliminated queries' outputs are detached, so the
    softmax statistics stay the dense ones. `kept`: (B, S) bool."""
    k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
    logits = (q @ k.transpose(-1, -2)) * scale
    pairs = (kept[:, :, None] & kept[:, None, :])[:, None]
    logits = torch.where(pairs, logits, logits.detach()).masked_fill(~mask, float("-inf"))
    out = logits.softmax(-1) @ torch.where(kept[:, None, :, None], v, v.detach())
    return torch.where(kept[:, None, :, None], out, out.detach())


class _KeptAttention(torch.autograd.Function):
    """The kept pass's attention: the dense output's kept rows, whose backward is the fused kernel's from the dense
    statistics. The output is saved for backward as the fused kernels save theirs (`jenga.saved`)."""

    @staticmethod
    def forward(ctx, q, k, v, stats: Statistics, call: _Call, kernel: Kernel):
        out = stats.out  # made without autograd by the dense pass
        # Tensors only through save_for_backward, where checkpointing and the saved-tensor hooks see them.
        ctx.save_for_backward(q, k, v, out, stats.lse, call.mask)
        ctx.is_causal, ctx.scale, ctx.kernel = call.is_causal, call.scale, kernel
        ctx.saves_output = True  # read by `jenga.saved.kept_by_attention`
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(grad, _Call(q, k, v, mask, ctx.is_causal, ctx.scale, 0.0), out, lse)
        return dq, dk, dv, None, None, None


class _Intercept(TorchFunctionMode):
    """Routes `scaled_dot_product_attention` to `handle`; every other function runs unchanged."""

    def __init__(self, handle) -> None:
        super().__init__()
        self.handle = handle

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return self.handle(_Call.parse(*args, **(kwargs or {})))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording(kernel: str | None = None) -> Iterator[list[Statistics]]:
    """Inside: each SDPA call runs its fused kernel (or the one named) with statistics; yields the list they are
    appended to."""
    recorded: list[Statistics | None] = []

    def handle(call: _Call) -> torch.Tensor:
        # With dropout the kept pass would need the forward's dropout mask.
        why = "attention dropout" if call.dropout else None
        if why is None:
            try:
                chosen = Kernel(call, kernel)
            except NotImplementedError as exc:
                why = str(exc)
            else:
                out, lse = chosen.forward(call)
                recorded.append(Statistics(out, lse, chosen.name))
                return out
        recorded.append(None)
        warn_once(why, f"Jenga: {why}: sparse layers attend again over kept blocks")
        return call.plain()

    with _Intercept(handle):
        yield recorded


def kept_rows(recorded: list[Statistics | None], selection) -> Statistics | None:
    """The kept rows of the one attention call a dense pass made, or None (with a warning) when it made none or
    several. Empties `recorded`: the full-length statistics go before the kept pass runs."""
    stats = single(recorded)
    recorded.clear()
    if stats is None:
        return None
    bsz, _, seq, _ = stats.out.shape
    if (bsz, seq) != (selection.index.shape[0], selection.seq_len):
        warn_once(
            "attention-layout",
            f"Jenga: the attention call's (batch, length) {(bsz, seq)} is not the layer's "
            f"{(selection.index.shape[0], selection.seq_len)} (a regrouped sequence, as in LongLoRA's shifted "
            "attention): sparse layers attend again over kept blocks",
        )
        return None
    return stats.gathered(selection)


def single(recorded: list[Statistics | None]) -> Statistics | None:
    """The one attention call a dense pass made, or None (with a warning) when it made none or several."""
    if None in recorded:  # a call without statistics, warned where it ran
        return None
    if len(recorded) == 1:
        return recorded[0]
    warn_once(
        "one-call",
        f"Jenga: the dense pass made {len(recorded)} SDPA calls, not one (eager attention?): sparse layers attend "
        "again over kept blocks; load the model with attn_implementation='sdpa' for one attention call",
    )
    return None


@contextlib.contextmanager
def replaying(stats: Statistics | None, kernel: str | None = None) -> Iterator[None]:
    """Inside: the SDPA call returns `stats`' output with the backward from its statistics, by its fused kernel (or
    the one named); nothing changes when `stats` is None."""
    if stats is None:
        yield
        return

    def handle(call: _Call) -> torch.Tensor:
        if call.q.shape[:-1] != stats.out.shape[:-1]:  # e.g. LongLoRA's groups, formed in one pass only
            warn_once(
                "attention-layout",
                f"Jenga: the kept pass's attention call has queries of shape {tuple(call.q.shape)}, the dense "
                f"pass's kept rows {tuple(stats.out.shape)}: sparse layers attend again over kept blocks",
            )
            return call.plain()
        return _KeptAttention.apply(call.q, call.k, call.v, stats, call, Kernel.for_kept(call, stats.kernel, kernel))

    with _Intercept(handle):
        yield

"""Sparse-saved MLP: an exact forward that keeps only the top channels' activations for backward.

For a frozen MLP the backward pass needs only the input gradient, which flows through the channel
activations. Saving the pre-activations of the `keep` fraction of channels with the largest activation norm
(ranked per sequence and token chunk) cuts the MLP's saved bytes to that fraction of one (gated: two)
token×channel tensors, and the backward matmuls shrink by the same fraction. Frozen weights are saved by
reference; the activation product that only a trainable down-projection would need is never saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import activations

from . import liger
from .autocast import compute_dtype
from .config import JengaConfig
from .fp8 import FP8, FP8_MAX, from_fp8, to_fp8

Activation = Callable[[torch.Tensor], torch.Tensor]
# the SiLU modules a LLaMA-family MLP holds as act_fn (transformers' own class, else torch's)
SILU = (torch.nn.SiLU, getattr(activations, "SiLUActivation", torch.nn.SiLU))


def kept_channels(num_channels: int, keep: float) -> int:
    return max(1, min(num_channels, math.ceil(keep * num_channels)))


def _top_channels(act: torch.Tensor, count: int) -> torch.Tensor:
    """(N, count) channel indices with the largest L2 norm over tokens, per row of the batch."""
    norms = torch.linalg.vector_norm(act, dim=1, dtype=torch.float32)
    return norms.topk(count, dim=1, sorted=False).indices.sort(dim=1).values


def _take(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 2, channels[:, None, :].expand(-1, x.shape[1], -1))


def _activation_grads(act_fn: Activation, grad: torch.Tensor, *pre: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of act_fn(pre[0]) (* pre[1]) w.r.t. the saved pre-activations, recomputed locally."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in pre]
        out = act_fn(leaves[0]) if len(leaves) == 1 else act_fn(leaves[0]) * leaves[1]
        return torch.autograd.grad(out, leaves, grad)


def fused_silu(act_fn: Activation, t: torch.Tensor) -> bool:
    """Whether the float8 path's SiLU product takes the fused kernels (`jenga.kernels.fp8`: `silu_mul_quantize`
    forward, every channel saved; `silu_mul_backward`): SiLU on CUDA."""
    return t.is_cuda and isinstance(act_fn, SILU)


def liger_silu(act_fn: Activation, t: torch.Tensor) -> bool:
    """Whether the SiLU product takes Liger Kernel's kernels (`apply_jenga(fused_kernels=True)`, where no float8
    copy is written: `jenga.liger`): SiLU where Liger's kernels run."""
    return isinstance(act_fn, SILU) and liger.covers(t)


def _products_into(out: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor]], bias=None) -> None:
    """`out[...] = bias + Σ a @ b` over `terms` ((..., k) @ (k, n) pairs) for `out`, a chunk of a larger buffer:
    the first product is written into the chunk where it is contiguous (else copied in) and the others added by
    the matrix unit's epilogue, with no product to copy in and no sum to allocate (two passes over it each)."""
    target = out.view(-1, out.shape[-1]) if out.is_contiguous() else None
    (a, b), *rest = terms
    a = a.reshape(-1, a.shape[-1])
    flat = torch.mm(a, b, out=target) if bias is None else torch.addmm(bias, a, b, out=target)
    for a, b in rest:
        flat.addmm_(a.reshape(-1, a.shape[-1]), b)
    if target is None:
        out.copy_(flat.view(out.shape))


class GatedMLPFunction(torch.autograd.Function):
    """down(act(gate(x)) * up(x)) for frozen projections; x is (N, T, D), channels ranked per row and chunk.

    Tokens go through in chunks of `chunk`: the MLP is token-wise, so chunking changes no output, and it
    bounds the transient channel-wide intermediates by the chunk instead of the sequence (on the float8 kernels'
    path two token×channel tensors at once, 43 KB per token on Llama-2-7B: the SiLU product and the gate's
    gradient are written over their inputs, and a chunk's buffers are freed before the next chunk's are made).
    Channels are ranked per chunk.

    Under autocast (fp32 master weights, bf16 compute) the projections run in the autocast dtype as the
    unpatched MLP's would, with each weight cast once per pass rather than once per chunk. Activations are
    saved in that dtype (the weights by reference, uncast) and backward multiplies in it too: autograd runs
    backward outside autocast, where products against the fp32 weights would run in fp32, several times slower.

    With `recompute` the forward saves its input instead of the channel activations, and backward recomputes
    the gate and up projections chunk by chunk (two of the three matmuls once more): a token costs the input's
    bytes (8 KB on Llama-3-8B) instead of two channel-wide rows (29 KB in float8), the working set that decides
    the longest trainable length under checkpointing.

    With `fused` the SiLU product and its backward take Liger Kernel's kernels wherever Jenga's float8 kernels
    do not (activations saved unrounded, recomputed, or a subset of channels).
    """

    @staticmethod
    def forward(
        ctx,
        x,
        gate_w,
        gate_b,
        up_w,
        up_b,
        down_w,
        down_b,
        act_fn: Activation,
        keep: float,
        chunk: int,
        fp8: bool,
        recompute: bool = False,
        fused: bool = False,
    ):
        rows, tokens, _ = x.shape
        width = gate_w.shape[0]
        count = kept_channels(width, keep)
        spans = [(s, min(s + chunk, tokens)) for s in range(0, tokens, chunk)]
        # Cast once, not per chunk: the dtype autocast would give each product (else the inputs' own)
        dtype = compute_dtype(x)
        weights = (gate_w, up_w, down_w)  # saved as given: a frozen weight by reference, never a cast copy
        gate_w, up_w, down_w = (w.to(dtype) for w in weights)
        gate_b, up_b, down_b = (None if b is None else b.to(dtype) for b in (gate_b, up_b, down_b))
        out = x.new_empty(rows, tokens, down_w.shape[0], dtype=dtype)
        saved_gate = saved_up = scales = None
        if not recompute:
            saved_gate, saved_up = (x.new_empty(rows, tokens, count, dtype=FP8 if fp8 else dtype) for _ in range(2))
            scales = x.new_empty(2, rows, tokens, dtype=torch.float32) if fp8 else None
        channels = x.new_empty(rows, len(spans), count, dtype=torch.long) if count < width else None
        with torch.autocast(x.device.type, enabled=False):
            for i, (s, e) in enumerate(spans):
                part = x[:, s:e].to(dtype)
                gate = F.linear(part, gate_w, gate_b)
                up = F.linear(part, up_w, up_b)
                if fp8 and channels is None and not recompute and fused_silu(act_fn, gate):
                    from .kernels.fp8 import silu_mul_quantize  # Triton is needed on the GPU path only

                    copies = (saved_gate[:, s:e], scales[0, :, s:e], saved_up[:, s:e], scales[1, :, s:e])
                    hidden = silu_mul_quantize(gate, up, *copies, FP8_MAX, overwrite=True)  # over gate's bytes
                    del gate, up  # a chunk's buffers die with it: the next chunk's must not come on top
                    _products_into(out[:, s:e], [(hidden, down_w.t())], down_b)
                    del hidden
                    continue
                hidden = liger.silu_mul(gate, up) if fused and liger_silu(act_fn, gate) else act_fn(gate) * up
                _products_into(out[:, s:e], [(hidden, down_w.t())], down_b)
                if channels is not None:
                    channels[:, i] = _top_channels(hidden, count)
                del hidden, part
                if not recompute:
                    if channels is not None:
                        gate, up = _take(gate, channels[:, i]), _take(up, channels[:, i])
                    if fp8:
                        (gate, scales[0, :, s:e]), (up, scales[1, :, s:e]) = to_fp8(gate), to_fp8(up)
                    saved_gate[:, s:e], saved_up[:, s:e] = gate, up
                del gate, up
        inputs = (x, gate_b, up_b) if recompute else (None, None, None)
        ctx.save_for_backward(saved_gate, saved_up, *weights, channels, scales, *inputs)
        ctx.act_fn, ctx.spans, ctx.x_dtype, ctx.dtype, ctx.fused = act_fn, spans, x.dtype, dtype, fused
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, *weights, channels, scales, x, gate_b, up_b = ctx.saved_tensors
        gate_w, up_w, down_w = (w.to(ctx.dtype) for w in weights)  # backward multiplies in the compute dtype
        grad_out = grad_out.to(ctx.dtype)
        grad_x = grad_out.new_empty(*grad_out.shape[:-1], gate_w.shape[1])
        for i, (s, e) in enumerate(ctx.spans):
            for row in range(grad_out.shape[0]) if channels is not None else [slice(None)]:
                idx = slice(None) if channels is None else channels[row, i]
                g_down, g_gate, g_up = (
                    (down_w, gate_w, up_w) if channels is None else (down_w[:, idx], gate_w[idx], up_w[idx])
                )
                grad_hidden = grad_out[row, s:e] @ g_down
                if x is not None:  # recompute the kept channels' pre-activations of this chunk
                    part = x[row, s:e].to(ctx.dtype)
                    g = F.linear(part, g_gate, None if gate_b is None else gate_b[idx])
                    u = F.linear(part, g_up, None if up_b is None else up_b[idx])
                else:
                    g, u = gate[row, s:e], up[row, s:e]
                if scales is not None and fused_silu(ctx.act_fn, grad_hidden):
                    from .kernels.fp8 import silu_mul_backward  # Triton is needed on the GPU path only

                    grad_gate, grad_up = silu_mul_backward(
                        g, scales[0, row, s:e], u, scales[1, row, s:e], grad_hidden, overwrite=True
                    )
                elif ctx.fused and scales is None and liger_silu(ctx.act_fn, grad_hidden):
                    # recomputed rows are scratch; saved ones must survive a backward that retains the graph
                    grad_gate, grad_up = liger.silu_mul_backward(g, u, grad_hidden, overwrite=x is not None)
                else:
                    if scales is not None:
                        g = from_fp8(g, scales[0, row, s:e], ctx.dtype)
                        u = from_fp8(u, scales[1, row, s:e], ctx.dtype)
                    grad_gate, grad_up = _activation_grads(ctx.act_fn, grad_hidden, g, u)
                _products_into(grad_x[row, s:e], [(grad_gate, g_gate), (grad_up, g_up)])
                del grad_hidden, grad_gate, grad_up, g, u  # before the next chunk's come
        return grad_x.to(ctx.x_dtype), *[None] * 12


class SparseActivationFunction(torch.autograd.Function):
    """act(pre) for a frozen fc1→act→fc2 MLP, saving only the top channels of `pre` (N, T, C).

    The returned gradient is zero outside the kept channels, so fc1's input gradient flows through them
    only; fc1 and fc2 themselves save just their (frozen) weights.
    """

    @staticmethod
    def forward(ctx, pre, act_fn: Activation, keep: float):
        out = act_fn(pre)
        count = kept_channels(pre.shape[-1], keep)
        channels = _top_channels(out, count) if count < pre.shape[-1] else None
        ctx.save_for_backward(pre if channels is None else _take(pre, channels), channels)
        ctx.act_fn = act_fn
        return out

    @staticmethod
    def backward(ctx, grad_out):
        pre, channels = ctx.saved_tensors
        if channels is None:
            return _activation_grads(ctx.act_fn, grad_out, pre)[0], None, None
        expanded = channels[:, None, :].expand(-1, grad_out.shape[1], -1)
        (grad_kept,) = _activation_grads(ctx.act_fn, torch.gather(grad_out, 2, expanded), pre)
        return torch.zeros_like(grad_out).scatter_(2, expanded, grad_kept), None, None


# Eager inside a compiled model (a graph break): Dynamo makes `keep` a symbol once layers differ in it, and the
# kept-channel count derived from it cannot be lifted into the Function's backward.
@torch.compiler.disable
def gated_mlp(
    x: torch.Tensor,
    gate: torch.nn.Linear,
    up: torch.nn.Linear,
    down: torch.nn.Linear,
    act_fn: Activation,
    keep: float,
    chunk: int = JengaConfig.mlp_chunk_tokens,
    fp8: bool = False,
    recompute: bool = False,
    fused: bool = False,
) -> torch.Tensor:
    """Sparse-saved SwiGLU-style MLP on (B, T, D) or (T, D) input; channels ranked per sequence and chunk; with
    `fp8` the kept activations are saved in float8 (half the bytes of bf16, 3 mantissa bits); with `recompute`
    only the input is saved and backward recomputes the activations per chunk (`fp8` then saves nothing); with
    `fused` the SiLU product takes Liger Kernel's kernels where the float8 ones do not run (`jenga.liger`)."""
    x3 = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
    weights = (gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias)
    out = GatedMLPFunction.apply(x3, *weights, act_fn, keep, chunk, fp8, recompute, fused)
    return out.view(*x.shape[:-1], out.shape[-1])


@torch.compiler.disable  # as gated_mlp
def sparse_activation(pre: torch.Tensor, act_fn: Activation, keep: float) -> torch.Tensor:
    """Sparse-saved activation on (B, T, C) or (T, C) input; channels ranked per sequence (or per batch)."""
    pre3 = pre if pre.dim() == 3 else pre.reshape(1, -1, pre.shape[-1])
    return SparseActivationFunction.apply(pre3, act_fn, keep).view_as(pre)

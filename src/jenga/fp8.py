"""Float8 copies of saved activations: half the bytes of bf16 for tensors backward only reads.

One scale per token (the last dimension's largest magnitude maps to e4m3's largest value, 448) keeps 3 mantissa
bits over 2^17 of range below each token's peak. Used where the whole LoRA gradient measured within 0.05% cosine
of the exact one on a real model (`logs/real-model/fidelity-cpu/fp8*`: the gated MLP's channels and the RMSNorm
inputs, 0.9996; with the attention LoRA inputs too, in bf16 with A's gradient nonzero, 0.99988; single small
tensors deviate more); the attention's q and k stay in bf16, since softmax amplifies their rounding.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in float8, float32 scale per token of shape x.shape[:-1]): the Triton kernel on CUDA
    (`jenga.kernels.fp8`, one pass), this reference elsewhere. Both scale in fp32 and round to nearest even."""
    if x.is_cuda:
        from .kernels.fp8 import quantize_rows  # Triton is needed on the GPU path only

        return quantize_rows(x, FP8_MAX)
    peak = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = peak.clamp_min(1e-30) / FP8_MAX
    return (x.float() * (1.0 / scale)).to(FP8), scale.squeeze(-1)


def from_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x * scale per token, in `dtype`: the Triton kernel on CUDA, this reference elsewhere."""
    if x.is_cuda:
        from .kernels.fp8 import dequantize_rows

        return dequantize_rows(x, scale, dtype)
    return (x.float() * scale[..., None]).to(dtype)


# A lean RMSNorm's output carries the float8 copy of the norm's input that the norm saves for backward: with the
# norm's rstd per token and its weight per column the output is that copy, so its readers need no copy of their own.
_NORM_COPY = "_jenga_norm_copy"


@torch.compiler.disable  # a tensor's __dict__ does not trace: eager inside a compiled model
def mark_norm_output(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rstd: torch.Tensor, weight) -> None:
    """Record on `out` = `weight * (x * rstd)` (an RMSNorm's output) the float8 copy (`q`, `scale`) of x the norm
    keeps: `input_copy(out)` hands it to out's readers."""
    out.__dict__[_NORM_COPY] = (out._version, q, scale, rstd, weight)


@torch.compiler.disable
def input_copy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A float8 copy of x for a backward that reads x only through products with it: (codes, scale per token,
    factor per token or None, factor per column or None), x = decode(codes, scale * row factor) * column factor up
    to float8 rounding. An RMSNorm's output (`mark_norm_output`) reuses the norm's copy of its input (the factors:
    its rstd and weight), which the norm keeps anyway: at the q, k and v adapters that saves a copy of the hidden
    state per layer. Any other x gets `shared_fp8(x)`."""
    marked = x.__dict__.get(_NORM_COPY)
    if marked is not None and marked[0] == x._version:
        return marked[1], marked[2], marked[3], marked[4]
    return (*shared_fp8(x), None, None)


def decode_copy(q: torch.Tensor, scale: torch.Tensor, row: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`input_copy`'s copy decoded in `dtype`, with its per-token factor and without its per-column one (which the
    caller applies to a product, where it costs less than on x)."""
    return from_fp8(q, scale if row is None else scale * row.view_as(scale), dtype)


@torch.compiler.disable  # a cache in the tensor's __dict__ does not trace: eager inside a compiled model
def shared_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`to_fp8(x)`, computed once per tensor (and version): q, k and v read the same normed rows, and one float8
    copy saved for all three keeps the saving."""
    cached = x.__dict__.get("_jenga_fp8")
    if cached is None or cached[0] != x._version:
        cached = (x._version, *to_fp8(x.detach()))
        x.__dict__["_jenga_fp8"] = cached
    return cached[1], cached[2]

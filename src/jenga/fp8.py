"""Float8 copies of saved activations: half the bytes of bf16 for tensors backward only reads.

One scale per token (the last dimension's largest magnitude maps to e4m3's largest value, 448) keeps 3 mantissa
bits over 2^17 of range below each token's peak. Used where the rounded gradient measured within 0.1% cosine
of the exact one on a real model (the gated MLP's channels, RMSNorm inputs, attention LoRA inputs); the
attention's q and k stay in bf16, since softmax amplifies their rounding.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16 scales its tensors in place of an fp32 copy (its range holds any reciprocal scale); others go
    through fp32 (fp16's range does not)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in float8, float32 scale per token of shape x.shape[:-1])."""
    peak = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = peak.clamp_min(1e-30) / FP8_MAX
    work = _work_dtype(x.dtype)
    return (x.to(work) * (1.0 / scale).to(work)).to(FP8), scale.squeeze(-1)


def from_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    work = _work_dtype(dtype)
    return (x.to(work) * scale[..., None].to(work)).to(dtype)


def shared_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`to_fp8(x)`, computed once per tensor (and version): q, k and v read the same normed rows, and one float8
    copy saved for all three keeps the saving."""
    cached = x.__dict__.get("_jenga_fp8")
    if cached is None or cached[0] != x._version:
        cached = (x._version, *to_fp8(x.detach()))
        x.__dict__["_jenga_fp8"] = cached
    return cached[1], cached[2]

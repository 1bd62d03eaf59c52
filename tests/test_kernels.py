"""Triton kernels against their PyTorch references (interpreter on CPU: fp32/fp16 only, see README)."""

from __future__ import annotations

import pytest
import torch

from jenga.kernels.scoring import block_tile_scores_triton
from jenga.scoring import block_tile_scores

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bsz,heads,kv_heads,seq,dim,block,tile",
    [
        (2, 4, 2, 100, 16, 16, None),  # GQA, masked tail, default tile (8 blocks per side)
        (1, 4, 4, 128, 32, 32, 32),  # tile == block
        (2, 2, 1, 70, 24, 16, 32),  # head_dim not a power of two
        (1, 2, 2, 300, 16, 64, 128),  # several tiles, partial last block
    ],
)
def test_tile_scores_match_reference(dtype, bsz, heads, kv_heads, seq, dim, block, tile):
    gen = torch.Generator().manual_seed(seq)
    q = torch.randn(bsz, heads, seq, dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(bsz, kv_heads, seq, dim, generator=gen).to(DEVICE, dtype)
    got = block_tile_scores_triton(q, k, block, 0.3, tile=tile)
    ref = block_tile_scores(q, k, block, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_tile_scores_padding_and_strided_inputs():
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 90, 3, 4, 16, generator=gen).to(DEVICE)  # (B, S, 3, H, d) like a fused projection
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    valid = torch.ones(2, 90, dtype=torch.bool, device=DEVICE)
    valid[1, 50:] = False
    got = block_tile_scores_triton(q, k, 16, 0.25, valid)
    torch.testing.assert_close(got, block_tile_scores(q, k, 16, 0.25, valid), rtol=1e-5, atol=1e-5)
    assert (got[1, :, 4:] == 0).all()


def test_kernel_argument_errors():
    q = torch.randn(1, 3, 32, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        block_tile_scores_triton(q, torch.randn(1, 2, 32, 16, device=DEVICE), 16, 1.0)
    with pytest.raises(ValueError, match="tile"):
        block_tile_scores_triton(q, q, 16, 1.0, tile=24)

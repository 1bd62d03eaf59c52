"""The oracle block score against a naive full-matrix reference."""

from __future__ import annotations

import pytest
import torch

from jenga import scoring


def naive_tiles(q, k, block_size, scale, valid=None):
    bsz, heads, seq, _ = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    full = ((q.double() @ k.double().transpose(-1, -2)) * scale).relu().sum(1)
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None].expand(bsz, -1, -1).clone()
    if valid is not None:
        allowed &= valid[:, :, None] & valid[:, None, :]
    full = full.masked_fill(~allowed, 0)
    nb = -(-seq // block_size)
    tiles = torch.zeros(bsz, nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            tile = full[:, i * block_size : (i + 1) * block_size, j * block_size : (j + 1) * block_size]
            tiles[:, i, j] = tile.amax(dim=(1, 2))
    return tiles


@pytest.mark.parametrize("seq,kv_heads", [(128, 4), (100, 2), (37, 1)])
@pytest.mark.parametrize("slab", [None, 1])
def test_tiles_match_naive(seq, kv_heads, slab, monkeypatch):
    if slab is not None:  # force one query block per slab to exercise the slab loop
        monkeypatch.setattr(scoring, "_SLAB_ELEMENTS", slab)
    torch.manual_seed(0)
    q = torch.randn(2, 4, seq, 16)
    k = torch.randn(2, kv_heads, seq, 16)
    got = scoring.block_tile_scores(q, k, 16, 0.25)
    torch.testing.assert_close(got.double(), naive_tiles(q, k, 16, 0.25), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scoring.block_scores(q, k, 16, 0.25), got.sum(1))


def test_padding_never_contributes():
    torch.manual_seed(1)
    q, k = torch.randn(2, 2, 64, 8), torch.randn(2, 2, 64, 8)
    valid = torch.ones(2, 64, dtype=torch.bool)
    valid[1, 40:] = False
    got = scoring.block_tile_scores(q, k, 16, 1.0, valid)
    torch.testing.assert_close(got.double(), naive_tiles(q, k, 16, 1.0, valid), rtol=1e-5, atol=1e-5)
    assert (got[1, :, 3] == 0).all() and (got[1, 3, :] == 0).all()
    # the padded tokens' values must not matter
    k2 = k.clone()
    k2[1, :, 40:] = 100.0
    torch.testing.assert_close(scoring.block_scores(q, k2, 16, 1.0, valid), scoring.block_scores(q, k, 16, 1.0, valid))


def test_causal_tiles_above_diagonal_are_zero_and_half_precision_inputs():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 96, 8).half(), torch.randn(1, 2, 96, 8).half()
    got = scoring.block_tile_scores(q, k, 32, 1.0)
    assert got.dtype == torch.float32
    assert torch.equal(got.triu(1), torch.zeros_like(got))
    torch.testing.assert_close(got.double(), naive_tiles(q.float(), k.float(), 32, 1.0), rtol=1e-4, atol=1e-4)


def test_gqa_head_mismatch_raises():
    with pytest.raises(ValueError, match="multiple"):
        scoring.block_tile_scores(torch.randn(1, 3, 16, 4), torch.randn(1, 2, 16, 4), 8, 1.0)


def test_scores_under_autocast_use_the_autocast_dtype():
    """The rotary embedding hands q/k over in fp32 under autocast; they are scored in the autocast dtype, as
    the attention's matmuls would run, and outside autocast in their own dtype."""
    from jenga.kernels import block_scores

    torch.manual_seed(5)
    q, k = torch.randn(1, 4, 96, 16), torch.randn(1, 2, 96, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = block_scores(q, k, 16, 0.25)
    expected = scoring.block_scores(q.bfloat16(), k.bfloat16(), 16, 0.25)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    exact = block_scores(q, k, 16, 0.25)
    torch.testing.assert_close(exact, scoring.block_scores(q, k, 16, 0.25), rtol=0, atol=0)
    assert not torch.equal(exact, got)

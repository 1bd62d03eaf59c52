"""Predictor design: key pieces and rotated outputs against their written definition; padding; bundles saved
before the design was recorded; the design in the manifest (the CLI's is checked in test_predictor)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from jenga import JengaConfig, apply_jenga
from jenga.predictor import BlockPredictor, PredictorBundle, PredictorMismatchError
from jenga.predictor.bundle import MANIFEST, ORIGINAL_DESIGN
from jenga.predictor.model import ROPE_SPAN

CONFIG = JengaConfig(block_size=16, attn_keep=0.5, mlp_keep=1.0, dense_first_layers=1, dense_last_layer=True)


def random_predictor(seed: int = 0, **design) -> BlockPredictor:
    """Weights large enough that scores differ a lot between blocks, pieces and distances."""
    torch.manual_seed(seed)
    predictor = BlockPredictor(32, units=16, out_dim=8, **design).eval()
    with torch.no_grad():
        for p in predictor.parameters():
            p.normal_(0, 0.5)
    return predictor


def reference_tiles(predictor: BlockPredictor, hidden: torch.Tensor, block_size: int, pieces: int) -> torch.Tensor:
    """The module docstring's definition, one tile at a time, for a single unpadded sequence (S, D)."""
    seq = hidden.shape[0]
    nb = math.ceil(seq / block_size)
    size = block_size // pieces
    blocks = [
        [hidden[b * block_size + p * size : min(seq, b * block_size + (p + 1) * size)] for p in range(pieces)]
        for b in range(nb)
    ]

    def embed(tower, x, position):
        y = tower(F.layer_norm(x, x.shape))
        r = predictor.rope_pairs
        for f in range(r):
            angle = position * math.pi * ROPE_SPAN ** (-f / r)
            a, b = y[f].clone(), y[r + f].clone()
            y[f], y[r + f] = a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)
        return y

    tiles = torch.zeros(nb, nb)
    for i in range(nb):
        query = embed(predictor.query, torch.stack([part.mean(0) for part in blocks[i] if len(part)]).mean(0), i + 0.5)
        for j in range(i + 1):
            keys = [
                embed(predictor.key, part.mean(0), j + (p + 0.5) / pieces)
                for p, part in enumerate(blocks[j])
                if len(part)
            ]
            tiles[i, j] = torch.stack([F.softplus(query @ key) for key in keys]).max()
    return tiles


@pytest.mark.parametrize(
    "design, pieces",
    [
        ({"key_pieces": 4, "rope_pairs": 2}, 4),
        ({"key_pieces": 64, "rope_pairs": 9}, 16),  # capped at one piece per token and at out_dim // 2 pairs
        (ORIGINAL_DESIGN, 1),
    ],
)
@torch.no_grad()
def test_tiles_follow_the_written_definition(design, pieces):
    predictor = random_predictor(**design)
    hidden = torch.randn(1, 70, 32)  # 5 blocks of 16, the last one partial (6 tokens)
    expected = reference_tiles(predictor, hidden[0], 16, pieces)
    torch.testing.assert_close(predictor.tile_scores(hidden, 16)[0], expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_padded_rows_score_like_unpadded_sequences():
    predictor = random_predictor()
    hidden = torch.randn(2, 100, 32)
    valid = torch.ones(2, 100, dtype=torch.bool)
    valid[1, 50:] = False
    padded = predictor.block_scores(hidden, 16, valid)
    torch.testing.assert_close(padded[0], predictor.block_scores(hidden[:1], 16)[0])
    torch.testing.assert_close(padded[1, :4], predictor.block_scores(hidden[1:, :50], 16)[0])
    assert (padded[1, 4:] == 0).all()


@torch.no_grad()
def test_rotation_makes_tiles_depend_on_block_distance_not_position():
    predictor = random_predictor(key_pieces=4, rope_pairs=4)
    hidden = torch.randn(1, 64, 32)
    shifted = torch.cat([torch.randn(1, 16, 32), hidden], dim=1)  # the same blocks one block later
    torch.testing.assert_close(predictor.tile_scores(shifted, 16)[0, 1:, 1:], predictor.tile_scores(hidden, 16)[0])
    same_content = hidden[:, :16].repeat(1, 4, 1)  # four equal blocks: tiles differ only by distance
    tiles = predictor.tile_scores(same_content, 16)[0]
    assert not torch.allclose(tiles[3, 3], tiles[3, 0])
    torch.testing.assert_close(tiles[3, 2], tiles[1, 0])
    unrotated = random_predictor(key_pieces=4, rope_pairs=0).tile_scores(same_content, 16)[0]
    torch.testing.assert_close(unrotated[3, 3], unrotated[3, 0])


def test_bundle_saved_without_design_loads_as_the_original_predictor(tmp_path):
    torch.manual_seed(0)
    bundle = PredictorBundle(64, 3, [1], CONFIG, units=16, out_dim=8, **ORIGINAL_DESIGN)
    bundle.save(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["design"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    loaded = PredictorBundle.load(tmp_path)
    assert loaded.design == ORIGINAL_DESIGN
    hidden = torch.randn(2, 80, 64)
    predictor = loaded[1]
    with torch.no_grad():
        pooled = F.layer_norm(hidden.view(2, 5, 16, 64).mean(2), (64,))
        tiles = F.softplus(predictor.query(pooled) @ predictor.key(pooled).transpose(1, 2)).tril()
        torch.testing.assert_close(predictor.block_scores(hidden, 16), tiles.sum(1))


def test_design_roundtrip_and_mismatch_after_load(tmp_path):
    torch.manual_seed(0)
    bundle = PredictorBundle(64, 3, [1], CONFIG, units=16, out_dim=8, key_pieces=8, rope_pairs=3)
    bundle.save(tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text())["design"] == {"key_pieces": 8, "rope_pairs": 3}
    loaded = PredictorBundle.load(tmp_path)
    hidden = torch.randn(2, 90, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded[1].block_scores(hidden, 16), bundle[1].block_scores(hidden, 16))
    with pytest.raises(PredictorMismatchError, match="3 layers of hidden size 64.*4 layers"):
        apply_jenga(tiny_llama(layers=4), CONFIG, predictor=tmp_path)


def test_bundle_placed_like_a_bf16_model_ranks_as_in_fp32():
    torch.manual_seed(0)
    bundle = PredictorBundle(64, 3, [1], CONFIG, units=16, out_dim=8, key_pieces=8, rope_pairs=3).eval()
    hidden = torch.randn(2, 300, 64)
    with torch.no_grad():
        reference = bundle[1].block_scores(hidden, 16)
        placed = bundle.placed_like(torch.nn.Linear(4, 4).bfloat16())
        assert placed[1].query.fc1.weight.dtype == torch.bfloat16
        scores = placed[1].block_scores(hidden.bfloat16(), 16)
    assert scores.dtype == torch.float32  # tiles are summed in fp32
    torch.testing.assert_close(scores, reference, rtol=2e-2, atol=1e-2)
    assert (scores.argsort(dim=1)[:, -5:].sort().values == reference.argsort(dim=1)[:, -5:].sort().values).all()
    assert bundle.placed_like(torch.nn.Linear(4, 4))[1].query.fc1.weight.dtype == torch.float32


def test_cost_counts_the_towers_tiles_and_the_layer_and_leaves_the_bundle_alone(tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    from jenga.experiments.predictor_cost import cost_table

    model = tiny_llama(layers=4)
    bundle = PredictorBundle(64, 4, [1, 2], CONFIG, units=16, out_dim=8, key_pieces=4, rope_pairs=2)
    before = {k: v.clone() for k, v in bundle.state_dict().items()}
    seq = 96  # 6 blocks of 16, 4 key pieces each
    table = cost_table(bundle, model.config, seq)
    nb, keys = 6, 6 * 4
    towers = 2 * nb * (64 * 16 + 16 * 8) + 2 * keys * (64 * 16 + 16 * 8)
    assert table["1"]["predictor_flops"] == towers + 2 * nb * keys * 8
    assert table["1"]["predictor_params"] == sum(p.numel() for p in bundle[1].parameters())
    ids = torch.zeros(1, seq, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids)
    projections = counter.get_flop_counts()["LlamaForCausalLM.model.layers.2"]  # CPU SDPA is not counted
    attention = 4 * seq * seq * 64  # q·kᵀ and weights·v over the full square
    assert table["2"]["layer_flops"] == sum(projections.values()) + attention
    assert table["2"]["flop_share"] == table["2"]["predictor_flops"] / table["2"]["layer_flops"]
    assert all(torch.equal(v, before[k]) for k, v in bundle.state_dict().items())

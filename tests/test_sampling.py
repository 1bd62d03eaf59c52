"""The explored random-selection design (`jenga.experiments.sampling`): unbiased weights, exact forward."""

from __future__ import annotations

import pytest
import torch
from conftest import add_lora, batch, tiny_llama

from jenga import JengaConfig, apply_jenga, jenga_state, remove_jenga
from jenga.elimination import select_tokens
from jenga.experiments.sampling import Draw, WeightedSelection, apply_sampled, capped_probabilities


def _fixed_scores(layer_idx, hidden_states, token_valid, block_size, query_key):
    """Uneven oracle-like scores: block 3 far above the rest, so a probability must be capped at 1."""
    scores = torch.arange(1.0, 11.0)[None].repeat(hidden_states.shape[0], 1)
    scores[:, 3] = 500.0
    return scores


@pytest.mark.parametrize("kind", ["uniform", "systematic", "pps"])
def test_inverse_probability_weights_are_unbiased_per_block(kind):
    """Over many draws, E[weight x kept] is 1 for every block (forced and drawn): the weighted kept pass
    estimates the sum over every query row. The draw keeps exactly the configured number of blocks."""
    torch.manual_seed(0)
    seq, bs, keep_blocks, draws = 16 * 10, 16, 5, 4000
    config = JengaConfig(block_size=bs, attn_keep=keep_blocks / 10)
    draw = Draw(config, kind, score=_fixed_scores)
    total = torch.zeros(10)
    for _ in range(draws):
        scores = draw(0, torch.zeros(1, seq, 1), None, bs, None)
        s = select_tokens(scores, keep_blocks, bs, seq, sink_blocks=1, token_valid=None, recent_blocks=1)
        if kind != "uniform":
            assert int((scores[0, 1:9] > 0).sum()) == 3  # exactly the drawn count, no tie for the selector
        weighted = WeightedSelection(s.index, s.valid, s.seq_len, bs, draw.inclusion[0])
        y = torch.ones(1, s.num_kept, 1, requires_grad=True)
        weighted.with_gradient_from(torch.zeros(1, seq, 1), y).sum().backward()
        total.index_add_(0, s.index[0, ::bs] // bs, y.grad[0, ::bs, 0])
    mean = total / draws
    assert mean[0] == 1 and mean[-1] == 1  # sink and recent blocks: always kept, weight 1
    assert torch.allclose(mean[1:-1], torch.ones(8), atol=0.08), mean
    if kind == "pps":
        assert draw.inclusion[0][0, 3] == 1  # the dominant block: capped at 1, kept every time, weight 1
        assert draw.inclusion[0][0, 1] < draw.inclusion[0][0, 8]  # larger scores, kept more often


def test_capped_probabilities_sum_to_the_count_and_stay_at_most_one():
    p = capped_probabilities(torch.tensor([[100.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]]), 2)
    torch.testing.assert_close(p.sum(dim=1), torch.full((2,), 2.0))
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.25, 0.25, 0.25, 0.25], [0.4, 0.4, 0.4, 0.4, 0.4]]))


def test_systematic_draw_spreads_the_kept_blocks():
    """Of 8 free blocks, 4 drawn at a stride of 2: exactly one of each pair, every time."""
    config = JengaConfig(block_size=16, attn_keep=0.6)  # 10 blocks: 6 kept, 1 sink + 1 recent + 4 drawn
    draw = Draw(config, "systematic")
    for seed in range(20):
        torch.manual_seed(seed)
        scores = draw(0, torch.zeros(2, 160, 1), None, 16, None)
        drawn = scores[:, 1:9].view(2, 4, 2)
        assert torch.equal(drawn.sum(dim=2), torch.ones(2, 4)) and scores[:, [0, 9]].sum() == 0


@pytest.mark.parametrize("kind", ["uniform", "systematic", "pps"])
def test_sampled_forward_is_dense_and_gradient_is_scaled(kind):
    ids = batch(2, 256)
    model = add_lora(tiny_llama(layers=3))
    config = JengaConfig(block_size=32, dense_first_layers=1, dense_last_layer=False)
    apply_jenga(model, config)
    dense_loss = model(input_ids=ids, labels=ids).loss.item()
    remove_jenga(model)
    undo = apply_sampled(model, config, kind)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - dense_loss) < 1e-5  # the forward is the model's own
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    if kind != "pps":  # pps scores with the layer's q/k, which the stand-in arguments lack
        assert isinstance(jenga_state(model).selector.choose(*_choose_args(model)), WeightedSelection)
    undo()
    assert jenga_state(model) is None


def _choose_args(model):
    layer = model.get_base_model().model.layers[1]
    hidden = torch.zeros(1, 256, 64)
    return 1, layer, 4, hidden, None, lambda: None

"""The explored random-selection design (`jenga.experiments.sampling`): unbiased weights, exact forward."""

from __future__ import annotations

import torch
from conftest import add_lora, batch, tiny_llama

from jenga import JengaConfig, apply_jenga, jenga_state, remove_jenga
from jenga.elimination import select_tokens
from jenga.experiments.sampling import WeightedSelection, apply_sampled, uniform_scorer


def test_inverse_probability_weights_are_unbiased_per_block():
    """Over many uniform draws, E[weight x kept] is 1 for every block (forced and drawn): the weighted kept
    pass estimates the sum over every query row."""
    torch.manual_seed(0)
    seq, bs, keep_blocks, draws = 16 * 10, 16, 5, 4000
    total = torch.zeros(10)
    for _ in range(draws):
        scores = uniform_scorer(0, torch.zeros(1, seq, 1), None, bs, None)
        s = select_tokens(scores, keep_blocks, bs, seq, sink_blocks=1, token_valid=None, recent_blocks=1)
        weighted = WeightedSelection(s.index, s.valid, s.seq_len, bs, 1, 1)
        y = torch.ones(1, s.num_kept, 1, requires_grad=True)
        weighted.with_gradient_from(torch.zeros(1, seq, 1), y).sum().backward()
        total.index_add_(0, s.index[0, ::bs] // bs, y.grad[0, ::bs, 0])
    mean = total / draws
    assert mean[0] == 1 and mean[-1] == 1  # sink and recent blocks: always kept, weight 1
    assert torch.allclose(mean[1:-1], torch.ones(8), atol=0.06), mean  # drawn: weight 8/3, kept 3/8 of the time


def test_sampled_forward_is_dense_and_gradient_is_scaled():
    ids = batch(2, 256)
    model = add_lora(tiny_llama(layers=3))
    config = JengaConfig(block_size=32, dense_first_layers=1, dense_last_layer=False)
    apply_jenga(model, config)
    dense_loss = model(input_ids=ids, labels=ids).loss.item()
    remove_jenga(model)
    undo = apply_sampled(model, config)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - dense_loss) < 1e-5  # the forward is the model's own
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert isinstance(jenga_state(model).selector.choose(*_choose_args(model)), WeightedSelection)
    undo()
    assert jenga_state(model) is None


def _choose_args(model):
    layer = model.get_base_model().model.layers[1]
    hidden = torch.zeros(1, 256, 64)
    return 1, layer, 4, hidden, None, lambda: None

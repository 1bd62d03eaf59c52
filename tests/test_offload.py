"""Activation offloading: same gradients with and without it, budgets honoured, bad input rejected."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_llama

from jenga import JengaConfig, apply_jenga
from jenga.offload import ActivationOffloader, sparsity_budgets, uniform_budgets


def _grads(model, ids, offloader=None):
    model.zero_grad(set_to_none=True)
    if offloader is None:
        loss = model(input_ids=ids, labels=ids).loss
    else:
        with offloader:
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("jenga", [False, True])
def test_offloading_changes_no_gradient(jenga):
    model = tiny_llama(layers=4)
    if jenga:
        apply_jenga(model, JengaConfig(block_size=16, attn_keep=0.5, mlp_keep=0.5, dense_first_layers=1))
    ids = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(0))
    loss, grads = _grads(model, ids)
    layers = list(model.model.layers)
    offloader = ActivationOffloader.for_model(model, layers, budgets=[0] * len(layers), min_bytes=0)
    loss_off, grads_off = _grads(model, ids, offloader)
    assert sum(offloader.offloaded) > 0 and sum(offloader.resident) == 0
    assert offloader.offloaded == offloader.saved
    assert torch.equal(loss, loss_off) and grads.keys() == grads_off.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_off[name]), name


def test_the_constructor_offloads_no_weight_of_the_layers():
    """Built from the layers alone (not `for_model`), the offloader still leaves their frozen weights in place:
    what a layer saves counts activations only, the same bytes as with the whole model's weights excluded."""
    model = tiny_llama(layers=2)
    model.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)  # a gradient flows through the layers, whose weights are saved
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(2))
    layers = list(model.model.layers)
    plain = ActivationOffloader(layers, budgets=[0, 0], min_bytes=0)
    _grads(model, ids, plain)
    whole = ActivationOffloader.for_model(model, layers, budgets=[0, 0], min_bytes=0)
    _grads(model, ids, whole)
    assert plain.saved == whole.saved and sum(plain.saved) > 0


def test_calibration_sets_budgets_that_keep_the_resident_fraction():
    model = tiny_llama(layers=4)
    ids = torch.randint(0, VOCAB, (1, 96), generator=torch.Generator().manual_seed(1))
    layers = list(model.model.layers)
    offloader = ActivationOffloader.for_model(model, layers, resident_fraction=0.5, min_bytes=0)
    _grads(model, ids, offloader)  # calibration: everything moves
    assert offloader.offloaded == offloader.saved and sum(offloader.saved) > 0 and offloader.budgets is not None
    total = sum(offloader.saved)
    assert sum(offloader.budgets) <= total // 2 and len(set(offloader.budgets)) == 1
    _grads(model, ids, offloader)
    assert sum(offloader.resident) <= total // 2 < sum(offloader.resident) + sum(offloader.offloaded)
    for resident, budget in zip(offloader.resident, offloader.budgets, strict=True):
        assert resident <= budget


def test_budget_policies():
    assert uniform_budgets(100, 4) == [25, 25, 25, 25]
    budgets = sparsity_budgets(300, [1.0, 0.5, 0.5, 1.0], [1.0, 0.5, 0.5, 1.0])
    assert budgets == [100, 50, 50, 100]
    with pytest.raises(ValueError, match="equally long"):
        sparsity_budgets(10, [1.0], [1.0, 0.5])
    with pytest.raises(ValueError, match="num_layers"):
        uniform_budgets(10, 0)


def test_offloader_rejects_bad_input():
    layers = list(tiny_llama(layers=2).model.layers)
    with pytest.raises(ValueError, match="either budgets or resident_fraction"):
        ActivationOffloader(layers)
    with pytest.raises(ValueError, match="one per layer"):
        ActivationOffloader(layers, budgets=[1])
    with pytest.raises(ValueError, match="resident_fraction"):
        ActivationOffloader(layers, resident_fraction=1.5)
    with pytest.raises(ValueError, match="policy"):
        ActivationOffloader(layers, resident_fraction=0.5, policy="random")
    with pytest.raises(ValueError, match="attn_keep"):
        ActivationOffloader(layers, resident_fraction=0.5, policy="sparsity")
    checkpointed = tiny_llama(layers=2).train()
    checkpointed.gradient_checkpointing_enable()
    with (
        pytest.raises(ValueError, match="offload_checkpoints"),
        ActivationOffloader(list(checkpointed.model.layers), budgets=[0, 0]),
    ):
        pass


def test_a_forward_without_grad_does_not_calibrate():
    """Calibration needs a forward that saves: a no-grad one first would set every budget to 0 bytes."""
    model = tiny_llama(layers=2)
    ids = torch.randint(0, VOCAB, (1, 64))
    offloader = ActivationOffloader.for_model(model, list(model.model.layers), resident_fraction=1.0, min_bytes=0)
    with torch.no_grad(), offloader:
        model(input_ids=ids)
    assert offloader.budgets is None
    _grads(model, ids, offloader)
    _grads(model, ids, offloader)
    assert sum(offloader.offloaded) == 0 and sum(offloader.resident) == sum(offloader.saved) > 0

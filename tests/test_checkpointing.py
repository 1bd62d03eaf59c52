"""Partly offloaded checkpoints (`jenga.checkpointing`): which layers go to the host, and unchanged gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_llama

from jenga import apply_jenga
from jenga.checkpointing import offload_checkpoints
from jenga.experiments.training import add_attention_lora


def _loss_and_grads(fraction: float | None, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    model = add_attention_lora(tiny_llama(layers=4)).train()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_jenga(model)
    entered = []
    original = torch.autograd.graph.save_on_cpu

    @contextlib.contextmanager
    def spy(*args, **kwargs):
        entered.append(kwargs)
        with original(*args, **{**kwargs, "pin_memory": False}):  # no pinned memory without a GPU
            yield

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", spy)
    if fraction is not None:
        assert offload_checkpoints(model, fraction) == list(range(4 - round(fraction * 4), 4))
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(entered)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_offloaded_layers_and_gradients(monkeypatch, fraction):
    """The last `fraction` of the checkpointed layers keep their inputs on the host (one `save_on_cpu` per such
    layer and step); loss and LoRA gradients equal checkpointing without offload."""
    ref_loss, ref_grads, none = _loss_and_grads(None, monkeypatch)
    loss, grads, entered = _loss_and_grads(fraction, monkeypatch)
    assert none == 0 and entered == round(fraction * 4)
    torch.testing.assert_close(loss, ref_loss)
    assert ref_grads.keys() == grads.keys() and ref_grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_offload_needs_checkpointing_and_a_share():
    model = add_attention_lora(tiny_llama(layers=2))
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        offload_checkpoints(model, 0.5)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        offload_checkpoints(model, 0.0)


def test_a_share_of_k_layers_offloads_k_layers():
    """7/25 of 25 layers is 7 layers, although 7 / 25 * 25 is 7.000000000000001 in floating point (the share the
    runner's "fit" offloading computes from a count of layers)."""
    model = add_attention_lora(tiny_llama(layers=25))
    model.gradient_checkpointing_enable()
    assert offload_checkpoints(model, 7 / 25) == list(range(18, 25))

"""Partly offloaded checkpoints (`jenga.checkpointing`): which layers go to the host, and unchanged gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_llama

from jenga import JengaConfig, apply_jenga
from jenga.checkpointing import group_checkpoints, offload_checkpoints
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


def _grouped_step(
    size: int, config: JengaConfig, offload: float | None = None, monkeypatch=None, mlp_recompute: bool = False
):
    """Loss, LoRA gradients, forwards per layer and checkpoint regions of one step with `size` layers per group."""
    torch.manual_seed(0)
    model = add_attention_lora(tiny_llama(layers=4)).train()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_jenga(model, config, mlp_recompute=mlp_recompute)
    layers = model.base_model.model.model.layers
    regions, forwards = [], [0] * len(layers)
    for i, layer in enumerate(layers):
        inner = layer._gradient_checkpointing_func

        def counted(function, *args, _inner=inner, _i=i, **kwargs):
            regions.append(_i)
            return _inner(function, *args, **kwargs)

        layer._gradient_checkpointing_func = counted
        layer.register_forward_pre_hook(lambda module, args, _i=i: forwards.__setitem__(_i, forwards[_i] + 1))
    groups = group_checkpoints(model, size) if size > 1 else None
    if offload is not None:
        original = torch.autograd.graph.save_on_cpu
        monkeypatch.setattr(  # no pinned memory without a GPU
            torch.autograd.graph, "save_on_cpu", lambda *a, **k: original(*a, **{**k, "pin_memory": False})
        )
        groups = (groups, offload_checkpoints(model, offload))
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, forwards, regions, groups


@pytest.mark.parametrize(
    "config,mlp_recompute",
    [(JengaConfig(), False), (JengaConfig(), True), (JengaConfig(attn_keep=0.5, mlp_keep=0.5, block_size=16), False)],
)
@pytest.mark.parametrize("size,groups", [(2, [[0, 1], [2, 3]]), (3, [[0, 1, 2], [3]])])
def test_grouped_checkpoints_recompute_each_layer_once_with_unchanged_gradients(config, mlp_recompute, size, groups):
    """A group is one checkpoint region (entered once per step) whose layers all run again in backward: each
    layer runs twice, as with a checkpoint per layer; loss and LoRA gradients are those of per-layer checkpoints,
    with the recomputing MLP and with elimination too (the recompute reuses each layer's selection)."""
    ref_loss, ref_grads, ref_forwards, ref_regions, _ = _grouped_step(1, config, mlp_recompute=mlp_recompute)
    loss, grads, forwards, regions, found = _grouped_step(size, config, mlp_recompute=mlp_recompute)
    assert found == groups and ref_regions == [0, 1, 2, 3] and regions == [g[0] for g in groups]
    assert forwards == ref_forwards == [2, 2, 2, 2]
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_offloading_counts_a_group_as_one_checkpoint(monkeypatch):
    """Half of two grouped checkpoints is the last group; its region runs under `save_on_cpu` once per step."""
    entered = []
    original = torch.autograd.graph.save_on_cpu

    @contextlib.contextmanager
    def spy(*args, **kwargs):
        entered.append(kwargs)
        with original(*args, **{**kwargs, "pin_memory": False}):
            yield

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", spy)
    loss, grads, forwards, regions, (groups, offloaded) = _grouped_step(2, JengaConfig(), 0.5, monkeypatch)
    ref_loss, ref_grads, *_ = _grouped_step(1, JengaConfig())
    assert groups == [[0, 1], [2, 3]] and offloaded == [1] and len(entered) == 1
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_grouping_rejects_bad_sizes_repeats_and_mixed_attention_types():
    model = add_attention_lora(tiny_llama(layers=4))
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        group_checkpoints(model, 2)
    model.gradient_checkpointing_enable(every_n_layers=2)
    with pytest.raises(ValueError, match="every decoder layer checkpointed"):
        group_checkpoints(model, 2)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="positive number of layers"):
        group_checkpoints(model, 0)
    layers = model.base_model.model.model.layers
    layers[1].attention_type = "sliding_attention"
    with pytest.raises(ValueError, match=r"layers \[0, 1\] mix attention types"):
        group_checkpoints(model, 2)
    del layers[1].attention_type
    group_checkpoints(model, 2)
    with pytest.raises(ValueError, match="grouped already"):
        group_checkpoints(model, 2)

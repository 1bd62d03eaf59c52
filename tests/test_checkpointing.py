"""Checkpointing that holds fewer bytes or recomputes less (`jenga.checkpointing`): which layers go to the host,
which are grouped, what the recompute reuses, and unchanged gradients."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from jenga import JengaConfig, apply_jenga, checkpointing
from jenga.checkpointing import (
    ATTENTION_OPS,
    checkpoint_first,
    fit_checkpoints,
    group_checkpoints,
    offload_checkpoints,
    reset_checkpoints,
    save_attention,
)
from jenga.experiments.training import add_attention_lora


@dataclass
class Step:
    """One training step of a 4-layer checkpointed LoRA model under Jenga, and what it ran."""

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    forwards: list[int]  # forward calls per layer (the first pass and the backward's recompute)
    regions: list[int]  # the layers whose checkpoint function ran, in order
    groups: list[list[int]] | None  # `group_checkpoints`' answer
    offloaded: list[int] | None  # `offload_checkpoints`' answer
    attention_calls: int  # SDPA kernel forwards run in the step (the first pass and the recompute)


class AttentionCalls(TorchDispatchMode):
    """Counts the SDPA kernel forwards that run (a selective checkpoint's cached ones never reach it)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def _checkpointed_lora_model(config: JengaConfig | None = None, **patch) -> torch.nn.Module:
    """A 4-layer LoRA Llama in training mode with non-zero adapters, non-reentrant checkpointing and Jenga."""
    torch.manual_seed(0)
    model = add_attention_lora(tiny_llama(layers=4)).train()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_jenga(model, config or JengaConfig(), **patch)


def _step(
    size: int = 1,
    config: JengaConfig | None = None,
    offload: float | None = None,
    attention: bool = False,
    first: int | None = None,
    **patch,
) -> Step:
    """`first` layers checkpointed (`checkpoint_first`; all when None), then `size` layers per checkpoint, then
    `offload` of the checkpoints on the host, then `save_attention` if `attention`; `patch`: `apply_jenga`'s."""
    model = _checkpointed_lora_model(config, **patch)
    if first is not None:
        assert checkpoint_first(model, first) == list(range(min(first, 4), 4))
    layers = model.base_model.model.model.layers
    regions, forwards = [], [0] * len(layers)
    for i, layer in enumerate(layers):
        inner = layer._gradient_checkpointing_func

        def counted(function, *args, _inner=inner, _i=i, **kwargs):
            regions.append(_i)
            return _inner(function, *args, **kwargs)

        layer._gradient_checkpointing_func = counted
        # the layer's first norm: newer transformers recompute a layer's `forward` without the layer's own hooks
        count = lambda m, args, _i=i: forwards.__setitem__(_i, forwards[_i] + 1)  # noqa: E731
        layer.input_layernorm.register_forward_pre_hook(count)
    groups = group_checkpoints(model, size) if size > 1 else None
    offloaded = offload_checkpoints(model, offload) if offload is not None else None
    if attention:
        assert save_attention(model) == len(groups or [layer for layer in layers if layer.gradient_checkpointing])
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1))
    with AttentionCalls() as calls:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return Step(loss.detach(), grads, forwards, regions, groups, offloaded, calls.count)


def assert_same_training(step: Step, reference: Step) -> None:
    torch.testing.assert_close(step.loss, reference.loss)
    assert step.grads.keys() == reference.grads.keys() and step.grads
    for name, grad in step.grads.items():
        torch.testing.assert_close(grad, reference.grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_offloaded_layers_and_gradients(offload_calls, fraction):
    """The last `fraction` of the checkpointed layers keep their inputs on the host (one `offloaded_saves` per such
    layer and step); loss and LoRA gradients equal checkpointing without offload."""
    reference = _step()
    assert not offload_calls
    step = _step(offload=fraction)
    assert step.offloaded == list(range(4 - round(fraction * 4), 4)) and len(offload_calls) == round(fraction * 4)
    assert_same_training(step, reference)


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


@pytest.mark.parametrize(
    "config,mlp_recompute",
    [(JengaConfig(), False), (JengaConfig(), True), (JengaConfig(attn_keep=0.5, mlp_keep=0.5, block_size=16), False)],
)
@pytest.mark.parametrize("size,groups", [(2, [[0, 1], [2, 3]]), (3, [[0, 1, 2], [3]])])
def test_grouped_checkpoints_recompute_each_layer_once_with_unchanged_gradients(config, mlp_recompute, size, groups):
    """A group is one checkpoint region (entered once per step) whose layers all run again in backward: each
    layer runs twice, as with a checkpoint per layer; loss and LoRA gradients are those of per-layer checkpoints,
    with the recomputing MLP and with elimination too (the recompute reuses each layer's selection)."""
    reference = _step(1, config, mlp_recompute=mlp_recompute)
    step = _step(size, config, mlp_recompute=mlp_recompute)
    assert step.groups == groups and reference.regions == [0, 1, 2, 3] and step.regions == [g[0] for g in groups]
    assert step.forwards == reference.forwards == [2, 2, 2, 2]
    assert_same_training(step, reference)


def test_offloading_counts_a_group_as_one_checkpoint(offload_calls):
    """Half of two grouped checkpoints is the last group; its region runs under `offloaded_saves` once per step."""
    step = _step(2, offload=0.5)
    assert step.groups == [[0, 1], [2, 3]] and step.offloaded == [1] and len(offload_calls) == 1
    assert_same_training(step, _step())


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
    group_checkpoints(model, 2)
    with pytest.raises(ValueError, match="grouped already"):
        group_checkpoints(model, 2)


def test_grouping_rejects_groups_of_sliding_window_and_full_attention_layers():
    """Qwen2 with sliding windows past its first layer: the config's `layer_types` say which layers slide (the
    layers themselves carry no `attention_type`); a group mixing both would run every layer with the first's
    mask."""
    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, use_sliding_window=True, sliding_window=32, max_window_layers=1, use_cache=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = add_attention_lora(Qwen2ForCausalLM(config))
    assert config.layer_types == ["full_attention"] + ["sliding_attention"] * 3
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match=r"layers \[0, 1\] mix attention types"):
        group_checkpoints(model, 2)
    assert group_checkpoints(model, 1) == [[0], [1], [2], [3]]


@pytest.mark.parametrize("config", [JengaConfig(), JengaConfig(attn_keep=0.5, mlp_keep=0.5, block_size=16)])
@pytest.mark.parametrize("size,offload", [(1, None), (2, None), (2, 0.5)])
def test_saved_attention_runs_attention_once_with_unchanged_gradients(offload_calls, config, size, offload):
    """With `save_attention` the backward's recompute reuses every SDPA kernel output of the forward: half the
    attention forwards of plain checkpointing (the rest of each layer still runs twice), the same loss and LoRA
    gradients; grouped and offloaded checkpoints too, and with elimination (its kept and dense passes)."""
    reference = _step(size, config, offload)
    step = _step(size, config, offload, attention=True)
    assert reference.attention_calls >= 8 and step.attention_calls * 2 == reference.attention_calls
    assert step.forwards == reference.forwards == [2, 2, 2, 2]
    assert len(offload_calls) == (0 if offload is None else 2)  # one offloaded group, in each of the two steps
    assert_same_training(step, reference)


def test_saved_attention_needs_sdpa_and_non_reentrant_checkpointing():
    model = add_attention_lora(tiny_llama(layers=2))
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        save_attention(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="non-reentrant"):
        save_attention(model)
    grouped = add_attention_lora(tiny_llama(layers=2))  # the check looks under the wraps of the other two
    grouped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    group_checkpoints(grouped, 2)
    with pytest.raises(ValueError, match="non-reentrant"):
        save_attention(grouped)
    eager = tiny_llama(layers=2)
    eager.set_attn_implementation("eager")
    eager = add_attention_lora(eager)
    eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        save_attention(eager)


def test_enabling_checkpointing_again_for_part_of_a_group_is_an_error():
    """Enabling checkpointing anew (as the Trainer does) keeps the groups, but not when it leaves a group's layers
    differently checkpointed: the group would run an unchecked member twice."""
    model = add_attention_lora(tiny_llama(layers=4))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    group_checkpoints(model, 2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=2)
    ids = torch.randint(0, 128, (1, 64))
    with pytest.raises(ValueError, match="only some layers of a checkpoint group"):
        model(input_ids=ids, labels=ids)


def test_a_deep_copy_of_a_grouped_model_trains_its_own_layers():
    """An EMA or reference model is a deep copy: its groups run its own layers (the checkpoint function object is
    shared with the original's), so changing the original's weights changes nothing of the copy's step, and the
    copy's gradients land on the copy."""
    import copy

    from jenga import remove_jenga

    model = _checkpointed_lora_model(JengaConfig(fp8_activations=False))  # exact against the unpatched model
    group_checkpoints(model, 2)
    twin = copy.deepcopy(model)
    reference = copy.deepcopy(twin)
    remove_jenga(reference)
    reference.gradient_checkpointing_disable()
    with torch.no_grad():
        for p in model.base_model.model.model.layers[1].parameters():
            p.add_(0.5)
    ids = torch.randint(0, 128, (1, 128), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (twin, reference):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert all(p.grad is None for p in model.parameters())


def test_offloading_runs_once_and_after_grouping():
    """Offloading acts per checkpoint: a second call, or grouping after it, would change what the first call
    said it offloaded, so both are errors."""
    model = add_attention_lora(tiny_llama(layers=4))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offload_checkpoints(model, 1.0)
    with pytest.raises(ValueError, match="offloaded already"):
        offload_checkpoints(model, 0.25)
    with pytest.raises(ValueError, match="group first"):
        group_checkpoints(model, 2)
    attention = add_attention_lora(tiny_llama(layers=4))
    attention.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    save_attention(attention)
    with pytest.raises(ValueError, match="group first"):
        group_checkpoints(attention, 2)


def test_a_fractional_group_size_is_an_error():
    model = add_attention_lora(tiny_llama(layers=4))
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="positive number of layers, got 1.5"):
        group_checkpoints(model, 1.5)


def test_reset_checkpoints_undoes_grouping_offload_and_saved_attention(offload_calls):
    """After `reset_checkpoints` every layer is its own checkpoint again, nothing is offloaded, attention runs
    again in the recompute, also once checkpointing is enabled anew (the Trainer); the step is plain
    checkpointing's."""
    model = _checkpointed_lora_model()
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    group_checkpoints(model, 2)
    offload_checkpoints(model, 1.0)
    save_attention(model)
    reset_checkpoints(model)
    model.gradient_checkpointing_enable(**kwargs)
    ids = torch.randint(0, 128, (1, 128), generator=torch.Generator().manual_seed(1))
    with AttentionCalls() as calls:
        model(input_ids=ids, labels=ids).loss.backward()
    assert calls.count == 8 and not offload_calls  # 4 layers, each attention in the forward and the recompute
    assert group_checkpoints(model, 2) == [[0, 1], [2, 3]]  # grouping is possible again


def _forward_counts(model: torch.nn.Module) -> list[int]:
    """Forward calls per decoder layer in one training step (the first pass and any recompute)."""
    layers = model.base_model.model.model.layers
    counts = [0] * len(layers)
    hooks = [
        layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, layer in enumerate(layers)
    ]
    ids = torch.randint(0, 128, (1, 128), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    return counts


@pytest.mark.parametrize("config", [JengaConfig(), JengaConfig(attn_keep=0.5, mlp_keep=0.5, block_size=16)])
@pytest.mark.parametrize("first,forwards", [(0, [1, 1, 1, 1]), (2, [2, 2, 1, 1]), (4, [2, 2, 2, 2])])
def test_checkpointing_the_first_layers_recomputes_only_them_with_unchanged_gradients(config, first, forwards):
    """`checkpoint_first(model, n)`: the first n layers are checkpoints (run again in backward), the others keep
    their activations (run once); loss and LoRA gradients are those of checkpointing every layer, with
    elimination too. It combines with offloading and saved attention, which act on the checkpoints it leaves."""
    reference = _step(config=config)
    step = _step(config=config, first=first)
    assert step.forwards == forwards and step.regions == list(range(first))
    assert_same_training(step, reference)
    if first == 2:
        assert_same_training(_step(config=config, first=first, offload=1.0, attention=True), reference)


def test_checkpointing_the_first_layers_after_saving_attention():
    """`save_attention`, then `checkpoint_first` (the runner's `+fitattnckpt` order): the checkpointed layers'
    recompute reuses their attention outputs, so attention runs once per layer; loss and gradients unchanged.
    Offloading before it is an error."""
    reference = _step()
    model = _checkpointed_lora_model()
    save_attention(model)
    assert checkpoint_first(model, 2) == [2, 3]
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1))
    with AttentionCalls() as calls:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert calls.count == 4 and reference.attention_calls == 8
    assert_same_training(Step(loss.detach(), grads, [], [], None, None, calls.count), reference)
    model.zero_grad()
    assert _forward_counts(model) == [2, 2, 1, 1]
    reset_checkpoints(model)
    offload_checkpoints(model, 0.5)
    with pytest.raises(ValueError, match="offload_checkpoints ran before checkpoint_first"):
        checkpoint_first(model, 2)


def test_checkpointing_the_first_layers_survives_reenabling_and_reset():
    """The Trainer enables checkpointing again (every layer's flag set): the unchecked layers stay unchecked;
    `reset_checkpoints` checks them again, also across a further enabling."""
    model = _checkpointed_lora_model()
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    assert checkpoint_first(model, 1) == [1, 2, 3]
    model.gradient_checkpointing_enable(**kwargs)
    assert _forward_counts(model) == [2, 1, 1, 1]
    reset_checkpoints(model)
    assert _forward_counts(model) == [2, 2, 2, 2]
    model.gradient_checkpointing_enable(**kwargs)
    assert _forward_counts(model) == [2, 2, 2, 2]


def test_checkpointing_the_first_layers_rejects_bad_counts_and_orders():
    model = add_attention_lora(tiny_llama(layers=4))
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        checkpoint_first(model, 2)
    model.gradient_checkpointing_enable(every_n_layers=2)
    with pytest.raises(ValueError, match="every_n_layers=1"):
        checkpoint_first(model, 2)
    model.gradient_checkpointing_enable()
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="number of layers"):
            checkpoint_first(model, bad)
    group_checkpoints(model, 2)
    with pytest.raises(ValueError, match="call checkpoint_first first"):
        checkpoint_first(model, 2)


class FakeMemory:
    """Allocator counters for `fit_checkpoints` on the CPU, answering in call order: `allocated` from a list (the
    two measured layers' forwards, before and after each), `peaks` from a list of (allocated, reserved) GiB (to the
    last layer's backward, then after it)."""

    def __init__(self, allocated_gib: list[float], peaks_gib: list[tuple[float, float]]) -> None:
        self.values = [v * 2**30 for v in allocated_gib]
        self.peak_values = [(a * 2**30, r * 2**30) for a, r in peaks_gib]
        self.resets = 0

    def allocated(self) -> int:
        return self.values.pop(0)

    def peaks(self) -> tuple[float, float]:
        return self.peak_values.pop(0)

    def reset_peak(self) -> None:
        self.resets += 1


@pytest.mark.parametrize(
    "recompute,budget,unchecked",
    [
        (8, 14.5, [1, 2, 3]),
        (8, 10.4, []),
        (8, 100.0, [0, 1, 2, 3]),
        (8, 11.0, [3]),
        (13, 13.1, []),
        (13, 15, [1, 2, 3]),
    ],
)
def test_fitting_checkpoints_leaves_as_many_last_layers_as_the_budget_holds(monkeypatch, recompute, budget, unchecked):
    """The measured step runs once with the last layer unchecked; the third layer's forward grew the allocated
    bytes by 1 GiB (its output and saved attention), the last one's by 3 (its output and activations): 2 GiB per
    unchecked layer, less the checkpointed layer's input, which it no longer keeps. Up to the last
    layer's backward the allocated peak was 10 GiB (reserved 10.5), after it `recompute` (reserved 0.2 more):
    each further unchecked layer adds 2 GiB to the first peak only; the reserved slack (0.5, or 0.2 where the
    recompute's peak is the higher) counts against the budget. Below either peak every layer stays checkpointed."""
    memory = FakeMemory([5.0, 6.0, 6.0, 9.0], [(10.0, 10.5), (recompute, recompute + 0.2)])
    monkeypatch.setattr(checkpointing, "_memory", lambda device: memory)
    model = _checkpointed_lora_model()
    flags = []

    def step():
        flags.append([layer.gradient_checkpointing for layer in model.base_model.model.model.layers])
        ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()

    fit = fit_checkpoints(model, step, budget)
    assert all(p.grad is None for p in model.parameters())  # as before the measured step
    assert flags == [[True, True, True, False]] and memory.resets == 2 and not memory.values and not memory.peak_values
    # less the third layer's checkpoint: its input (64 tokens of fp32 hidden states), freed where it is unchecked
    checkpoint_gib = 64 * model.config.hidden_size * 4 / 2**30
    assert fit.unchecked == unchecked and fit.layer_gib == pytest.approx(2.0 - checkpoint_gib, rel=1e-12)
    assert fit.unchecked_peak_gib == 10.0
    assert fit.recompute_peak_gib == recompute and fit.slack_gib == pytest.approx(0.5 if recompute < 10 else 0.2)
    assert _forward_counts(model) == [1 if i in unchecked else 2 for i in range(4)]


@pytest.mark.parametrize("alloc_conf", [None, "expandable_segments:True", "max_split_size_mb:128"])
def test_a_fit_that_the_allocators_reserve_cost_layers_says_how_to_reserve_less(monkeypatch, caplog, alloc_conf):
    """The reserved bytes above the measured peak count against the budget (7 GiB here, 3 of 4 layers kept
    checkpointed that the allocated bytes would have left unchecked): the fit warns once and names the allocator's
    expandable segments, unless they are on already."""
    from jenga import messages

    monkeypatch.setattr(messages, "_warned", set())
    if alloc_conf is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", alloc_conf)
    memory = FakeMemory([5.0, 6.0, 6.0, 9.0], [(10.0, 17.0), (8.0, 8.2)])
    monkeypatch.setattr(checkpointing, "_memory", lambda device: memory)
    model = _checkpointed_lora_model()

    def step():
        ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()

    with caplog.at_level("WARNING", logger="jenga"):
        fit = fit_checkpoints(model, step, 18.0)
    assert fit.unchecked == [3] and fit.slack_gib == pytest.approx(7.0)
    warned = [r.getMessage() for r in caplog.records if "reserved 7.0 GiB" in r.getMessage()]
    if alloc_conf == "expandable_segments:True":
        assert warned == []
    else:
        assert len(warned) == 1 and "kept 3 more layer(s) checkpointed" in warned[0]
        assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in warned[0]


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_fitting_checkpoints_to_a_batch_shape_steps_on_random_tokens_of_that_shape(monkeypatch, autocast):
    """`fit_checkpoints_to` hands `fit_checkpoints` a step of rows × tokens random ids as their own labels, under
    the autocast asked for, and the budget given; a bad length is an error before anything runs."""
    monkeypatch.setattr(checkpointing, "_memory", lambda device: None)
    seen = []

    def fake_fit(model, step, budget):
        seen.append(budget)
        step()
        return "fit"

    monkeypatch.setattr(checkpointing, "fit_checkpoints", fake_fit)
    model = _checkpointed_lora_model()
    inputs = []
    model.base_model.model.model.layers[0].register_forward_pre_hook(
        lambda m, args: inputs.append((args[0].shape, torch.is_autocast_enabled("cpu")))
    )
    fit = checkpointing.fit_checkpoints_to(model, 64, rows=3, budget_gib=7.5, autocast=autocast)
    assert fit == "fit" and seen == [7.5] and inputs[0] == ((3, 64, model.config.hidden_size), autocast is not None)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # the step ran backward
    with pytest.raises(ValueError, match="positive number of tokens"):
        checkpointing.fit_checkpoints_to(model, 0)


def test_fitting_checkpoints_needs_a_gpu_and_more_saved_bytes_unchecked(monkeypatch):
    model = _checkpointed_lora_model()
    with pytest.raises(ValueError, match="CUDA device.*checkpoint_first"):
        fit_checkpoints(model, lambda: None, 10.0)
    reset_checkpoints(model)
    memory = FakeMemory([5.0, 6.0, 6.0, 6.5], [(10.0, 10.5), (8.0, 9.0)])
    monkeypatch.setattr(checkpointing, "_memory", lambda device: memory)
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="expected more"):
        fit_checkpoints(model, lambda: model(input_ids=ids, labels=ids).loss.backward(), 20.0)
    reset_checkpoints(model)
    memory = FakeMemory([5.0, 6.0, 6.0, 9.0], [])
    with pytest.raises(RuntimeError, match="forward and backward"):  # a step without backward
        fit_checkpoints(model, lambda: model(input_ids=ids, labels=ids), 20.0)
    layers = model.base_model.model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)  # as before the call, also after a failed step

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        fit_checkpoints(model, out_of_memory, 20.0)
    assert all(layer.gradient_checkpointing for layer in layers) and _forward_counts(model) == [2, 2, 2, 2]

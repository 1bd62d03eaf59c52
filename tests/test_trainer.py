"""Jenga through `transformers.Trainer` with default arguments: the patched forward must keep its signature,
since `remove_unused_columns=True` keeps only the dataset columns that `forward` names."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import transformers.modeling_utils
from conftest import add_lora, batch, tiny_llama
from transformers import Trainer, TrainingArguments

from jenga import JengaConfig, apply_jenga, checkpointing, jenga_state
from jenga.checkpointing import FitCheckpointsCallback, group_checkpoints, offload_checkpoints, save_attention

KEEP_ALL = JengaConfig(fp8_activations=False)  # no elimination, nothing rounded: exactly the unpatched model


def dataset(rows: int = 4, seq: int = 256) -> list[dict]:
    """Dicts as a tokenized dataset gives them, plus a column the model does not take (the Trainer drops it)."""
    ids = batch(rows, seq)
    return [{"input_ids": r, "labels": r.clone(), "source": torch.tensor(i)} for i, r in enumerate(ids)]


def build(jenga: JengaConfig | None, order: str = "after_peft", layers: int = 3):
    base = tiny_llama(layers=layers)
    if jenga is not None and order == "before_peft":
        apply_jenga(base, jenga)
    model = add_lora(base)
    if jenga is not None and order == "after_peft":
        apply_jenga(model, jenga)
    return model


# The Trainer's checkpointing switch: `gradient_checkpointing`, renamed `activation_checkpointing` in newer
# transformers (the old name deprecated), which the newest-transformers CI job then exercises.
CHECKPOINTING_ARGUMENT = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in TrainingArguments.__dataclass_fields__
)


def train(model, tmp_path, checkpointing: bool = False, callbacks: list | None = None) -> tuple[float, Trainer]:
    """Two steps with default `TrainingArguments` (bar output, length, batch, reporting and device)."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        **{CHECKPOINTING_ARGUMENT: checkpointing},
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
    trainer.train()
    return trainer.state.log_history[-1]["train_loss"], trainer


@pytest.fixture(scope="module")
def reference_loss(tmp_path_factory) -> float:
    return train(build(None), tmp_path_factory.mktemp("reference"))[0]


@pytest.mark.parametrize("order", ["before_peft", "after_peft"])
def test_patched_forward_keeps_signature(order):
    model = build(KEEP_ALL, order)
    base = model.get_base_model()
    names = inspect.signature(base.forward).parameters
    assert "input_ids" in names and "labels" in names
    attn = base.model.layers[0].self_attn
    assert "forward" in attn.__dict__
    assert (
        list(inspect.signature(attn.forward).parameters) == list(inspect.signature(type(attn).forward).parameters)[1:]
    )


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("order", ["before_peft", "after_peft"])
def test_trainer_default_arguments_match_unpatched(tmp_path, reference_loss, order, checkpointing):
    loss, trainer = train(build(KEEP_ALL, order), tmp_path, checkpointing)
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "labels"} <= set(trainer._signature_columns)
    assert set(next(iter(trainer.get_train_dataloader()))) == {"input_ids", "labels"}
    assert math.isclose(loss, reference_loss, rel_tol=1e-5), (loss, reference_loss)


def test_trainer_default_config_trains_close_to_unpatched(tmp_path, reference_loss):
    """The default (no elimination, float8-saved activations) under the Trainer's default arguments: the forward
    is the model's, the rounded gradients move the loss by far less than 1%."""
    model = build(JengaConfig(), layers=3)
    loss, _ = train(model, tmp_path, checkpointing=True)
    assert jenga_state(model).config.fp8_activations is True and not jenga_state(model).last_selection
    assert math.isclose(loss, reference_loss, rel_tol=1e-3), (loss, reference_loss)


def test_trainer_elimination_trains_sparse(tmp_path):
    # keep 0.9 with the smallest blocks, so 256 tokens are 16 blocks and one is dropped; layers 0-1 and the last
    # stay dense: layer 2 is sparse
    model = build(JengaConfig(block_size=16, attn_keep=0.9), layers=4)
    loss, _ = train(model, tmp_path, checkpointing=True)
    assert math.isfinite(loss)
    kept = {i: s.num_kept for i, s in jenga_state(model).last_selection.items()}
    assert 0 < kept[2] < 2 * 256


def test_trainer_keeps_the_checkpointing_it_enables_again(tmp_path, monkeypatch, offload_calls):
    """`TrainingArguments(gradient_checkpointing=True)` (`activation_checkpointing` in newer transformers) makes
    the Trainer enable checkpointing again as training starts, which sets every layer's checkpoint function anew:
    grouped, offloaded and attention-saving checkpoints come through it (per step: one checkpoint region per group
    of two layers, the last group offloaded, each region keeping its attention outputs)."""
    model = build(JengaConfig(), layers=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    group_checkpoints(model, 2)
    offload_checkpoints(model, 0.5)
    save_attention(model)
    regions = []
    checkpoint = transformers.modeling_utils.checkpoint

    def counted(*args, **kwargs):
        regions.append(kwargs.get("context_fn"))
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)
    loss, _ = train(model, tmp_path, checkpointing=True)
    assert math.isfinite(loss)
    assert len(regions) == 2 * 2 and all(regions), regions
    assert len(offload_calls) == 2


def test_trainer_fits_checkpoints_with_the_callback(tmp_path, monkeypatch):
    """`FitCheckpointsCallback` runs one measured step of the batch shape (2 rows of 256 tokens) as training
    begins, after the Trainer enabled checkpointing (the allocator's counters faked as in test_checkpointing: 2 GiB
    per unchecked layer less the checkpoint's input, a 10 GiB peak, 0.5 of slack, so a 12.6 GiB budget leaves 2
    layers); the Trainer then trains with the last two layers unchecked, run once per step where the first two
    run twice, to the loss of every layer checkpointed; a later `train()` keeps the fit. Without checkpointing, or
    off the GPU without fakes, it is an error that says what to do."""
    from test_checkpointing import FakeMemory

    reference_loss = train(build(KEEP_ALL, layers=4), tmp_path / "reference", checkpointing=True)[0]
    memory = FakeMemory([5.0, 6.0, 6.0, 9.0], [(10.0, 10.5), (8.0, 9.0)])
    monkeypatch.setattr(checkpointing, "_memory", lambda device: memory)
    model = build(KEEP_ALL, layers=4)
    forwards = [0] * 4
    for i, layer in enumerate(model.get_base_model().model.layers):
        layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: forwards.__setitem__(i, forwards[i] + 1))
    callback = FitCheckpointsCallback(tokens=256, budget_gib=12.6)
    loss, trainer = train(model, tmp_path, checkpointing=True, callbacks=[callback])
    assert callback.fit.unchecked == [2, 3] and callback.fit.unchecked_peak_gib == 10.0
    # the measured step (only the last layer unchecked), then two training steps (the last two unchecked)
    assert forwards == [2 + 2 * 2, 2 + 2 * 2, 2 + 2 * 1, 1 + 2 * 1], forwards
    assert math.isclose(loss, reference_loss, rel_tol=1e-5), (loss, reference_loss)
    trainer.train()  # no second measurement: the fake counters are spent
    assert [layer.gradient_checkpointing for layer in model.get_base_model().model.layers] == [True, True, False, False]

    with pytest.raises(ValueError, match="gradient_checkpointing=True"):
        train(build(KEEP_ALL), tmp_path / "off", callbacks=[FitCheckpointsCallback(tokens=256)])
    monkeypatch.undo()
    with pytest.raises(ValueError, match="CUDA device"):
        train(build(KEEP_ALL), tmp_path / "cpu", checkpointing=True, callbacks=[FitCheckpointsCallback(tokens=256)])
    with pytest.raises(ValueError, match="positive"):
        FitCheckpointsCallback(tokens=0)

"""Mistakes a user can make, each caught early with a message that names the fix; and inputs that must not
fail silently (a KV cache in a training forward, left padding)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import batch, tiny_llama

from jenga import JengaConfig, JengaConfigError, UnsupportedModelError, apply_jenga, jenga_state, messages
from jenga.elimination import select_blocks
from jenga.patching import base


def test_apply_jenga_rejects_a_dict_config():
    with pytest.raises(TypeError, match=r"JengaConfig\(\*\*d\)"):
        apply_jenga(tiny_llama(), {"attn_keep": 0.5})
    with pytest.raises(TypeError, match="takes a JengaConfig"):
        apply_jenga(tiny_llama(), 0.5)


def test_apply_jenga_rejects_a_scorer_beside_a_predictor():
    """The predictor brings its own scorer; taking both would drop one without a word."""
    model = tiny_llama()
    with pytest.raises(TypeError, match="a scorer or a predictor, not both"):
        apply_jenga(model, JengaConfig(), scorer=lambda *args: None, predictor="unused-folder")
    assert jenga_state(model) is None


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_apply_jenga_rejects_attention_it_cannot_serve(impl):
    model = tiny_llama()
    model.config._attn_implementation = impl  # as loading with attn_implementation=impl sets it
    with pytest.raises(UnsupportedModelError, match=rf"'sdpa' or 'eager', not '{impl}'"):
        apply_jenga(model)
    assert jenga_state(model) is None


def test_apply_jenga_accepts_eager_and_sdpa_masked_custom_attention():
    from jenga.experiments import longlora

    for impl in ("eager", longlora.register()):
        model = tiny_llama()
        model.config._attn_implementation = impl
        assert jenga_state(apply_jenga(model)) is not None


@pytest.mark.parametrize("block_size", [1, 8])
def test_block_size_has_a_minimum(block_size):
    with pytest.raises(JengaConfigError, match=r"power of two >= 16 .*got " + str(block_size)):
        JengaConfig(block_size=block_size)
    assert JengaConfig(block_size=16).block_size == 16


def test_from_json_names_a_missing_file(tmp_path):
    missing = tmp_path / "jenga.json"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        JengaConfig.from_json(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        JengaConfig.from_json(str(missing))
    JengaConfig(block_size=32).to_json(missing)
    assert JengaConfig.from_json(missing).block_size == 32
    assert JengaConfig.from_json(' {"block_size": 128}').block_size == 128


@pytest.mark.parametrize("name", base.KV_CACHE_ARGS)
def test_drop_kv_cache_handles_both_argument_names(name, caplog, monkeypatch):
    monkeypatch.setattr(messages, "_warned", set())
    call = {"hidden_states": torch.zeros(1), name: object()}
    with caplog.at_level(logging.WARNING, logger="jenga"):
        base.drop_kv_cache(call)
        base.drop_kv_cache({name: object()})
    assert call[name] is None and call["hidden_states"] is not None
    assert sum("KV cache" in r.message for r in caplog.records) == 1
    untouched = {"hidden_states": 1}
    base.drop_kv_cache(untouched)
    assert untouched == {"hidden_states": 1}


def test_sparse_training_forward_with_a_kv_cache_warns_and_matches(caplog, monkeypatch):
    """The cache argument is `past_key_values` before transformers 5.24 and `cache` since; either way a sparse
    training forward drops it (eliminated tokens would be missing from it) and computes what it would without."""
    monkeypatch.setattr(messages, "_warned", set())
    config = JengaConfig(block_size=16, attn_keep=0.5, dense_first_layers=0)
    ids = batch(2, 128)
    reference = apply_jenga(tiny_llama(), config)(input_ids=ids, labels=ids, use_cache=False).loss
    with caplog.at_level(logging.WARNING, logger="jenga"):
        loss = apply_jenga(tiny_llama(), config)(input_ids=ids, labels=ids, use_cache=True).loss
    assert any("KV cache" in r.message for r in caplog.records)
    torch.testing.assert_close(loss, reference)


def test_left_padding_keeps_the_first_real_block_as_the_sink():
    scores = torch.tensor([[0.0, 0.0, 1.0, 5.0, 9.0, 2.0], [3.0, 1.0, 0.5, 4.0, 9.0, 2.0]])
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])  # row 0 left-padded by 2 blocks
    kept = select_blocks(scores, 3, sink_blocks=1, block_valid=valid, recent_blocks=1)
    assert kept.tolist() == [[2, 4, 5], [0, 4, 5]]

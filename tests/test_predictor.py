"""Block predictors: shapes, elastic pruning, save/load, predictor-mode selection, training pipeline, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import add_lora, batch, lora_grads, tiny_llama, write_token_jsonl
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from jenga import JengaConfig, apply_jenga
from jenga.experiments.predictor_train import LayerSamples, listwise_loss, main, positional_prior_recall, topk_recall
from jenga.predictor import BlockPredictor, PredictorBundle, PredictorMismatchError
from jenga.predictor.model import Tower
from jenga.scoring import block_scores

CONFIG = JengaConfig(block_size=16, attn_keep=0.5, mlp_keep=1.0, dense_first_layers=1, dense_last_layer=True)


def test_shapes_batch_padding_and_odd_length():
    predictor = BlockPredictor(64, units=32, out_dim=8)
    hidden = torch.randn(3, 100, 64)
    valid = torch.ones(3, 100, dtype=torch.bool)
    valid[2, 40:] = False
    tiles = predictor.tile_scores(hidden, 16, valid)
    assert tiles.shape == (3, 7, 7) and torch.equal(tiles.triu(1), torch.zeros_like(tiles))
    assert (tiles[2, :, 3:] == 0).all() and (tiles[2, 3:, :] == 0).all()
    assert predictor.block_scores(hidden, 16, valid).shape == (3, 7)


def test_pruning_drops_dead_units_and_keeps_outputs():
    torch.manual_seed(0)
    tower = Tower(16, 12, 4)
    with torch.no_grad():
        tower.fc1.bias[[1, 5, 7]] = -1e4  # never active
    x = torch.randn(50, 16)
    tower.train()
    before_out = tower(x)
    before_hidden = torch.relu(tower.fc1(x))
    assert tower.prune(threshold=0.01) == 3 and tower.units == 9
    keep = [i for i in range(12) if i not in (1, 5, 7)]
    torch.testing.assert_close(torch.relu(tower.fc1(x)), before_hidden[:, keep])
    torch.testing.assert_close(tower(x), before_out)
    assert tower.prune(threshold=0.0) == 0  # activity was reset; nothing below zero


def test_save_load_roundtrip_with_pruned_sizes(tmp_path):
    torch.manual_seed(1)
    bundle = PredictorBundle(64, 3, [1], CONFIG, units=32, out_dim=8)
    with torch.no_grad():
        bundle[1].key.fc1.bias[:10] = -1e4
    bundle.train()
    hidden = torch.randn(2, 80, 64)
    bundle[1].block_scores(hidden, 16)
    bundle[1].prune(0.01)
    bundle.eval()
    bundle.save(tmp_path)
    loaded = PredictorBundle.load(tmp_path)
    assert loaded.sizes() == bundle.sizes() and loaded.sizes()[1]["key_units"] == 22
    assert loaded.config == CONFIG
    torch.testing.assert_close(loaded[1].block_scores(hidden, 16), bundle[1].block_scores(hidden, 16))


class OracleStub(BlockPredictor):
    """A 'predictor' that computes the exact oracle from the layer's own projections."""

    def __init__(self, model, layer_idx):
        super().__init__(64, units=1, out_dim=1)
        # A tuple keeps the model's modules out of this module's tree (bundle.eval() must not reach them).
        self.refs = (model.model.layers[layer_idx].self_attn, model.model.rotary_emb)

    def block_scores(self, hidden, block_size, valid=None):
        attn, rotary = self.refs
        bsz, seq, _ = hidden.shape
        q = attn.q_proj(hidden).view(bsz, seq, -1, 16).transpose(1, 2)
        k = attn.k_proj(hidden).view(bsz, seq, -1, 16).transpose(1, 2)
        cos, sin = rotary(hidden, torch.arange(seq)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return block_scores(q, k, block_size, attn.scaling, valid)


def test_predictor_mode_matches_oracle_mode_with_exact_stub():
    ids = batch(2, 100)

    def run(use_stub: bool):
        model = add_lora(tiny_llama(kv_heads=2))
        base = model.get_base_model()
        if use_stub:
            bundle = PredictorBundle(64, 3, [1], CONFIG)
            bundle.predictors["1"] = OracleStub(base, 1)
            apply_jenga(model, CONFIG, predictor=bundle)
        else:
            apply_jenga(model, CONFIG)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss, lora_grads(model)

    oracle_loss, oracle_grads = run(False)
    stub_loss, stub_grads = run(True)
    torch.testing.assert_close(stub_loss, oracle_loss)
    for name, grad in oracle_grads.items():
        torch.testing.assert_close(stub_grads[name], grad)


def test_mismatched_predictor_errors():
    model = tiny_llama()
    with pytest.raises(PredictorMismatchError, match="4 layers of hidden size 64.*3 layers"):
        apply_jenga(model, CONFIG, predictor=PredictorBundle(64, 4, [1, 2], CONFIG))
    with pytest.raises(PredictorMismatchError, match="hidden size 32"):
        apply_jenga(model, CONFIG, predictor=PredictorBundle(32, 3, [1], CONFIG))
    wider = JengaConfig(block_size=16, attn_keep=0.5, dense_first_layers=0)
    with pytest.raises(PredictorMismatchError, match=r"layers \[0\] sparse"):
        apply_jenga(model, wider, predictor=PredictorBundle(64, 3, [1], CONFIG))
    with pytest.raises(FileNotFoundError, match="jenga.experiments.predictor_train"):
        apply_jenga(model, CONFIG, predictor="/nonexistent/folder")


def test_ranking_helpers():
    oracle = torch.tensor([[5.0, 1.0, 3.0, 0.0, 4.0]])
    assert topk_recall(oracle * 2, oracle, keep=3, sinks=1) == 1.0
    assert topk_recall(-oracle, oracle, keep=3, sinks=1) == pytest.approx(1 / 3)
    assert listwise_loss(oracle * 10, oracle) < listwise_loss(-oracle * 10, oracle)


def test_positional_prior_recall_is_exact_on_a_fixed_pattern_and_blind_to_input():
    pattern = torch.tensor([9.0, 1.0, 2.0, 8.0, 3.0, 7.0, 0.0, 6.0])
    fixed = {2: LayerSamples(pooled=[torch.zeros(4, 8, 16)], oracle=[pattern.expand(4, 8).clone()])}
    flipped = {2: LayerSamples(pooled=[torch.zeros(4, 8, 16)], oracle=[(-pattern).expand(4, 8).clone()])}
    config = JengaConfig(block_size=16, attn_keep=0.5, dense_first_layers=2, sink_blocks=1, recent_blocks=0)
    assert positional_prior_recall(fixed, fixed, config, num_layers=4) == {2: 1.0}
    assert positional_prior_recall(fixed, flipped, config, num_layers=4)[2] < 0.5


def test_training_pipeline_cli(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama(kv_heads=2).save_pretrained(model_dir)
    data = write_token_jsonl(tmp_path / "data.jsonl", sequences=6, length=260)
    (tmp_path / "config.json").write_text(CONFIG.to_json())
    out = tmp_path / "pred"
    main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--config",
            str(tmp_path / "config.json"),
            "--seq-len",
            "128",
            "--steps",
            "30",
            "--units",
            "32",
            "--out-dim",
            "8",
            "--prune-every",
            "10",
            "--key-pieces",
            "4",
            "--rope-pairs",
            "2",
        ]
    )
    assert PredictorBundle.load(out).design == {"key_pieces": 4, "rope_pairs": 2}
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert records[0]["record"] == "header"
    assert (records[0]["key_pieces"], records[0]["rope_pairs"]) == (4, 2)
    steps = [r for r in records if r["record"] == "step"]
    assert len(steps) == 30 and any("pruned" in r for r in steps)
    evaluation = records[-1]
    assert evaluation["record"] == "eval" and 0.0 <= evaluation["mean_recall"] <= 1.0
    assert 0.0 <= evaluation["mean_positional_prior_recall"] <= 1.0
    model = add_lora(tiny_llama(kv_heads=2))
    apply_jenga(model, predictor=out)
    ids = batch(1, 128)
    model(input_ids=ids, labels=ids).loss.backward()


def test_bad_data_errors(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"tokens": [1, 2]}) + "\n")
    model_dir = tmp_path / "m"
    tiny_llama().save_pretrained(model_dir)
    with pytest.raises(ValueError, match="input_ids` or `text`"):
        main(["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--seq-len", "16"])


def test_predictors_refuse_a_config_of_another_block_size(tmp_path):
    """Key pieces and block positions are learned at the training block size; another one is refused at apply."""
    import dataclasses

    PredictorBundle(64, 3, [1], CONFIG, units=16, out_dim=8).save(tmp_path)
    with pytest.raises(PredictorMismatchError, match="blocks of 16 tokens.*blocks of 32"):
        apply_jenga(tiny_llama(), dataclasses.replace(CONFIG, block_size=32), predictor=tmp_path)


def test_the_predictor_scorer_follows_the_hidden_states_device():
    """The bundle is no submodule of the model: a model moved after apply_jenga (a Trainer's model.to(device))
    must not leave it behind. The meta device stands in for an accelerator."""
    bundle = PredictorBundle(64, 3, [1], CONFIG, units=16, out_dim=8)
    scores = bundle.scorer()(1, torch.zeros(2, 64, 64, device="meta"), None, 16, None)
    assert scores.shape == (2, 4) and scores.device.type == "meta"


def test_scores_in_inference_mode_leave_training_possible():
    """Cached rotation and causal tables made under inference mode must not break a later backward."""
    from jenga.predictor.model import _causal, _rotation

    _causal.cache_clear()
    _rotation.cache_clear()
    predictor = BlockPredictor(64, units=16, out_dim=8, key_pieces=4, rope_pairs=2)
    hidden = torch.randn(1, 80, 64)
    with torch.inference_mode():
        predictor.block_scores(hidden, 16)
    predictor.block_scores(hidden, 16).sum().backward()
    assert predictor.query.fc1.weight.grad is not None

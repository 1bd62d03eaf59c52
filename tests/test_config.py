"""JengaConfig validation, schedules and JSON round trip."""

from __future__ import annotations

import pytest

from jenga import JengaConfig, JengaConfigError


def test_rule_schedule_and_explicit_list():
    cfg = JengaConfig(attn_keep=0.25, dense_first_layers=2, dense_last_layer=True)
    assert cfg.attn_schedule(6) == [1.0, 1.0, 0.25, 0.25, 0.25, 1.0]
    assert cfg.mlp_schedule(3) == [1.0, 1.0, 1.0]
    explicit = JengaConfig(attn_keep=[0.5, 0.75, 1.0])
    assert explicit.attn_schedule(3) == [0.5, 0.75, 1.0]
    with pytest.raises(JengaConfigError, match="lists 3 ratios but the model has 4 layers"):
        explicit.attn_schedule(4)


def test_json_roundtrip(tmp_path):
    cfg = JengaConfig(block_size=128, attn_keep=[0.5, 1.0], mlp_keep=0.3, sink_blocks=2, loss_chunk_tokens=0)
    assert JengaConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "jenga.json"
    cfg.to_json(path)
    assert JengaConfig.from_json(path) == cfg
    with pytest.raises(JengaConfigError, match="unknown JengaConfig fields"):
        JengaConfig.from_dict({"block_sz": 64})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 48}, "power of two"),
        ({"block_size": 0}, "power of two"),
        ({"attn_keep": 0.0}, r"attn_keep must be a keep ratio in \(0, 1\]"),
        ({"attn_keep": 1.5}, r"\(0, 1\]"),
        ({"mlp_keep": [0.5, -1.0]}, r"mlp_keep\[1\]"),
        ({"attn_keep": []}, "empty"),
        ({"loss_chunk_tokens": -1}, "loss_chunk_tokens"),
        ({"mlp_chunk_tokens": 0}, "mlp_chunk_tokens"),
        ({"shared_selection": "yes"}, "shared_selection"),
        ({"fp8_activations": 1}, "fp8_activations"),
        ({"dense_first_layers": True}, "dense_first_layers"),
        ({"attn_keep": [1.0, 0.5], "mlp_keep": [1.0, 0.5], "dense_first_layers": 1}, "both per-layer lists"),
        ({"schema_version": 2}, "from_dict"),
        ({"sink_blocks": -2}, "sink_blocks"),
        ({"recent_blocks": -1}, "recent_blocks"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(JengaConfigError, match=match):
        JengaConfig(**kwargs)


def test_older_schemas_translate():
    """Schema 1-5 dicts (logs, predictor bundles) load with renamed fields and without removed ones."""
    v1 = {
        "block_size": 64,
        "attn_keep": [1.0, 0.5],
        "mlp_keep": [1.0, 1.0],
        "dense_first_layers": 2,
        "dense_last_layer": True,
        "segment_size": 512,
        "mlp_chunk": 2048,
        "eliminated_local": True,
        "scoring": "predictor",
        "lean_lora": False,
        "lean_norms": True,
    }
    cfg = JengaConfig.from_dict(v1)
    assert (cfg.loss_chunk_tokens, cfg.mlp_chunk_tokens, cfg.eliminated) == (512, 2048, "dense")
    assert cfg.dense_first_layers is None and cfg.schema_version == 6
    v2 = {**JengaConfig().to_dict(), "schema_version": 2, "segment_size": 0, "scoring": "oracle"}
    del v2["loss_chunk_tokens"]
    assert JengaConfig.from_dict(v2).loss_chunk_tokens == 0
    # a keep ratio or fp8 switch missing from an older dict is that schema's default, not today's
    for version, keep in ((1, (0.5, 1.0)), (3, (0.5, 0.5)), (5, (0.9, 1.0))):
        old = {"schema_version": version, "block_size": 64}
        cfg = JengaConfig.from_dict(old)
        assert (cfg.attn_keep, cfg.mlp_keep, cfg.fp8_activations) == (*keep, False)
    today = JengaConfig()
    assert (today.attn_keep, today.mlp_keep, today.fp8_activations) == (1.0, 1.0, None)
    v4 = {**JengaConfig().to_dict(), "schema_version": 4, "mlp_fp8": True}
    del v4["fp8_activations"]
    assert JengaConfig.from_dict(v4).fp8_activations
    with pytest.raises(JengaConfigError, match="unknown"):
        JengaConfig.from_dict({"schema_version": 9})
    assert JengaConfig.from_dict(JengaConfig(attn_keep=0.25).to_dict()) == JengaConfig(attn_keep=0.25)


def test_sparse_layers():
    assert JengaConfig(attn_keep=0.5, dense_first_layers=2).sparse_layers(5) == [2, 3]
    assert JengaConfig(attn_keep=[1.0, 0.3, 1.0]).sparse_layers(3) == [1]


def test_kept_blocks_respects_sinks_and_minimum():
    cfg = JengaConfig(sink_blocks=3, recent_blocks=0)
    assert cfg.kept_blocks(10, 0.1) == 3
    assert JengaConfig(sink_blocks=3, recent_blocks=2).kept_blocks(10, 0.1) == 5
    assert cfg.kept_blocks(10, 0.55) == 6
    assert cfg.kept_blocks(2, 0.5) == 2

"""apply_jenga on tiny Llama / GQA Llama / OPT models: exactness, elimination semantics, memory, robustness."""

from __future__ import annotations

import copy
import functools
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import MODEL_BUILDERS, add_lora, batch, lora_grads, tiny_llama, tiny_opt
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from jenga import (
    JengaConfig,
    JengaConfigError,
    UnsupportedModelError,
    apply_jenga,
    attention,
    jenga_state,
    remove_jenga,
)
from jenga.profiling import SavedTensorMeter


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def loss_and_grads(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, **kwargs).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


DENSE = JengaConfig(block_size=32, attn_keep=1.0, mlp_keep=1.0, loss_chunk_tokens=64, fp8_activations=False)


@pytest.mark.parametrize("order", ["after_peft", "before_peft"])
def test_elimination_off_matches_unpatched(family, order):
    ids = batch(2, 150)
    reference = add_lora(MODEL_BUILDERS[family]())
    ref_loss, ref_grads = loss_and_grads(reference, ids)

    base = MODEL_BUILDERS[family]()
    if order == "before_peft":
        apply_jenga(base, DENSE)
        model = add_lora(base)
    else:
        model = apply_jenga(add_lora(base), DENSE)
    loss, grads = loss_and_grads(model, ids)

    assert rel_err(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name


def _naive_kept_attention(model, layer_idx, x, kept):
    """Reference attention of one layer over the kept positions only, causal by original position."""
    family = model.config.model_type
    attn = (model.model.decoder.layers if family == "opt" else model.model.layers)[layer_idx].self_attn
    outs = []
    for b in range(x.shape[0]):
        pos = kept[b]
        xs = x[b : b + 1, pos]
        heads = model.config.num_attention_heads
        hd = model.config.hidden_size // heads
        q = attn.q_proj(xs).view(1, len(pos), -1, hd).transpose(1, 2)
        k = attn.k_proj(xs).view(1, len(pos), -1, hd).transpose(1, 2)
        v = attn.v_proj(xs).view(1, len(pos), -1, hd).transpose(1, 2)
        if family == "opt":
            q, scale, o_proj = q * attn.scaling, 1.0, attn.out_proj
        else:
            cos, sin = model.model.rotary_emb(xs, pos[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            scale, o_proj = attn.scaling, attn.o_proj
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        logits = (q @ k.transpose(-1, -2)) * scale
        causal = pos[:, None] >= pos[None, :]
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        outs.append(o_proj((probs @ v).transpose(1, 2).reshape(1, len(pos), -1)))
    return outs


def _layer_qkv(model, layer_idx, x):
    """One layer's q (rotated; OPT's scaled), k, v as (B, heads, S, d), the logits' scale and the output projection."""
    family = model.config.model_type
    attn = (model.model.decoder.layers if family == "opt" else model.model.layers)[layer_idx].self_attn
    bsz, seq, _ = x.shape
    hd = model.config.hidden_size // model.config.num_attention_heads
    q, k, v = (proj(x).view(bsz, seq, -1, hd).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    if family == "opt":
        return q * attn.scaling, k, v, 1.0, attn.out_proj
    cos, sin = model.model.rotary_emb(x, torch.arange(seq)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v, attn.scaling, attn.o_proj


def _naive_statistics_attention(model, layer_idx, x, kept):
    """Reference of `eliminated="dense"`: one layer's exact attention over every token, differentiable only
    through (kept query, kept key) pairs (`jenga.attention.reference`); eliminated rows' outputs of the output
    projection are detached too."""
    q, k, v, scale, o_proj = _layer_qkv(model, layer_idx, x)
    bsz, seq, _ = x.shape
    is_kept = torch.zeros(bsz, seq, dtype=torch.bool)
    for b in range(bsz):
        is_kept[b, kept[b]] = True
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    out = attention.reference(q, k, v, is_kept, causal, scale).transpose(1, 2).reshape(bsz, seq, -1)
    y = o_proj(out)
    return torch.where(is_kept[..., None], y, y.detach())


def _oracle_kept_blocks(model, layer_idx, x, block_size, keep_blocks, sink, recent=0):
    """Top blocks by the oracle score, computed here from the full S×S matrix (independent of scoring.py)."""
    q, k, _, scale, _ = _layer_qkv(model, layer_idx, x)
    bsz, seq, _ = x.shape
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    full = ((q @ k.transpose(-1, -2)) * scale).relu().sum(1).tril()
    nb = math.ceil(seq / block_size)
    scores = torch.zeros(bsz, nb)
    for j in range(nb):
        cols = full[:, :, j * block_size : (j + 1) * block_size]
        for i in range(nb):
            scores[:, j] += cols[:, i * block_size : (i + 1) * block_size].amax(dim=(1, 2))
    scores[:, :sink] = float("inf")
    scores[:, nb - recent :] = float("inf")
    return scores.topk(keep_blocks, dim=1).indices.sort(dim=1).values


@pytest.mark.parametrize("seq,explicit_mask", [(200, False), (256, False), (200, True)])
def test_zero_elimination_kept_and_eliminated_match_reference(family, seq, explicit_mask):
    """With `eliminated="zero"`, kept blocks attend causally over the kept subset; eliminated blocks output zero."""
    model = MODEL_BUILDERS[family]()
    bs, layer = 32, 1
    config = JengaConfig(
        block_size=bs,
        attn_keep=0.5,
        dense_first_layers=0,
        dense_last_layer=False,
        sink_blocks=1,
        eliminated="zero",
    )
    apply_jenga(model, config)
    torch.manual_seed(3)
    x = torch.randn(2, seq, model.config.hidden_size)
    x[0, 96:128] *= 8  # give each sequence a different high-energy block
    x[1, 160:192] *= 8
    attn = (model.model.decoder.layers if family == "opt" else model.model.layers)[layer].self_attn
    kwargs = {}
    if family != "opt":
        pos = torch.arange(seq)[None]
        kwargs = {"position_embeddings": model.model.rotary_emb(x, pos), "position_ids": pos}
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(2, 1, seq, seq) if explicit_mask else None
    nb = math.ceil(seq / bs)
    with torch.no_grad():
        out, _ = attn(hidden_states=x, attention_mask=mask, **kwargs)
        blocks = _oracle_kept_blocks(model, layer, x, bs, config.kept_blocks(nb, 0.5), 1, config.recent_blocks)
        kept = [torch.cat([torch.arange(b * bs, min((b + 1) * bs, seq)) for b in row]) for row in blocks]
        reference = _naive_kept_attention(model, layer, x, kept)
    assert not torch.equal(kept[0], kept[1]), "test needs sequences with different kept sets"
    for b in range(2):
        torch.testing.assert_close(out[b, kept[b]], reference[b][0], rtol=1e-5, atol=1e-5)
        dropped = [j for j in range(nb) if j not in blocks[b].tolist()]
        assert dropped
        for j in dropped:
            rows = torch.arange(j * bs, min((j + 1) * bs, seq))
            assert torch.count_nonzero(out[b, rows]) == 0


@pytest.mark.parametrize("seq,explicit_mask", [(200, False), (256, True)])
def test_dense_elimination_forward_is_dense_and_gradient_flows_through_kept_subset(family, seq, explicit_mask):
    """`eliminated="dense"`: every output equals the unpatched attention's; gradients (input and LoRA) equal
    autograd through the naive reference `dense.detach() + kept_rows(sparse - sparse.detach())`, where
    `sparse` is the dense attention differentiable through kept pairs only (`_naive_statistics_attention`)."""
    model = add_lora(MODEL_BUILDERS[family]())
    bs, layer = 32, 1
    config = JengaConfig(
        block_size=bs, attn_keep=0.5, dense_first_layers=0, dense_last_layer=False, mlp_keep=1.0, fp8_activations=False
    )
    base = model.get_base_model()
    attn = (base.model.decoder.layers if family == "opt" else base.model.layers)[layer].self_attn
    torch.manual_seed(3)
    x0 = torch.randn(2, seq, base.config.hidden_size)
    x0[0, 96:128] *= 8
    x0[1, 160:192] *= 8
    weight = torch.randn(2, seq, base.config.hidden_size)
    kwargs = {}
    if family != "opt":
        pos = torch.arange(seq)[None]
        kwargs = {"position_embeddings": base.model.rotary_emb(x0, pos), "position_ids": pos}
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(2, 1, seq, seq) if explicit_mask else None
    nb = math.ceil(seq / bs)
    with torch.no_grad():
        blocks = _oracle_kept_blocks(base, layer, x0, bs, config.kept_blocks(nb, 0.5), 1, config.recent_blocks)
    kept = [torch.cat([torch.arange(b * bs, min((b + 1) * bs, seq)) for b in row]) for row in blocks]

    def grads_of(out, x):
        model.zero_grad(set_to_none=True)
        (out * weight).sum().backward()
        return {"input": x.grad, **{n: p.grad.clone() for n, p in attn.named_parameters() if p.requires_grad}}

    x_ref = x0.clone().requires_grad_(True)
    with torch.no_grad():
        dense = type(attn).forward(attn, hidden_states=x0, attention_mask=mask, **kwargs)[0]
    sparse = _naive_statistics_attention(base, layer, x_ref, kept)
    reference = grads_of(dense + (sparse - sparse.detach()), x_ref)

    apply_jenga(model, config)
    x = x0.clone().requires_grad_(True)
    out = attn(hidden_states=x, attention_mask=mask, **kwargs)[0]
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
    got = grads_of(out, x)
    assert set(got) == set(reference)
    for name, grad in reference.items():
        assert grad.abs().sum() > 0 and rel_err(got[name], grad) < 1e-5, name
    eliminated = torch.ones(2, seq, dtype=torch.bool)
    for b in range(2):
        eliminated[b, kept[b]] = False
    assert torch.count_nonzero(got["input"][eliminated]) == 0  # eliminated rows carry no attention gradient


def test_mixed_partial_block_batch_uses_masked_path():
    """One sequence keeps the partial last block, the other eliminates it: outputs still exact."""
    model = tiny_llama(kv_heads=2)
    bs, seq = 32, 200  # 7 blocks, the last holds 8 tokens

    def forced(layer_idx, hidden, valid, block_size, query_key):
        scores = torch.zeros(2, 7)
        scores[0, [2, 6]] = 1.0  # keeps the partial block
        scores[1, [3, 5]] = 1.0
        return scores

    config = JengaConfig(
        block_size=bs, attn_keep=3 / 7, dense_first_layers=0, dense_last_layer=False, recent_blocks=0, eliminated="zero"
    )
    apply_jenga(model, config, scorer=forced)
    torch.manual_seed(4)
    x = torch.randn(2, seq, 64)
    pos = torch.arange(seq)[None]
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        out, _ = attn(
            hidden_states=x, attention_mask=None, position_embeddings=model.model.rotary_emb(x, pos), position_ids=pos
        )
        kept = [
            torch.cat([torch.arange(0, 32), torch.arange(64, 96), torch.arange(192, 200)]),
            torch.cat([torch.arange(0, 32), torch.arange(96, 128), torch.arange(160, 192)]),
        ]
        reference = _naive_kept_attention(model, 0, x, kept)
    for b in range(2):
        torch.testing.assert_close(out[b, kept[b]], reference[b][0], rtol=1e-5, atol=1e-5)
        eliminated = torch.ones(seq, dtype=torch.bool)
        eliminated[kept[b]] = False
        assert torch.count_nonzero(out[b, eliminated]) == 0  # sequence 1's partial last block too


def _saved_bytes(model, ids) -> int:
    with SavedTensorMeter.for_model(model) as meter:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    return meter.bytes


def _sublayer_bytes(module, *args, **kwargs) -> int:
    with SavedTensorMeter.for_model(module) as meter:
        out = module(*args, **kwargs)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    return meter.bytes


def test_saved_activation_bytes_fall_by_expected_fraction():
    seq, bsz, bs, attn_keep, mlp_keep = 256, 2, 32, 0.5, 0.25
    ids = batch(bsz, seq)
    model = add_lora(tiny_llama(kv_heads=2))
    dense = _saved_bytes(model, ids)

    base = model.get_base_model()
    layers = base.model.layers
    x = torch.randn(bsz, seq, 64, requires_grad=True)
    pos = torch.arange(seq)[None]
    attn_dense = _sublayer_bytes(
        layers[0].self_attn,
        hidden_states=x,
        attention_mask=None,
        position_embeddings=base.model.rotary_emb(x, pos),
    )
    mlp_dense = _sublayer_bytes(layers[0].mlp, x)

    config = JengaConfig(
        block_size=bs, attn_keep=attn_keep, mlp_keep=mlp_keep, dense_first_layers=0, dense_last_layer=False
    )
    apply_jenga(model, config)
    model.zero_grad(set_to_none=True)
    sparse = _saved_bytes(model, ids)

    # From shapes: the sparse MLP saves gate and up pre-activations of the kept channels (fp32) plus their
    # indices; attention's saved tensors are per token, so they scale with the kept fraction; the selection
    # adds one int64 index per kept token; the dense pass for eliminated tokens saves nothing.
    num_layers, channels = len(layers), base.config.intermediate_size
    kept_channels = math.ceil(mlp_keep * channels)
    mlp_sparse = 2 * bsz * seq * kept_channels * 4 + bsz * kept_channels * 8
    kept_tokens = int(attn_keep * seq)
    expected_saving = num_layers * (mlp_dense - mlp_sparse + attn_dense * (1 - attn_keep) - bsz * kept_tokens * 8)
    assert expected_saving > 0.3 * dense
    assert dense - sparse >= expected_saving, (dense, sparse, expected_saving)
    grads = lora_grads(model)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_padding_odd_length_ignored_labels(family, dtype):
    model = add_lora(MODEL_BUILDERS[family]().to(dtype))
    config = JengaConfig(block_size=16, attn_keep=0.4, mlp_keep=0.5, dense_first_layers=1, loss_chunk_tokens=50)
    apply_jenga(model, config)
    ids = batch(2, 133)
    mask = torch.ones_like(ids)
    mask[1, 90:] = 0
    labels = ids.clone()
    labels[1, 90:] = -100
    labels[0, :20] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = lora_grads(model)
    assert all(torch.isfinite(g.float()).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    state = jenga_state(model)
    nb = math.ceil(133 / 16)
    assert state.last_selection[1].num_kept <= config.kept_blocks(nb, 0.4) * 16


def test_padding_blocks_never_selected():
    model = tiny_llama()
    kept_sets = {}

    def recording(layer_idx, hidden, valid, block_size, query_key):
        from jenga.elimination import oracle_scorer

        scores = oracle_scorer(layer_idx, hidden, valid, block_size, query_key)
        kept_sets[layer_idx] = valid
        return scores

    apply_jenga(model, JengaConfig(block_size=16, attn_keep=0.5, dense_first_layers=0), scorer=recording)
    ids = batch(2, 128)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    model(input_ids=ids, attention_mask=mask, labels=ids)
    valid = kept_sets[0]
    assert valid is not None and valid[1, :40].all() and not valid[1, 40:].any() and valid[0].all()


def test_eval_mode_is_dense_and_remove_restores(family):
    ids = batch(1, 96)
    model = MODEL_BUILDERS[family]()
    model.eval()
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
    train_ref = model.train()(input_ids=ids, labels=ids).loss.item()
    apply_jenga(model, JengaConfig(block_size=16, attn_keep=0.3, dense_first_layers=0, mlp_keep=0.3))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref_logits)
    model.train()
    assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(train_ref, rel=1e-6)  # dense forward
    remove_jenga(model)
    apply_jenga(model, JengaConfig(block_size=16, attn_keep=0.3, dense_first_layers=0, eliminated="zero"))
    assert model(input_ids=ids, labels=ids).loss.item() != pytest.approx(train_ref, rel=1e-4)
    remove_jenga(model)
    assert jenga_state(model) is None
    assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(train_ref, rel=1e-6)


def test_state_dict_keys_unchanged(family):
    model = add_lora(MODEL_BUILDERS[family]())
    keys = list(model.state_dict())
    apply_jenga(model, JengaConfig())
    assert list(model.state_dict()) == keys


@pytest.mark.integration
def test_peft_jenga_checkpoint_roundtrip_without_jenga(tmp_path):
    base = tiny_llama(kv_heads=2)
    base.save_pretrained(tmp_path / "base")
    model = apply_jenga(add_lora(base), JengaConfig(block_size=16, attn_keep=0.5, mlp_keep=0.5))
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = batch(1, 128)
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        root = {str(tmp_path)!r}
        data = torch.load(root + "/expected.pt")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + "/base"), root + "/adapter")
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=data["ids"]).logits, data["logits"], rtol=1e-4, atol=1e-4)
        model.merge_and_unload().save_pretrained(root + "/merged")
        merged = AutoModelForCausalLM.from_pretrained(root + "/merged").eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=data["ids"]).logits, data["logits"], rtol=1e-4, atol=1e-4)
        assert not any(name.startswith("jenga") for name in sys.modules)
        print("roundtrip ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "roundtrip ok" in result.stdout


def test_unsupported_model_error():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="llama.*opt|OPTForCausalLM"):
        apply_jenga(gpt2, JengaConfig())


def test_schedule_length_mismatch():
    with pytest.raises(JengaConfigError, match="3 layers"):
        apply_jenga(tiny_opt(), JengaConfig(attn_keep=[0.5, 0.5]))


def test_double_apply_and_remove_errors():
    model = tiny_opt()
    apply_jenga(model, JengaConfig())
    with pytest.raises(RuntimeError, match="already applied"):
        apply_jenga(model, JengaConfig())
    remove_jenga(model)
    with pytest.raises(RuntimeError, match="not applied"):
        remove_jenga(model)


def test_trainable_mlp_uses_dense_path_and_logs_once(caplog):
    from jenga import messages

    messages._warned.discard("mlp-dense")
    model = add_lora(tiny_llama(), targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    apply_jenga(model, JengaConfig(block_size=16, attn_keep=1.0, mlp_keep=0.25))
    ids = batch(1, 64)
    with caplog.at_level("WARNING", logger="jenga"):
        model(input_ids=ids, labels=ids).loss.backward()
        model(input_ids=ids, labels=ids).loss.backward()
    assert sum("dense MLP path" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("family_name", ["mistral", "qwen2"])
def test_llama_family_relatives(family_name):
    """Mistral (sliding-window mask) and Qwen2 (q/k/v bias) share the Llama adapter."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family_name]
    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4)
    common.update(num_key_value_heads=2, vocab_size=128, use_cache=False, attn_implementation="sdpa")
    extra = {"sliding_window": 64} if family_name == "mistral" else {}

    def build():
        torch.manual_seed(0)
        return add_lora(model_cls(config_cls(**common, **extra)).train())

    ids = batch(2, 150)
    ref_loss, ref_grads = loss_and_grads(build(), ids)
    model = apply_jenga(build(), DENSE)
    loss, grads = loss_and_grads(model, ids)
    assert rel_err(loss, ref_loss) < 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name
    remove_jenga(model)
    apply_jenga(model, JengaConfig(block_size=16, attn_keep=0.4, mlp_keep=0.5, dense_first_layers=0))
    sparse_loss, sparse_grads = loss_and_grads(model, ids)
    assert rel_err(sparse_loss, loss) < 1e-5  # the forward stays dense; the backward is sparse
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in sparse_grads.values())
    assert max(rel_err(g, grads[name]) for name, g in sparse_grads.items()) > 1e-2


def test_gradient_checkpointing_gives_same_gradients(family, monkeypatch):
    """With checkpointing, selection is recomputed in backward; it must pick the same blocks."""
    from transformers import modeling_utils

    # transformers' offloaded checkpoints pin host memory, which needs an accelerator: unpinned on the CPU.
    unpinned = functools.partial(torch.autograd.graph.save_on_cpu, pin_memory=False)
    monkeypatch.setattr(
        modeling_utils, "save_on_cpu", lambda pin_memory, device_type: unpinned(device_type=device_type)
    )
    ids = batch(2, 160)
    config = JengaConfig(block_size=16, attn_keep=0.4, mlp_keep=0.5, dense_first_layers=0)

    calls = []

    def counting(*args):
        from jenga.elimination import oracle_scorer

        calls.append(args[0])
        return oracle_scorer(*args)

    def run(checkpointing: bool, reentrant: bool = False, offload: bool = False):
        base = MODEL_BUILDERS[family]()
        if checkpointing:
            kwargs = {"use_reentrant": reentrant}
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, offload=offload)
            base.enable_input_require_grads()
        model = apply_jenga(add_lora(base), config, scorer=counting)
        return loss_and_grads(model, ids)

    sparse_layers = config.sparse_layers(3)
    ref_loss, ref_grads = run(False)
    assert sorted(calls) == sparse_layers
    # Reentrant and not, and transformers' offloaded checkpoints (held in host memory: the runner's +offckpt).
    for reentrant, offload in ((False, False), (True, False), (False, True)):
        calls.clear()
        loss, grads = run(True, reentrant, offload)
        assert sorted(calls) == sparse_layers, "the recompute must reuse the forward's selection"
        assert rel_err(loss, ref_loss) < 1e-6
        for name, grad in grads.items():
            assert rel_err(grad, ref_grads[name]) < 1e-5, name


def test_opt_350m_shape_projected_embeddings_and_post_norm():
    """OPT-350m projects 512-wide embeddings to hidden 1024 and normalizes after each sublayer."""
    from transformers import OPTConfig, OPTForCausalLM

    def build():
        torch.manual_seed(0)
        config = OPTConfig(
            hidden_size=64,
            ffn_dim=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=128,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
            dropout=0.0,
            use_cache=False,
        )
        return add_lora(OPTForCausalLM(config).train())

    ids = batch(2, 120)
    ref_loss, ref_grads = loss_and_grads(build(), ids)
    loss, grads = loss_and_grads(apply_jenga(build(), DENSE), ids)
    assert rel_err(loss, ref_loss) < 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name
    sparse = apply_jenga(build(), JengaConfig(block_size=16, attn_keep=0.5, mlp_keep=0.5, dense_first_layers=0))
    sparse_loss, _ = loss_and_grads(sparse, ids)
    assert torch.isfinite(sparse_loss)


def test_shared_selection_scores_once_and_matches_one_selection_everywhere(family):
    """With `shared_selection`, the first sparse layer scores and the others reuse its blocks: the step equals
    one where every layer's scorer returns the first layer's scores, with one scoring call per forward (also
    under checkpointing, and after a change of length)."""
    config = JengaConfig(block_size=16, attn_keep=0.4, mlp_keep=0.5, dense_first_layers=0, shared_selection=True)
    calls = []

    def by_position(layer_idx, hidden, token_valid, block_size, query_key):
        """The same scores in every layer for a given shape, so the unshared run selects alike everywhere."""
        calls.append(layer_idx)
        nb = math.ceil(hidden.shape[1] / block_size)
        generator = torch.Generator().manual_seed(nb)
        return torch.rand(hidden.shape[0], nb, generator=generator)

    def run(shared: bool, ids: torch.Tensor, checkpointing: bool = False):
        base = MODEL_BUILDERS[family]()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        model = apply_jenga(
            add_lora(base),
            config if shared else JengaConfig(**{**config.to_dict(), "shared_selection": False}),
            scorer=by_position,
        )
        return loss_and_grads(model, ids)

    first = config.sparse_layers(3)[0]
    for seq in (160, 96):
        ids = batch(2, seq)
        calls.clear()
        ref_loss, ref_grads = run(False, ids)
        assert sorted(calls) == config.sparse_layers(3)
        for checkpointing in (False, True):
            calls.clear()
            loss, grads = run(True, ids, checkpointing)
            assert calls == [first]
            assert rel_err(loss, ref_loss) < 1e-6
            for name, grad in grads.items():
                assert rel_err(grad, ref_grads[name]) < 1e-5, name
    model = apply_jenga(add_lora(MODEL_BUILDERS[family]()), config, scorer=by_position)
    for seq in (160, 96, 160):
        calls.clear()
        loss_and_grads(model, batch(2, seq))
        assert calls == [first], "a new length must be scored, not served the last length's selection"


def test_shared_selection_is_the_first_sparse_layers_only():
    """A layer keeping a different number of blocks scores for itself and does not replace the shared
    selection: the next layer with the first layer's keep still reuses it."""
    config = JengaConfig(block_size=16, attn_keep=[0.5, 0.25, 0.5], mlp_keep=1.0, shared_selection=True)
    calls = []

    def counting(*args):
        from jenga.elimination import oracle_scorer

        calls.append(args[0])
        return oracle_scorer(*args)

    model = apply_jenga(add_lora(tiny_llama(layers=3)), config, scorer=counting)
    for _ in range(2):
        calls.clear()
        loss_and_grads(model, batch(2, 160))
        assert calls == [0, 1]


def test_fp8_activations_on_a_model_without_a_gated_mlp_is_an_error_before_any_patch():
    model = tiny_opt()
    with pytest.raises(JengaConfigError, match="fp8_activations"):
        apply_jenga(model, JengaConfig(fp8_activations=True))
    assert jenga_state(model) is None and "forward" not in model.model.decoder.layers[0].self_attn.__dict__
    # the default (None) resolves per family: off for OPT, on for the LLaMA family
    assert jenga_state(apply_jenga(model, JengaConfig())).config.fp8_activations is False
    assert jenga_state(apply_jenga(tiny_llama(layers=2), JengaConfig())).config.fp8_activations is True


def test_mlp_recompute_gives_the_same_training_step_and_needs_a_gated_mlp():
    """`apply_jenga(mlp_recompute=True)`: the same loss and LoRA gradients as saving the MLP's activations (with
    elimination, fp32); on a model without a gated MLP it is an error before any patch."""
    config = JengaConfig(block_size=32, attn_keep=0.5, mlp_keep=0.5, fp8_activations=False)
    ids = batch(2, 160)
    ref_loss, ref_grads = loss_and_grads(apply_jenga(add_lora(tiny_llama(layers=3)), config), ids)
    model = apply_jenga(add_lora(tiny_llama(layers=3)), config, mlp_recompute=True)
    assert jenga_state(model).mlp_recompute
    loss, grads = loss_and_grads(model, ids)
    assert rel_err(loss, ref_loss) < 1e-6
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name
    opt = tiny_opt()
    with pytest.raises(JengaConfigError, match="mlp_recompute"):
        apply_jenga(opt, mlp_recompute=True)
    assert jenga_state(opt) is None


def test_a_no_grad_pass_between_steps_leaves_the_next_steps_gradients_alone(family):
    """A train-mode forward without autograd (a reference or logging pass, also through a deep copy, whose
    forwards share the original's selector) runs the model's own forward and queues no selection: under
    checkpointing with elimination, the next step's recompute must not pick up a selection made for another
    batch."""
    other, ids = batch(2, 160, seed=7), batch(2, 160)
    config = JengaConfig(block_size=16, attn_keep=0.4, dense_first_layers=0, fp8_activations=False)

    def scorer(layer_idx, hidden, token_valid, block_size, query_key):  # the blocks' hidden norms: data-driven
        norms = torch.nn.functional.pad(hidden.float().norm(dim=-1), (0, -hidden.shape[1] % block_size))
        return norms.view(hidden.shape[0], -1, block_size).sum(-1)

    def step(checkpointing: bool, no_grad_pass: bool):
        base = MODEL_BUILDERS[family]()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = apply_jenga(add_lora(base), config, scorer=scorer)
        if no_grad_pass:
            reference = copy.deepcopy(model)
            with torch.no_grad():
                model(input_ids=other, labels=other)
                reference(input_ids=other, labels=other)
            assert not any(jenga_state(model).selector.pending.values())
        return loss_and_grads(model, ids)

    ref_loss, ref_grads = step(False, False)
    loss, grads = step(True, True)
    assert rel_err(loss, ref_loss) < 1e-6
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name


def test_generation_in_train_mode_with_elimination_is_the_dense_models():
    """generate() runs without autograd, so a model left in train mode decodes densely with its KV cache."""
    model = apply_jenga(tiny_llama(), JengaConfig(block_size=16, attn_keep=0.5, dense_first_layers=0))
    prompt = batch(1, 200)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    trained = model.generate(prompt, **kwargs)
    model.eval()
    assert torch.equal(trained, model.generate(prompt, **kwargs))


def test_a_patched_model_deep_copies_and_both_remove_cleanly(family):
    """An EMA or reference model is a deep copy: it trains the same loss, and removing Jenga from the copy and
    the original both work (the process-wide rotary swap is undone once)."""
    model = apply_jenga(add_lora(MODEL_BUILDERS[family]()), JengaConfig())
    clone = copy.deepcopy(model)
    ids = batch(2, 96)
    assert rel_err(loss_and_grads(clone, ids)[0], loss_and_grads(model, ids)[0]) == 0
    remove_jenga(clone)
    remove_jenga(model)
    assert apply_rotary_pos_emb.__module__ == "transformers.models.llama.modeling_llama"


def test_return_dict_false_and_a_wrapped_lm_head_give_the_models_loss(caplog):
    """`return_dict=False` returns a tuple, loss first; an LM head PEFT wraps (modules_to_save) is not a plain
    linear layer, so the model computes its own loss, with one warning that names the switch."""
    from peft import LoraConfig, get_peft_model

    ids = batch(2, 96)
    model = apply_jenga(tiny_llama(), DENSE)
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and rel_err(as_tuple[0], model(input_ids=ids, labels=ids).loss) == 0

    def wrapped(patched: bool):
        base = tiny_llama()
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
        peft = get_peft_model(base, config)
        return apply_jenga(peft, DENSE) if patched else peft

    with caplog.at_level("WARNING"):
        loss = wrapped(True)(input_ids=ids, labels=ids).loss
    assert "loss_chunk_tokens=0" in caplog.text
    assert rel_err(loss, wrapped(False)(input_ids=ids, labels=ids).loss) < 1e-6


def test_remove_jenga_restores_the_copies_peft_made_of_patched_modules():
    """Jenga before PEFT with modules_to_save: PEFT copies the patched norms; removing Jenga restores those too."""
    from peft import LoraConfig, get_peft_model

    base = apply_jenga(tiny_llama(), DENSE)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["input_layernorm"]))
    remove_jenga(model)
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]


def test_loss_keywords_and_evaluation_in_train_mode_are_the_models():
    """The segmented loss reads the keywords transformers' causal-LM loss reads: `shift_labels` (the Trainer's,
    under context parallelism) and `ignore_index`; a forward without autograd in train mode (evaluation that
    forgets `model.eval()`) is the model's own, logits included."""
    reference = tiny_llama()
    model = apply_jenga(copy.deepcopy(reference), DENSE)
    ids = batch(2, 96)
    shifted = torch.full_like(ids, -100)
    shifted[:, :50] = ids[:, 1:51]
    for kwargs in ({"shift_labels": shifted}, {"ignore_index": 5}, {"num_items_in_batch": 77}):
        ours, theirs = (m(input_ids=ids, labels=ids, **kwargs).loss for m in (model, reference))
        assert rel_err(ours, theirs) < 1e-6, kwargs
    with torch.no_grad():
        ours, theirs = (m(input_ids=ids, labels=ids) for m in (model, reference))
    assert ours.logits is not None and rel_err(ours.logits, theirs.logits) < 1e-6


def test_grad_mode_at_a_forwards_entry_is_per_thread():
    """A no-grad forward of a patched model on another thread (a reference model serving) leaves this thread's
    record of grad mode, which decides whether a checkpointed forward selects tokens, as it was."""
    import threading

    from jenga.patching.base import _grad_at_entry

    model = apply_jenga(tiny_llama(), DENSE)
    ids = batch(1, 64)
    model(input_ids=ids)
    assert _grad_at_entry.value

    def serve():
        with torch.no_grad():
            model(input_ids=ids)
        seen.append(_grad_at_entry.value)

    seen = []
    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    assert seen == [False] and _grad_at_entry.value


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_selections_follow_their_inputs_not_the_order_of_forwards(reentrant):
    """Under checkpointing the recompute reuses the selection its forward made. Two micro-batches whose losses are
    summed recompute in reverse order, and a forward whose loss is never backpropagated leaves its selection
    behind: each recompute still takes its own forward's selection (a data-driven scorer makes them differ)."""
    config = JengaConfig(block_size=16, attn_keep=0.4, dense_first_layers=0, fp8_activations=False)

    def scorer(layer_idx, hidden, token_valid, block_size, query_key):
        norms = torch.nn.functional.pad(hidden.float().norm(dim=-1), (0, -hidden.shape[1] % block_size))
        return norms.view(hidden.shape[0], -1, block_size).sum(-1)

    def fresh():
        base = tiny_llama()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        return apply_jenga(add_lora(base), config, scorer=scorer).train()

    a, b, orphan = batch(1, 160, seed=3), batch(1, 160, seed=4), batch(1, 160, seed=5)
    model = fresh()
    for ids in (a, b):  # one backward per forward
        model(input_ids=ids, labels=ids).loss.backward()
    expected = lora_grads(model)
    model = fresh()
    (model(input_ids=a, labels=a).loss + model(input_ids=b, labels=b).loss).backward()
    for name, grad in lora_grads(model).items():
        assert rel_err(grad, expected[name]) < 1e-5, name
    expected = loss_and_grads(fresh(), a)[1]
    model = fresh()
    model(input_ids=orphan, labels=orphan)  # its loss is logged, never backpropagated
    for name, grad in loss_and_grads(model, a)[1].items():
        assert rel_err(grad, expected[name]) < 1e-5, name


def test_a_deep_copy_counts_as_a_user_of_the_swapped_functions():
    """Removing Jenga from a deep copy (an EMA model retired) leaves the original's swapped rotary in place."""
    import transformers.models.llama.modeling_llama as llama

    from jenga.patching.base import _SWAPPED

    key = (llama.__name__, "apply_rotary_pos_emb")
    model = apply_jenga(tiny_llama(), DENSE)
    swapped, users = llama.apply_rotary_pos_emb, _SWAPPED[key][1]  # other tests' models may still hold it
    assert swapped is not apply_rotary_pos_emb
    clone = copy.deepcopy(model)
    assert _SWAPPED[key][1] == users + 1
    remove_jenga(clone)
    assert llama.apply_rotary_pos_emb is swapped and _SWAPPED[key][1] == users
    remove_jenga(model)
    assert _SWAPPED.get(key, [None, 0])[1] == users - 1
    assert (llama.apply_rotary_pos_emb is apply_rotary_pos_emb) == (users == 1)


def test_eval_mode_forwards_are_the_models_after_training_and_warn_with_autograd(caplog):
    """The lean LoRA forward, installed by the first training forward, stays out of eval-mode forwards (also with
    autograd on); a forward with autograd in eval mode, where Jenga does nothing, says so once (the quick start
    without `model.train()`)."""
    from jenga.messages import _warned

    reference = add_lora(tiny_llama().to(torch.bfloat16))
    for name, p in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model = apply_jenga(copy.deepcopy(reference), JengaConfig())
    ids = batch(2, 96)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    reference.eval()
    _warned.discard("eval-mode-grad")
    with caplog.at_level("WARNING"):
        ours = model(input_ids=ids).logits
    assert torch.equal(ours, reference(input_ids=ids).logits)
    assert "model.train()" in caplog.text


def test_tuple_output_keeps_the_logits_place():
    """With `return_dict=False` the model's tuple is (loss, logits, hidden states...); a training forward has no
    logits, so their place holds None and the hidden states stay third."""
    reference = tiny_llama().train()
    model = apply_jenga(tiny_llama().train(), DENSE)
    model.load_state_dict(reference.state_dict())
    ids = batch(2, 64)
    kwargs = {"labels": ids, "return_dict": False, "output_hidden_states": True}
    ours, theirs = model(input_ids=ids, **kwargs), reference(input_ids=ids, **kwargs)
    assert len(ours) == len(theirs) == 3 and ours[1] is None
    assert rel_err(ours[0], theirs[0]) < 1e-6
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(ours[2], theirs[2], strict=True))


def test_lean_lora_leaves_float16_models_outside_autocast_to_peft():
    """PEFT computes a float16 model's fp32 adapters in fp32; in float16 their small gradients would flush to zero.
    Under autocast (fp16 activations by design) the lean path serves as for bf16."""
    from jenga.lora import _lean_adapters

    layer = add_lora(tiny_llama()).base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 8, layer.in_features)
    assert _lean_adapters(layer, x.bfloat16(), (), {})
    assert not _lean_adapters(layer, x.half(), (), {})
    with torch.autocast("cpu", dtype=torch.float16):
        assert _lean_adapters(layer, x.half(), (), {})


def test_bad_arguments_name_the_problem():
    model = tiny_llama()
    with pytest.raises(TypeError, match="nn.Module"):
        apply_jenga(None)
    with pytest.raises(TypeError, match="scorer must be a function"):
        apply_jenga(model, JengaConfig(attn_keep=0.5), scorer=3)
    with pytest.raises(TypeError, match="lean_norms must be True or False"):
        apply_jenga(model, lean_norms="no")
    assert jenga_state(model) is None


def test_a_deep_copy_has_its_own_state_and_a_module_copy_shares_its_models():
    """A deep-copied model's forwards use the copy's state (its selections land there, `remove_jenga` on the
    original leaves the copy patched); a copy of one patched module (PEFT's modules_to_save) shares its model's
    state rather than copying the whole model with it."""
    config = JengaConfig(block_size=16, attn_keep=0.5, dense_first_layers=0, fp8_activations=False)
    model = apply_jenga(add_lora(tiny_llama()), config).train()
    clone = copy.deepcopy(model)
    ids = batch(1, 96)
    clone(input_ids=ids, labels=ids).loss.backward()
    assert jenga_state(clone).last_selection and not jenga_state(model).last_selection
    remove_jenga(model)
    attention = clone.base_model.model.model.layers[0].self_attn
    assert "forward" in attention.__dict__ and "forward" in attention.q_proj.__dict__
    norm = clone.base_model.model.model.norm
    assert copy.deepcopy(norm).__dict__["_jenga_binding"].state is jenga_state(clone)
    remove_jenga(clone)
    assert "forward" not in attention.__dict__ and "forward" not in attention.q_proj.__dict__


@pytest.mark.parametrize(
    ("dtype", "config"),
    [
        (torch.bfloat16, JengaConfig()),  # the lean LoRA's shared float8 copies (fp32 adapters on a bf16 model)
        (torch.float32, JengaConfig(block_size=16, attn_keep=0.5, dense_first_layers=0)),
        (torch.float32, JengaConfig(mlp_keep=[0.5, 1.0], fp8_activations=False)),  # layers differ in keep
    ],
    ids=["bf16-default", "attention-elimination", "mlp-elimination"],
)
def test_a_compiled_model_trains_as_the_uncompiled_one(dtype, config):
    """torch.compile of a patched model gives the uncompiled loss and gradients: what does not trace (the float8
    cache on a tensor, token selection and row moves, the kept-channel count) runs eagerly at a graph break."""
    torch._dynamo.reset()
    model = add_lora(tiny_llama(layers=2).to(dtype))
    apply_jenga(model, config)
    twin = copy.deepcopy(model)
    ids = batch(1, 64)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    compiled_loss = torch.compile(twin, backend="eager")(input_ids=ids, labels=ids).loss
    compiled_loss.backward()
    eager, compiled = lora_grads(model), lora_grads(twin)
    torch.testing.assert_close(compiled_loss, loss)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-6)


def test_attention_maps_in_a_training_forward_with_elimination_raise_and_are_dense_otherwise():
    """A sparse layer has no map of the whole sequence: asking for attention maps in a training forward with
    elimination is an error (transformers would drop the sparse layers' entries and shift the rest); without
    autograd every layer's dense map comes back."""
    model = tiny_llama(layers=4, attn_implementation="eager")
    apply_jenga(model, JengaConfig(block_size=16, attn_keep=0.5))
    ids = batch(1, 128)
    with pytest.raises(ValueError, match="output_attentions=True in a training forward with token elimination"):
        model(input_ids=ids, labels=ids, output_attentions=True)
    model(input_ids=ids, labels=ids).loss.backward()  # not asked: trains
    with torch.no_grad():
        maps = model(input_ids=ids, output_attentions=True).attentions
    assert len(maps) == 4 and all(m.shape == (1, 4, 128, 128) for m in maps)


def test_a_hook_on_the_lm_head_does_not_see_the_segmented_loss():
    """The segmented loss reads the head's weight without calling the head (unless an engine shards it): a user's
    forward hook on lm_head (a temperature on logits) neither fires on the training loss nor changes it."""
    ids = batch(1, 64)
    losses = []
    for hooked in (False, True):
        model = apply_jenga(add_lora(tiny_llama(layers=1)), JengaConfig())
        if hooked:
            model.get_base_model().lm_head.register_forward_hook(lambda module, args, out: out / 2)
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    assert losses[1] == losses[0]

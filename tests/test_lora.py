"""Lean LoRA: PEFT's numerics on a bf16 model with fp32 adapters, without saving the fp32 input casts."""

from __future__ import annotations

import torch
from conftest import add_lora, batch, lora_grads, tiny_llama

from jenga import JengaConfig, apply_jenga, remove_jenga

HIDDEN = 64


def _bf16_model_with_fp32_lora(order: str) -> torch.nn.Module:
    """A bf16 tiny Llama with fp32 LoRA on q/k/v/o, Jenga applied before or after PEFT."""
    model = tiny_llama(kv_heads=2).bfloat16()
    config = JengaConfig(block_size=32, attn_keep=0.5, dense_first_layers=1, dense_last_layer=False)
    if order == "jenga-first":
        apply_jenga(model, config)
    model = add_lora(model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    if order == "peft-first":
        apply_jenga(model, config)
    return model


def _loss_grads_and_fp32_saves(model, ids):
    fp32_rows = []

    def pack(t):
        if t.dtype == torch.float32 and t.dim() >= 2 and t.shape[-1] == HIDDEN and t.numel() >= 32 * HIDDEN:
            fp32_rows.append(tuple(t.shape))
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model), fp32_rows


def test_lean_lora_matches_peft_and_drops_the_fp32_casts():
    ids = batch(2, 128)
    for order in ("peft-first", "jenga-first"):
        model = _bf16_model_with_fp32_lora(order)
        loss, grads, fp32 = _loss_grads_and_fp32_saves(model, ids)
        q_proj = model.get_base_model().model.layers[1].self_attn.q_proj
        assert "forward" in q_proj.__dict__  # patched, also when PEFT wrapped the projections after Jenga
        assert fp32 == []

        state = model.get_base_model().__dict__["_jenga"]
        state.config.lean_lora = False
        for module in list(state.patched):
            if type(module).__name__ == "Linear":
                module.__dict__.pop("forward")
                state.patched.remove(module)
        ref_loss, ref_grads, ref_fp32 = _loss_grads_and_fp32_saves(model, ids)
        assert len(ref_fp32) == 4 * 3  # PEFT: q, k, v and o each save an fp32 copy, in all 3 layers
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_remove_jenga_restores_peft_forward():
    model = _bf16_model_with_fp32_lora("peft-first")
    _loss_grads_and_fp32_saves(model, batch(1, 64))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert "forward" in q_proj.__dict__
    remove_jenga(model)
    assert "forward" not in q_proj.__dict__

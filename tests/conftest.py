"""Tiny models built from configs (random weights), shared by the tests."""

from __future__ import annotations

import os

import torch

# Triton kernels run in the interpreter on machines without a GPU; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

VOCAB = 128


def tiny_llama(kv_heads: int = 4, layers: int = 3, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        use_cache=False,
        **{"attn_implementation": "sdpa", "intermediate_size": 160, **overrides},
    )
    return LlamaForCausalLM(config).train()


def tiny_opt(layers: int = 3, seed: int = 0, **overrides) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        hidden_size=64,
        ffn_dim=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        word_embed_proj_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        use_cache=False,
        attn_implementation="sdpa",
        **overrides,
    )
    return OPTForCausalLM(config).train()


MODEL_BUILDERS = {
    "llama": lambda: tiny_llama(kv_heads=4),
    "llama-gqa": lambda: tiny_llama(kv_heads=2),
    "opt": tiny_opt,
}


def add_lora(model: torch.nn.Module, targets: tuple[str, ...] | None = None) -> torch.nn.Module:
    """LoRA r=8 on the attention projections (q/k/v/o), as in the paper's setting."""
    if targets is None:
        out = "out_proj" if model.config.model_type == "opt" else "o_proj"
        targets = ("q_proj", "k_proj", "v_proj", out)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=False)
    return get_peft_model(model, config)


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(params=sorted(MODEL_BUILDERS))
def family(request) -> str:
    return request.param


@pytest.fixture
def offload_calls(monkeypatch) -> list[int]:
    """Each `jenga.pinned.offloaded_saves` that `jenga.checkpointing` entered (one per offloaded checkpoint and
    forward)."""
    from jenga import checkpointing

    entered = []
    original = checkpointing.offloaded_saves

    def spy():
        entered.append(1)
        return original()

    monkeypatch.setattr(checkpointing, "offloaded_saves", spy)
    return entered


def batch(bsz: int = 2, seq: int = 200, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (bsz, seq), generator=gen)


def write_token_jsonl(path, sequences: int, length: int, seed: int = 0):
    """A JSON-lines file of random token sequences (`input_ids`), as the predictor trainer reads them."""
    import json

    gen = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(0, VOCAB, (length,), generator=gen).tolist()} for _ in range(sequences)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

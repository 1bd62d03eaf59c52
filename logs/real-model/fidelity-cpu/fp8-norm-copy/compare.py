"""What the q/k/v adapters reading the input RMSNorm's float8 copy (`jenga.fp8.input_copy`) changes, against each
adapter input getting its own float8 copy (the code before it: `jenga.norms.mark_norm_output` off), on the CPU:

- saved bytes per sublayer of one training step at 8K, Llama-2-7B and Llama-3-8B shapes with 2 layers (random
  weights, bf16, LoRA r=8 on q/k/v/o, the default JengaConfig);
- on SmolLM2-135M (real weights, bf16, fp32 LoRA r=8 on q/k/v/o with random A and B scaled by 0.1, so that A's
  gradient is not zero as at PEFT's init), 2 real-text windows of 2048 tokens: the cosine of the LoRA gradients
  with float8 activations against those without (the default with `fp8_activations=False`).

    cd logs/real-model/fidelity-cpu/fp8-norm-copy && ../../../../.venv/bin/python compare.py > compare.jsonl
"""

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import jenga.norms
from jenga import JengaConfig, apply_jenga
from jenga.data.real_text import real_text_windows
from jenga.profiling import SublayerSavedMeter, run_header

SHAPES = {
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    ),
}
MARK = jenga.norms.mark_norm_output
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
SMOLLM2 = str(Path(__file__).resolve().parents[4] / "checkpoints/smollm2-135m")


def sharing(on: bool) -> None:
    jenga.norms.mark_norm_output = MARK if on else (lambda *args: None)


def saved_bytes(shape: str, shared: bool) -> dict:
    sharing(shared)
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, max_position_embeddings=8192, **SHAPES[shape])
    config._attn_implementation = "sdpa"
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16), LoraConfig(**LORA))
    apply_jenga(model, JengaConfig()).train()
    ids = torch.randint(0, config.vocab_size, (1, 8192))
    with SublayerSavedMeter(model) as meter:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    mib = {k: round(v / 2**20, 3) for k, v in sorted(meter.by_sublayer.items())}
    return {
        "record": "saved_bytes",
        "shape": shape,
        "layers": 2,
        "seq_len": 8192,
        "shared": shared,
        "saved_mib": mib,
        "total_mib": round(meter.bytes / 2**20, 3),
    }


def lora_grads(fp8: bool, shared: bool, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    sharing(shared)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(init_lora_weights=False, **LORA))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.mul_(0.1)
    apply_jenga(model, JengaConfig(fp8_activations=fp8)).train()
    for window in windows:
        model(input_ids=window[None], labels=window[None]).loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def cosine(a: dict, b: dict, keys: list[str]) -> float:
    flat = [torch.cat([d[k].flatten() for k in keys]) for d in (a, b)]
    return torch.nn.functional.cosine_similarity(*flat, dim=0).item()


def main() -> None:
    print(
        json.dumps(
            run_header(
                extra={"config": JengaConfig().to_dict(), "lora": LORA, "script": __doc__.strip().splitlines()[0]}
            )
        )
    )
    for shape in SHAPES:
        for shared in (False, True):
            print(json.dumps(saved_bytes(shape, shared)), flush=True)
    windows = real_text_windows(AutoTokenizer.from_pretrained(SMOLLM2), 2048, 2)
    exact = lora_grads(False, True, windows)
    for shared in (False, True):
        grads = lora_grads(True, shared, windows)
        qkv_a = [k for k in grads if "lora_A" in k and any(p in k for p in ("q_proj", "k_proj", "v_proj"))]
        record = {
            "record": "lora_gradient_cosine",
            "model": SMOLLM2,
            "windows": 2,
            "seq_len": 2048,
            "dtype": "bfloat16",
            "lora_init": "PEFT init_lora_weights=False, B x 0.1",
            "shared": shared,
            "all_adapters": cosine(grads, exact, list(grads)),
            "qkv_A": cosine(grads, exact, qkv_a),
            "qkv_A_min_per_tensor": min(cosine(grads, exact, [k]) for k in qkv_a),
        }
        print(json.dumps(record), flush=True)
    sharing(True)


if __name__ == "__main__":
    main()

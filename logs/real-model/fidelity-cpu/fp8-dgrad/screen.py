"""A screen of float8 input gradients for the frozen linears (not in the library): how far the LoRA gradients move
when each frozen linear's input gradient, `grad @ W`, is computed from float8 e4m3 copies of the output gradient
(scaled per row) and of the weight (scaled per input column), as a Hopper float8 matrix product with row-wise
scales would compute it (`torch._scaled_mm`, fp32 accumulation, bf16 output), against the same bf16 step without,
and against an fp32 step. bf16's own distance from fp32 is the yardstick.

On SmolLM2-135M (real weights, PEFT LoRA r=8 on q/k/v/o with random A and B scaled by 0.1, so that A's gradient
is not zero as at PEFT's init, no Jenga), 2 real-text windows of 2048 tokens, on the CPU:

    cd logs/real-model/fidelity-cpu/fp8-dgrad && ../../../../.venv/bin/python screen.py > screen.jsonl
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from jenga.data.real_text import real_text_windows
from jenga.profiling import run_header

SMOLLM2 = str(Path(__file__).resolve().parents[4] / "checkpoints/smollm2-135m")
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
GROUPS = {
    "every frozen linear": None,
    "MLP (gate, up, down)": ("gate_proj", "up_proj", "down_proj"),
    "gate and up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
    "attention projections": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "lm_head": ("lm_head",),
}


def scaled_fp8(t: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t as float8 codes times an fp32 scale per slice along `dim` (the largest magnitude maps to the format's max)."""
    scale = t.float().abs().amax(dim=dim, keepdim=True).clamp_min(1e-30) / torch.finfo(dtype).max
    return (t.float() / scale).to(dtype), scale


class Fp8GradLinear(torch.autograd.Function):
    """A frozen linear whose input gradient is a row-wise scaled float8 product."""

    dtype = torch.float8_e4m3fn

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gq, gs = scaled_fp8(g, 1, Fp8GradLinear.dtype)
        wq, ws = scaled_fp8(weight, 0, torch.float8_e4m3fn)  # (out, in): one scale per input column
        out = torch._scaled_mm(gq, wq.t().contiguous().t(), scale_a=gs, scale_b=ws, out_dtype=grad.dtype)
        return out.view(*grad.shape[:-1], weight.shape[1]), None


def lora_model(dtype: torch.dtype) -> torch.nn.Module:
    """SmolLM2 in `dtype` with PEFT LoRA, A random and B random times 0.1 (seeded), so A's gradient is not zero."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(init_lora_weights=False, **LORA))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.mul_(0.1)
    return model


def lora_grads(windows: torch.Tensor, dtype: torch.dtype, names: tuple[str, ...] | None, fp8: bool):
    model = lora_model(dtype)
    for name, module in model.named_modules():
        chosen = names is None or any(n in name for n in names)
        if fp8 and chosen and type(module) is torch.nn.Linear and not module.weight.requires_grad:
            module.forward = lambda x, w=module.weight: Fp8GradLinear.apply(x, w)
    model.train()
    for window in windows:
        model(input_ids=window[None], labels=window[None]).loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def distance(a: dict, b: dict) -> dict:
    x, y = (torch.cat([d[k].flatten() for k in a]) for d in (a, b))
    return {"cosine": F.cosine_similarity(x, y, dim=0).item(), "relative": ((x - y).norm() / y.norm()).item()}


def main() -> None:
    print(json.dumps(run_header(extra={"lora": LORA, "script": __doc__.strip().splitlines()[0]})))
    windows = real_text_windows(AutoTokenizer.from_pretrained(SMOLLM2), 2048, 2)
    fp32 = lora_grads(windows, torch.float32, None, False)
    bf16 = lora_grads(windows, torch.bfloat16, None, False)
    common = {"model": SMOLLM2, "windows": 2, "seq_len": 2048, "lora_init": "PEFT init_lora_weights=False, B x 0.1"}
    print(json.dumps({"record": "bf16_vs_fp32", **common, **distance(bf16, fp32)}), flush=True)
    for fmt in (torch.float8_e4m3fn, torch.float8_e5m2):
        Fp8GradLinear.dtype = fmt
        for group, names in GROUPS.items():
            if fmt == torch.float8_e5m2 and names is not None:
                continue
            grads = lora_grads(windows, torch.bfloat16, names, True)
            record = {"record": "fp8_input_gradient", **common, "linears": group, "grad_format": str(fmt)}
            print(
                json.dumps({**record, "vs_bf16": distance(grads, bf16), "vs_fp32": distance(grads, fp32)}), flush=True
            )


if __name__ == "__main__":
    main()

"""The library's float8 MLP input gradients (`apply_jenga(fp8_mlp_grads=True)`) on SmolLM2: how far they move the
LoRA gradients from Jenga's default step, and both from an fp32 step without Jenga. The same model, LoRA, windows
and yardstick as `screen.py` (its MLP row ran the same products outside the library, without Jenga):

    cd logs/real-model/fidelity-cpu/fp8-dgrad && ../../../../.venv/bin/python library.py > library.jsonl

`fp8_mlp_grads` was removed after this ran (no faster at 8K: docs/real-model.md); to rerun, check out 92fefa4.
"""

import json

import torch
from screen import LORA, SMOLLM2, distance, lora_model
from transformers import AutoTokenizer

from jenga import apply_jenga
from jenga.data.real_text import real_text_windows
from jenga.profiling import run_header


def lora_grads(windows: torch.Tensor, dtype: torch.dtype, jenga: dict | None) -> dict[str, torch.Tensor]:
    """LoRA gradients of one step over `windows`: `screen.py`'s model, with `apply_jenga(**jenga)` unless None."""
    model = lora_model(dtype)
    if jenga is not None:
        apply_jenga(model, **jenga)
    model.train()
    for window in windows:
        model(input_ids=window[None], labels=window[None]).loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    print(json.dumps(run_header(extra={"lora": LORA, "script": __doc__.strip().splitlines()[0]})))
    windows = real_text_windows(AutoTokenizer.from_pretrained(SMOLLM2), 2048, 2)
    common = {"model": SMOLLM2, "windows": 2, "seq_len": 2048, "lora_init": "PEFT init_lora_weights=False, B x 0.1"}
    fp32 = lora_grads(windows, torch.float32, None)
    default = lora_grads(windows, torch.bfloat16, {})
    fp8_grads = lora_grads(windows, torch.bfloat16, {"fp8_mlp_grads": True})
    records = {
        "jenga_default_vs_fp32": distance(default, fp32),
        "fp8_mlp_grads_vs_fp32": distance(fp8_grads, fp32),
        "fp8_mlp_grads_vs_jenga_default": distance(fp8_grads, default),
    }
    for name, values in records.items():
        print(json.dumps({"record": name, **common, "dtype": "bfloat16", **values}), flush=True)


if __name__ == "__main__":
    main()

"""Unsloth as a compared system (the longest-context search): its own loader and its long-context settings.

Unsloth patches transformers' modeling classes when it is imported, so its configurations run in a fresh
interpreter that imports it before anything else (`worker_command`), never forked from the sweep. Its loader
reads a folder of weights: the architecture's random-init weights are written once to a cache folder
(`python -m jenga.experiments.unsloth MODEL`, run by the sweep before the first probe) with a three-token
tokenizer, since the steps feed random ids. What it trains: bf16 LoRA r=8 on q/k/v/o (alpha 16, as the other
methods), with its offloaded gradient checkpointing (`use_gradient_checkpointing="unsloth"`) and tiled MLP,
the settings it documents for its longest contexts.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from ..cli import make_parser
from .training import load_model

WEIGHTS_CACHE = Path(os.environ.get("JENGA_WEIGHTS_CACHE", Path(tempfile.gettempdir()) / "jenga-random-weights"))
# The worker's entry with Unsloth imported first; the runner's arguments follow.
_ENTRY = "import unsloth, sys; from jenga.experiments.run import main; sys.exit(main())"


def weights_folder(model_name: str) -> Path:
    return WEIGHTS_CACHE / Path(model_name).name


def write_random_weights(model_name: str) -> Path:
    """The architecture's random-init weights and a minimal tokenizer in the cache folder (once)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = weights_folder(model_name)
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(model_name, 0, device=device)
    model.save_pretrained(folder, max_shard_size="4GB")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(folder)
    (folder / "done").write_text("random-init weights for the Unsloth runs\n")
    return folder


def worker_command(runner_args: list[str]) -> list[str]:
    """The runner's worker command line in an interpreter that imports Unsloth before transformers."""
    return [sys.executable, "-c", _ENTRY, *runner_args]


def build(model_name: str, seq: int) -> torch.nn.Module:
    """The LoRA model as Unsloth trains it at `seq` tokens (its cached random-init weights)."""
    if "unsloth" not in sys.modules:
        raise RuntimeError("Unsloth must be imported before transformers: run it through `worker_command`")
    from unsloth import FastLanguageModel

    folder = weights_folder(model_name)
    if not (folder / "done").exists():
        raise FileNotFoundError(f"{folder}: no cached weights; run `python -m jenga.experiments.unsloth {model_name}`")
    model, _ = FastLanguageModel.from_pretrained(
        str(folder),
        max_seq_length=seq,
        dtype=torch.bfloat16,
        load_in_4bit=False,
        load_in_16bit=True,
        fix_tokenizer=False,
        unsloth_tiled_mlp=True,
    )
    return FastLanguageModel.get_peft_model(
        model,
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_gradient_checkpointing="unsloth",
    )


def main(argv: list[str] | None = None) -> int:
    """Write an architecture's random-init weights for Unsloth's loader (once) and print their folder."""
    parser = make_parser(__doc__)
    parser.add_argument("model", help="folder under checkpoints/ or a path with config.json")
    print(write_random_weights(parser.parse_args(argv).model))
    return 0


if __name__ == "__main__":
    sys.exit(main())

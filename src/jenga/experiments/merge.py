"""Write a fine-tune (base + committed adapter) as a merged Hugging Face checkpoint that lm_eval loads.

    python -m jenga.experiments.merge --base checkpoints/code-llama \
        --run logs/end2end/accuracy/runs/jenga-s0 --out checkpoints/code-llama-4k-jenga-s0
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from ..cli import make_parser
from .finetune import load_merged


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--base", type=Path, required=True, help="the base model folder the fine-tune started from")
    parser.add_argument("--run", type=Path, required=True, help="fine-tune folder holding adapter/")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged checkpoint")
    args = parser.parse_args(argv)
    if not (args.run / "adapter" / "adapter_config.json").exists():
        raise FileNotFoundError(f"{args.run} holds no adapter/adapter_config.json; is it a fine-tune folder?")
    load_merged(args.run, args.base).save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.base).save_pretrained(args.out)
    print(f"merged {args.run} into {args.out}")


if __name__ == "__main__":
    main()

"""Pretrain a small LLaMA-architecture model from scratch on the local corpus (CPU or GPU).

    python -m jenga.experiments.pretrain --data dataset --out checkpoints/code-llama --minutes 3

Random weights have no attention pattern, so predictor quality and accuracy experiments need a model that
learned something. This trains one on the built corpus (`dataset/tokens`) with the locally trained
tokenizer; a `--task-fraction` of the rows are short retrieval examples (`jenga.data.tasks`), so the base
model can retrieve within its trained context before long-context fine-tuning extends it. It logs the loss
per step and the validation loss as JSON lines and saves a standard Hugging Face checkpoint (bf16).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..cli import make_parser
from ..data.loaders import join_documents, load_documents
from ..data.tasks import training_example
from ..profiling import JsonlWriter, run_header
from .training import train_steps


@torch.no_grad()
def validation_loss(model, tokens: torch.Tensor, seq_len: int, device: str, max_windows: int = 64) -> float:
    """Mean loss over `max_windows` windows spread evenly over the validation stream."""
    model.eval()
    windows = tokens[: (len(tokens) // seq_len) * seq_len].view(-1, seq_len)
    windows = windows[torch.linspace(0, len(windows) - 1, min(max_windows, len(windows))).long()].to(device)
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    model.train()
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--data", type=Path, default=Path("dataset"), help="dataset folder (jenga.data.corpus)")
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--seq-len", type=int, default=1024, help="training sequence length in tokens")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--task-fraction", type=float, default=0.25, help="share of rows that are retrieval tasks")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget")
    parser.add_argument("--max-steps", type=int, default=100_000, help="step limit (the budget usually ends first)")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between validation losses")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.data / "tokenizer")
    train_docs = load_documents(args.data, "train", tokenizer)
    train = join_documents(train_docs, tokenizer.eos_token_id)
    valid = join_documents(load_documents(args.data, "validation", tokenizer), tokenizer.eos_token_id)
    fillers = [d.tolist() for d in train_docs if len(d) > args.seq_len]
    rng = random.Random(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=args.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        use_cache=False,
    )
    model = LlamaForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    args.out.mkdir(parents=True, exist_ok=True)
    header = run_header(
        extra={
            "experiment": "pretrain",
            "params": sum(p.numel() for p in model.parameters()),
            "train_tokens": len(train),
            "config": config.to_dict(),
            "args": vars(args),
        }
    )
    start, budget = time.monotonic(), args.minutes * 60
    gen = torch.Generator().manual_seed(0)

    def rows(_step: int) -> torch.Tensor:
        starts = torch.randint(0, len(train) - args.seq_len, (args.batch,), generator=gen)
        return torch.stack(
            [
                torch.tensor(training_example(fillers, tokenizer, args.seq_len, rng))
                if rng.random() < args.task_fraction
                else train[s : s + args.seq_len]
                for s in starts
            ]
        )

    def lr_factor(step: int) -> float:
        """Linear warm-up over 100 steps, then cosine decay to 10% over the wall-clock budget."""
        frac = min(1.0, (time.monotonic() - start) / budget)
        return min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def with_validation(record: dict) -> dict:
        record["tokens"] = (record["step"] + 1) * args.batch * args.seq_len
        if (record["step"] + 1) % args.eval_every == 0:
            record["validation_loss"] = validation_loss(model, valid, args.seq_len, device)
        return record

    with JsonlWriter(args.out / "pretrain_log.jsonl", header=header) as log:
        stats = train_steps(
            model,
            args.max_steps,
            batches=rows,
            writer=log,
            forward_context=torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"),
            optimizer=optimizer,
            clip_grad=1.0,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor),
            on_record=with_validation,
            until=lambda: time.monotonic() - start > budget,
            progress="pretrain",
        )
        step, seen = len(stats.steps), len(stats.steps) * args.batch * args.seq_len
        val = validation_loss(model, valid, args.seq_len, device)
        log.write(
            {"record": "summary", "status": stats.status, "steps": step, "tokens_seen": seen, "validation_loss": val}
        )
    if stats.status != "ok":
        raise SystemExit(f"pretraining stopped: {stats.status} ({stats.error}); nothing saved")
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{step} steps, {seen} tokens, validation loss {val:.3f}; saved to {args.out}")


if __name__ == "__main__":
    main()

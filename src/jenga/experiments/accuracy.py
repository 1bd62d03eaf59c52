"""Evaluate the base model and its long-context fine-tunes: perplexity and LongBench-style retrieval.

    python -m jenga.experiments.accuracy --base checkpoints/code-llama --runs runs/lora-s0 runs/jenga-s0 \
        --data dataset --logs logs/end2end/accuracy

Per model, one JSON-lines log `<name>.jsonl`: sliding-window perplexity on the held-out test documents at
each `--windows` length (stride = window / 2, every token scored once), and greedy answers to every record
of `<data>/longbench/<task>.jsonl` (or any LongBench JSONL a user points `--tasks-dir` at), scored with
that task's LongBench metric per (length, depth) cell.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..cli import make_parser
from ..data.loaders import join_documents, load_documents
from ..data.tasks import METRIC, prompt_text
from ..eval.metrics import score
from ..eval.perplexity import sliding_window_perplexity
from ..profiling import JsonlWriter, read_jsonl, run_header
from .finetune import load_merged


def load_task_records(folder: Path, limit: int | None = None) -> dict[str, list[dict]]:
    """Every `<task>.jsonl` under `folder` (first `limit` records of each when given)."""
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no <task>.jsonl files in {folder}; build them with `python -m jenga.data.corpus`")
    return {f.stem: [json.loads(line) for line in f.read_text().splitlines()[:limit] if line.strip()] for f in files}


@torch.no_grad()
def answer(model, tokenizer, prompts: list[str], max_new_tokens: int, batch: int) -> list[str]:
    """Greedy continuations cut at the first newline (the answer line), in batches of left-padded prompts."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs = []
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        new = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[:, enc["input_ids"].shape[1] :]
        outputs += [text.split("\n")[0].strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return outputs


def task_scores(model, tokenizer, records: dict[str, list[dict]], batch: int) -> list[dict]:
    """One record per (task, length, depth) cell: its LongBench score and sample count, plus the answers."""
    rows = []
    for task, items in records.items():
        metric = METRIC.get(task, "qa_f1")
        cells: dict[tuple, list[dict]] = defaultdict(list)
        for item in items:
            cells[(item.get("length"), item.get("depth"))].append(item)
        for (length, depth), group in tqdm(sorted(cells.items(), key=str), desc=task, unit="cell"):
            predictions = answer(model, tokenizer, [prompt_text(r) for r in group], 24, batch)
            rows.append(
                {
                    "record": "task",
                    "task": task,
                    "metric": metric,
                    "length": length,
                    "depth": depth,
                    "samples": len(group),
                    "score": score(metric, predictions, [r["answers"] for r in group]),
                    "predictions": predictions,
                }
            )
    return rows


def evaluate_model(
    name: str,
    model,
    tokenizer,
    stream: torch.Tensor,
    records: dict[str, list[dict]],
    windows: list[int],
    batch: int,
    path: Path,
    info: dict,
) -> None:
    """Write one model's log: perplexity per window, then one record per task cell, then a summary."""
    header = run_header(extra={"experiment": "accuracy", "model": name, **info})
    with JsonlWriter(path, header=header) as log:
        for window in windows:
            stride = window // 2
            result = sliding_window_perplexity(model, stream, window, stride)
            log.write({"record": "perplexity", "window": window, "stride": stride, **result})
            tqdm.write(f"{name}: perplexity {result['perplexity']:.3f} at {window}")
        for row in task_scores(model, tokenizer, records, batch):
            log.write(row)
        log.write({"record": "summary", "status": "ok"})


def run_info(run: Path) -> dict:
    """Method, seed and training summary from a fine-tune's log."""
    records = read_jsonl(run / "finetune_log.jsonl")
    header = records[0]
    steps = [r for r in records if r.get("record") == "step"]
    return {
        "run": run.name,
        "method": header["method"],
        "seed": int(header["args"]["seed"]),
        "seq_len": int(header["args"]["seq_len"]),
        "final_train_loss": sum(r["loss"] for r in steps[-20:]) / max(1, len(steps[-20:])),
    }


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--base", type=Path, required=True, help="base model folder (weights and tokenizer)")
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="fine-tune output folders")
    parser.add_argument("--data", type=Path, default=Path("dataset"), help="dataset folder (jenga.data.corpus)")
    parser.add_argument("--tasks-dir", type=Path, help="LongBench JSONL folder (None: <data>/longbench)")
    parser.add_argument("--windows", type=int, nargs="+", default=[1024, 4096], help="perplexity windows (tokens)")
    parser.add_argument("--limit", type=int, help="first N records per task (quick checks; None: all)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--logs", type=Path, default=Path("logs/end2end/accuracy"), help="folder for the logs")
    parser.add_argument("--skip-base", action="store_true", help="evaluate the fine-tunes only")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    stream = join_documents(load_documents(args.data, "test", tokenizer), tokenizer.eos_token_id)
    records = load_task_records(args.tasks_dir or args.data / "longbench", args.limit)
    args.logs.mkdir(parents=True, exist_ok=True)
    if not args.skip_base:
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).to(device)
        info = {"run": "base", "method": "base", "seed": None, "seq_len": model.config.max_position_embeddings}
        evaluate_model(
            "base", model, tokenizer, stream, records, args.windows, args.batch, args.logs / "base.jsonl", info
        )
    for run in args.runs:
        model = load_merged(run, args.base, device, dtype)
        path = args.logs / f"{run.name}.jsonl"
        evaluate_model(run.name, model, tokenizer, stream, records, args.windows, args.batch, path, run_info(run))


if __name__ == "__main__":
    main()

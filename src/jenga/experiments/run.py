"""The experiment runner: one (model, method, length) per process, JSON-lines logs, OOM logged as OOM.

    python -m jenga.experiments.run --model llama-2-7b --methods lora jenga --seqs 4096 8192 --logs logs/x
    python -m jenga.experiments.run --model llama-2-7b --methods lora jenga+ckpt --max-length --logs logs/y

A sweep runs each configuration in a fresh process (allocator peaks never leak between runs) and skips
configurations whose log is already complete unless --force. `--max-length` finds the longest sequence
(in steps of --length-step) that trains one step without running out of memory: doubling, then bisection.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import apply_jenga
from ..patching.base import oracle_scorer
from ..predictor import PredictorBundle
from ..profiling import JsonlWriter, PhaseRecorder, TimedScorer, read_jsonl, run_header
from . import longlora
from .methods import METHODS, Method, get_method
from .training import add_attention_lora, load_model, train_steps


def log_path(logs: Path, model: str, method: str, seq: int) -> Path:
    return logs / f"{Path(model).name}_{method}_{seq}.jsonl"


def is_complete(path: Path) -> bool:
    return path.exists() and any(r.get("record") == "summary" for r in read_jsonl(path))


def build(method: Method, model_name: str, seq: int) -> tuple[torch.nn.Module, str, TimedScorer | None]:
    """The model as `method` trains it: weights, baseline changes, LoRA, then Jenga."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = longlora.register() if method.s2attn else "sdpa"
    model, weights = load_model(model_name, seq, device=device, attn_implementation=attn)
    if method.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        if model.config.model_type != "llama":
            raise ValueError(f"the liger method supports Llama models only, not {model.config.model_type!r}")
        apply_liger_kernel_to_llama(model=model)
    model = add_attention_lora(model)
    if method.train_embed_norm:
        for name, param in model.named_parameters():
            if "embed_tokens" in name or "norm" in name:
                param.requires_grad_(True)
    timer = None
    if method.jenga is not None:
        timer = TimedScorer(oracle_scorer if method.predictor is None else predictor_scorer(method, model))
        apply_jenga(model, method.jenga, scorer=timer)
    return model, weights, timer


def predictor_scorer(method: Method, model: torch.nn.Module):
    """The scorer of the method's predictors: a trained folder, or random-init ones of the default size."""
    config = model.get_base_model().config
    if method.predictor == "random-init":
        sparse = method.jenga.sparse_layers(config.num_hidden_layers)
        bundle = PredictorBundle(config.hidden_size, config.num_hidden_layers, sparse, method.jenga)
    else:
        bundle = PredictorBundle.load(method.predictor)
    return bundle.to(next(model.parameters()).device).eval().scorer()


def run_one(
    model_name: str,
    method_name: str,
    seq: int,
    steps: int,
    warmup: int,
    path: Path,
    memory_gib: float | None,
    command: str | None = None,
) -> dict:
    """Train `steps` measured steps in this process and log them; returns the summary record."""
    method = get_method(method_name)
    capped = None
    if memory_gib is not None and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        capped = min(1.0, memory_gib / total)
        torch.cuda.set_per_process_memory_fraction(capped)
    torch.manual_seed(0)
    header: dict[str, Any] = {
        "experiment": "run",
        "model": Path(model_name).name,
        "method": method.name,
        "method_description": method.description,
        "seq_len": seq,
        "batch": 1,
        "dtype": "bfloat16",
        "lora": "r=8 q/k/v/o",
        "jenga_config": None if method.jenga is None else method.jenga.to_dict(),
        "gradient_checkpointing": method.checkpointing,
        "predictor": method.predictor,
        "memory_cap_gib": memory_gib if capped is not None else None,
    }
    with JsonlWriter(path, header=None) as writer:
        try:
            model, weights, timer = build(method, model_name, seq)
        except torch.cuda.OutOfMemoryError as exc:
            writer.write(run_header(command, extra={**header, "weights": None}))
            summary = {"record": "summary", "status": "oom", "error": str(exc).splitlines()[0], "stage": "build"}
            writer.write(summary)
            return summary
        writer.write(run_header(command, extra={**header, "weights": weights}))
        stats = train_steps(
            model, seq, steps, warmup, PhaseRecorder(), model.config.vocab_size, writer=writer, scorer_timer=timer
        )
        summary = stats.as_record()
        writer.write(summary)
    return summary


def spawn(args: argparse.Namespace, method: str, seq: int, path: Path, steps: int, warmup: int) -> dict:
    """Run one configuration in a fresh process and return its summary (status "failed" if it crashed)."""
    cmd = [sys.executable, "-m", "jenga.experiments.run", "--model", args.model, "--worker", method, str(seq)]
    cmd += ["--steps", str(steps), "--warmup", str(warmup), "--log", str(path)]
    cmd += ["--sweep-command", " ".join([Path(sys.executable).name, "-m", "jenga.experiments.run", *sys.argv[1:]])]
    if args.memory_gib is not None:
        cmd += ["--memory-gib", str(args.memory_gib)]
    result = subprocess.run(cmd)
    records = read_jsonl(path) if path.exists() else []
    summary = next((r for r in records if r.get("record") == "summary"), None)
    if summary is None:
        summary = {"record": "summary", "status": "failed", "exit_code": result.returncode}
        with JsonlWriter(path, append=True) as writer:
            writer.write(summary)
    return summary


def sweep(args: argparse.Namespace) -> None:
    configs = [(m, s) for s in args.seqs for m in args.methods]
    for method, seq in tqdm(configs, desc=f"{args.model} sweep", unit="run"):
        path = log_path(args.logs, args.model, method, seq)
        if is_complete(path) and not args.force:
            tqdm.write(f"skip {path.name} (complete; --force reruns)")
            continue
        path.unlink(missing_ok=True)
        summary = spawn(args, method, seq, path, args.steps, args.warmup)
        peak, step = summary.get("peak_gib"), summary.get("median_step_s")
        tqdm.write(f"{method} {seq}: {summary.get('status')} peak={peak} step={step}")


def longest_fitting(
    fits: Callable[[int], bool], step: int, cap: int, start: int | None = None
) -> tuple[int, int | None]:
    """(longest multiple of `step` for which `fits` holds, first failing length or None up to `cap`).

    Doubles from `start` (default `step`) until a failure or `cap`, then bisects in multiples of `step`;
    assumes that fitting is monotone in the length (memory grows with it).
    """
    good, bad, seq = 0, None, start or step
    while seq <= cap:
        if not fits(seq):
            bad = seq
            break
        good, seq = seq, seq * 2
    while bad is not None and bad - good > step:
        mid = (good + bad) // 2 // step * step
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, bad


def max_length(args: argparse.Namespace) -> None:
    """Longest trainable length per method; probe logs under <logs>/probes, results under <logs>/maxlen."""
    for method in args.methods:
        probes: dict[int, str] = {}

        def fits(seq: int, method: str = method, probes: dict[int, str] = probes) -> bool:
            path = log_path(args.logs / "probes", args.model, method, seq)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            probes[seq] = spawn(args, method, seq, path, steps=1, warmup=0)["status"]
            tqdm.write(f"{method} {seq}: {probes[seq]}")
            return probes[seq] == "ok"

        good, bad = longest_fitting(fits, args.length_step, args.cap, args.start)
        header = run_header(extra={"experiment": "max_length", "model": Path(args.model).name, "method": method})
        result_path = args.logs / "maxlen" / f"{Path(args.model).name}_{method}.jsonl"
        result_path.parent.mkdir(parents=True, exist_ok=True)
        with JsonlWriter(result_path, header=header) as writer:
            writer.write(
                {
                    "record": "max_length",
                    "method": method,
                    "max_ok": good,
                    "first_oom": bad,
                    "cap": args.cap,
                    "step": args.length_step,
                    "probes": probes,
                }
            )
        print(f"{method}: longest trainable {good} (first failing {bad}, cap {args.cap})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Jenga experiment runner (see module docstring)")
    parser.add_argument("--model", required=True, help="folder under checkpoints/ or a path with config.json")
    parser.add_argument("--methods", nargs="+", default=["lora", "jenga"], choices=list(METHODS))
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--steps", type=int, default=5, help="measured steps after warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--logs", type=Path, default=Path("logs/runs"))
    parser.add_argument("--force", action="store_true", help="rerun configurations whose log is complete")
    parser.add_argument("--memory-gib", type=float, help="cap this process's GPU memory (e.g. 48 for the A40 set)")
    parser.add_argument("--max-length", action="store_true", help="search the longest trainable length instead")
    parser.add_argument("--length-step", type=int, default=4096)
    parser.add_argument("--cap", type=int, default=131072, help="longest length the search tries")
    parser.add_argument("--start", type=int, help="first length the search tries (a multiple of --length-step)")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SEQ"), help=argparse.SUPPRESS)
    parser.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sweep-command", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_one(
            args.model,
            args.worker[0],
            int(args.worker[1]),
            args.steps,
            args.warmup,
            args.log,
            args.memory_gib,
            command=args.sweep_command,
        )
        return
    args.logs.mkdir(parents=True, exist_ok=True)
    (max_length if args.max_length else sweep)(args)


if __name__ == "__main__":
    main()

"""Core benchmark: peak memory and step time of HF+PEFT LoRA vs Jenga on one GPU, side by side.

Each (method, length) runs in its own process so allocator peaks never leak between runs. Writes one
JSON-lines log per run and a Markdown table (RESULTS-core.md) to --out.

    python benchmarks/bench_core.py --model llama-2-7b --seqs 4096 8192 --out $OUT
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from jenga import JengaConfig, apply_jenga
from jenga.experiments.training import add_attention_lora, load_model, read_jsonl, train_steps
from jenga.patching.base import oracle_scorer
from jenga.profiling import JsonlWriter, PhaseRecorder, TimedScorer, run_header


@dataclass(frozen=True)
class Method:
    """A benchmark method: an optional Jenga config on top of HF+PEFT, with or without checkpointing."""

    jenga: JengaConfig | None = None
    checkpointing: bool = False

    @property
    def baseline(self) -> str:
        return "lora+ckpt" if self.checkpointing else "lora"


HALF = JengaConfig(block_size=64, attn_keep=0.5, mlp_keep=0.5, dense_first_layers=2, sink_blocks=1)
QUARTER = JengaConfig(block_size=64, attn_keep=0.25, mlp_keep=0.25, dense_first_layers=2, sink_blocks=1)
METHODS: dict[str, Method] = {
    "lora": Method(),
    "lora+ckpt": Method(checkpointing=True),
    # No elimination: sparse-saved MLP at keep 1.0 (saves only gate/up), lean norms and the segmented loss.
    "jenga-dense": Method(JengaConfig(attn_keep=1.0, mlp_keep=1.0, segment_size=1024)),
    # First 2 layers and the last dense; the rest keep half (a quarter) of their blocks and MLP channels.
    "jenga": Method(HALF),
    "jenga-0.25": Method(QUARTER),
    "jenga+ckpt": Method(HALF, checkpointing=True),
    "jenga-0.25+ckpt": Method(QUARTER, checkpointing=True),
}


def describe_run(header: dict) -> str:
    """What a logged run did, from its own header (not from today's METHODS, which may have changed)."""
    config = header.get("jenga_config")
    what = "HF+PEFT baseline" if config is None else f"Jenga `{config}`"
    return what + (" with gradient checkpointing" if header.get("gradient_checkpointing") else "")


def run_worker(args: argparse.Namespace) -> None:
    method, seq = args.worker[0], int(args.worker[1])
    config = METHODS[method].jenga
    log = Path(args.out) / f"{Path(args.model).name}_{method}_{seq}.jsonl"
    torch.manual_seed(0)
    model, weights = load_model(args.model, seq, device="cuda" if torch.cuda.is_available() else "cpu")
    if METHODS[method].checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_attention_lora(model)
    timer = None
    if config is not None:
        timer = TimedScorer(oracle_scorer)
        apply_jenga(model, config, scorer=timer)
    header = run_header(
        extra={
            "experiment": "bench_core",
            "model": args.model,
            "weights": weights,
            "method": method,
            "seq_len": seq,
            "batch": 1,
            "dtype": "bfloat16",
            "lora": "r=8 q/k/v/o",
            "jenga_config": None if config is None else config.to_dict(),
            "gradient_checkpointing": METHODS[method].checkpointing,
        }
    )
    with JsonlWriter(log, header=header) as writer:
        stats = train_steps(
            model,
            seq,
            args.steps,
            args.warmup,
            PhaseRecorder(),
            model.config.vocab_size,
            writer=writer,
            scorer_timer=timer,
        )
        writer.write(stats.as_record())
    print(f"{method} {seq}: {stats.status} peak={stats.peak_gib} step={stats.median_step_s}", flush=True)


def summarize(out: Path, model: str, seqs: list[int], title: str = "Core benchmark") -> str:
    """Markdown table of the runs logged in `out`, with device, versions, date and command from their headers."""
    rows, header, described, commands = [], None, {}, set()
    for seq in seqs:
        summaries = {}
        for method in METHODS:
            path = out / f"{Path(model).name}_{method}_{seq}.jsonl"
            if not path.exists():
                continue
            records = read_jsonl(path)
            run = next((r for r in records if r.get("record") == "header"), {})
            header = header or run
            commands.add(run.get("command", "").split(" --worker ")[0])
            described[method] = describe_run(run)
            summary = next((r for r in records if r.get("record") == "summary"), {"status": "incomplete"})
            steps = [r for r in records if r.get("record") == "step"]
            measured = [r for r in steps if not r["warmup"]]
            for phase in ("forward", "backward", "scoring"):
                values = [r[f"{phase}_s"] for r in measured if f"{phase}_s" in r]
                summary[f"{phase}_s"] = statistics.median(values) if values else None
            summary["first_loss"] = steps[0]["loss"] if steps else None
            summaries[method] = summary
        for method, summary in summaries.items():
            base = summaries.get(METHODS[method].baseline, {})
            rows.append((seq, method, summary, base if base.get("status") == "ok" else {}))
    lines = [
        f"## {title}: {model}, batch 1, bf16, LoRA r=8 q/k/v/o, SDPA, AdamW",
        "",
        f"- device: {header and header.get('device')}; torch {header and header.get('torch')}, "
        f"transformers {header and header.get('transformers')}, peft {header and header.get('peft')}, "
        f"triton {header and header.get('triton')}; git {header and header.get('git_commit')}",
        f"- date: {header and header.get('date')}; weights: {header and header.get('weights')}",
        "- commands (each run in its own process: the command plus `--worker METHOD LENGTH`): "
        + "; ".join(f"`{c}`" for c in sorted(commands)),
        "- peak = torch.cuda.max_memory_allocated over all steps (weights included); step = median of the "
        "measured steps after warm-up",
        "",
        "| length | method | peak GiB | peak / base | step s | step / base | forward s | backward s "
        "| scoring s | first-step loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seq, method, summary, base in rows:
        if summary.get("status") != "ok":
            lines.append(f"| {seq} | {method} | {summary.get('status', 'missing').upper()} |" + " |" * 7)
            continue
        cells = [seq, method]
        for key, digits in (("peak_gib", 1), ("median_step_s", 3)):
            value, reference = summary.get(key), base.get(key)
            cells.append("—" if value is None else f"{value:.{digits}f}")
            cells.append("—" if value is None or not reference else f"{value / reference:.2f}")
        cells += [
            "—" if summary[f"{phase}_s"] is None else f"{summary[f'{phase}_s']:.3f}"
            for phase in ("forward", "backward", "scoring")
        ]
        cells.append(f"{summary['first_loss']:.4f}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "`base` is `lora`, or `lora+ckpt` for methods with gradient checkpointing. Methods:"]
    lines += [f"- `{name}`: {text}" for name, text in described.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/logs/core")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker:
        run_worker(args)
        return
    for seq in args.seqs:
        for method in args.methods:
            worker = [*sys.argv, "--worker", method, str(seq)]
            result = subprocess.run([sys.executable, *worker])
            if result.returncode != 0:
                print(f"worker {method} {seq} failed with exit code {result.returncode}", file=sys.stderr)
    report = summarize(Path(args.out), args.model, args.seqs)
    (Path(args.out) / "RESULTS-core.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()

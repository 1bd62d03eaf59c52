"""Rebuilds benchmarks/RESULTS.md from the committed JSON-lines logs (CPU only; run by RUNME-a.sh)."""

from __future__ import annotations

from pathlib import Path

from jenga.plotting.tables import runs_table
from jenga.profiling import read_jsonl

HERE = Path(__file__).parent
LOGS = HERE / "logs"

PREAMBLE = """# Benchmark results

Generated from the JSON-lines logs in `benchmarks/logs/` by `bash RUNME-a.sh` (no GPU needed); the logs come
from real runs of the commands named in each section, on the device each section names. Do not edit by hand.

"""

RUN_FOLDERS = [
    ("e2e", "End-to-end sweep"),
    ("predictor-timing", "Selection cost: oracle scoring vs two-tower predictors (random-init weights, timing only)"),
    ("core", "Core benchmark (Triton block scoring, lean norms)"),
    ("core-reference-scorer", "Core benchmark, first run (PyTorch reference scorer, no lean norms)"),
]


def run_sections() -> list[str]:
    sections = []
    for folder, title in RUN_FOLDERS:
        models = sorted({p.name.split("_")[0] for p in (LOGS / folder).glob("*_*_*.jsonl")})
        sections += [t for model in models if (t := runs_table(LOGS / folder, model, title))]
    return sections


def max_length_section() -> str | None:
    paths = sorted((LOGS / "e2e" / "maxlen").glob("*.jsonl"))
    if not paths:
        return None
    lines = [
        "## Longest trainable sequence (one training step without OOM: doubling, then bisection)",
        "",
        "| model | method | longest OK | first OOM | bisection step | probes (length: status) |",
        "|---|---|---|---|---|---|",
    ]
    for path in paths:
        records = read_jsonl(path)
        header, result = records[0], next(r for r in records if r.get("record") == "max_length")
        probes = ", ".join(f"{k}: {v}" for k, v in sorted(result["probes"].items(), key=lambda kv: int(kv[0])))
        first_oom = result["first_oom"] or f"none up to {result['cap']}"
        command = header.get("command", "").split()
        step = result.get("step") or int(
            command[command.index("--length-step") + 1] if "--length-step" in command else 4096
        )
        lines.append(
            f"| {header['model']} | {result['method']} | {result['max_ok']} | {first_oom} | {step} | {probes} |"
        )
    first = read_jsonl(paths[0])[0]
    lines += [
        "",
        f"Device {first['device']}, git {first['git_commit']}, {first['date']}; probe logs in `logs/e2e/probes/`; "
        "the first probe length comes from the runner's `--start` (a length the sweep showed to fit).",
    ]
    return "\n".join(lines) + "\n"


def kernel_section() -> str | None:
    path = LOGS / "kernels" / "kernels.jsonl"
    if not path.exists():
        return None
    records = read_jsonl(path)
    header = records[0]
    peak = next(r["tflops"] for r in records if r["record"] == "matmul")
    checks = "; ".join(
        f"{r['what']} kv_heads={r['kv_heads']} S={r['seq']}: {r['rel_err']}" for r in records if r["record"] == "check"
    )
    lines = [
        "## Kernels (`benchmarks/bench_kernels.py`)",
        "",
        f"- device: {header['device']}; torch {header['torch']}, triton {header['triton']}; git {header['git_commit']}",
        f"- date: {header['date']}; command: `{header['command']}`",
        f"- bf16 checks against the references (relative error, must be < 1e-2 before timing): {checks}",
        f"- measured bf16 matmul (8192³): {peak:.0f} TFLOP/s",
        "",
        "Block-scoring kernel (32 query heads, head_dim 128, block 64; FLOPs = causal half of q·kᵀ; the launch",
        "(tile, warps, stages) is chosen per shape by one timing of each candidate):",
        "",
        "| kv heads | length | ms | TFLOP/s | of matmul rate |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['kv_heads']} | {r['seq']} | {r['ms']:.2f} | {r['tflops']:.0f} | {r['of_matmul']:.0%} |"
        for r in records
        if r["record"] == "scoring"
    ]
    lines += [
        "",
        "Attention forward+backward over kept blocks (gather q/k/v rows, causal SDPA, scatter) vs dense causal SDPA:",
        "",
        "| length | keep | ms | vs dense SDPA |",
        "|---|---|---|---|",
    ]
    for r in records:
        if r["record"] == "attention":
            dense = r["method"] == "dense_sdpa"
            keep, ratio = ("dense", "1.00") if dense else (r["keep"], f"{r['vs_dense']:.2f}")
            lines.append(f"| {r['seq']} | {keep} | {r['ms']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    sections = [s for s in [*run_sections(), max_length_section(), kernel_section()] if s]
    (HERE / "RESULTS.md").write_text(PREAMBLE + "\n".join(sections))
    print(f"wrote {HERE / 'RESULTS.md'} ({len(sections)} sections)")


if __name__ == "__main__":
    main()

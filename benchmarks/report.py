"""Rebuilds benchmarks/RESULTS.md from the committed JSON-lines logs (CPU only; run by RUNME-a.sh)."""

from __future__ import annotations

from pathlib import Path

from bench_core import summarize

from jenga.experiments.training import read_jsonl

HERE = Path(__file__).parent
LOGS = HERE / "logs"

PREAMBLE = """# Benchmark results

Generated from the JSON-lines logs in `benchmarks/logs/` by `bash RUNME-a.sh` (no GPU needed); the logs come
from real runs of the scripts named in each section, on the device each section names. Do not edit by hand.

"""

CORE_RUNS = [
    ("core", "Core benchmark (Triton block scoring, lean norms)"),
    ("core-reference-scorer", "Core benchmark, first run (PyTorch reference scorer, no lean norms)"),
]


def core_sections() -> list[str]:
    sections = []
    for folder, title in CORE_RUNS:
        logs = sorted((LOGS / folder).glob("*.jsonl"))
        if not logs:
            continue
        models = sorted({p.name.split("_")[0] for p in logs})
        seqs = sorted({int(p.stem.rsplit("_", 1)[1]) for p in logs})
        sections += [summarize(LOGS / folder, model, seqs, title) for model in models]
    return sections


def kernel_section() -> str | None:
    path = LOGS / "kernels" / "kernels.jsonl"
    if not path.exists():
        return None
    records = read_jsonl(path)
    header = records[0]
    peak = next(r["tflops"] for r in records if r["record"] == "matmul")
    lines = [
        "## Kernels (`benchmarks/bench_kernels.py`)",
        "",
        f"- device: {header['device']}; torch {header['torch']}, triton {header['triton']}; git {header['git_commit']}",
        f"- date: {header['date']}; command: `{header['command']}`",
        "- bf16 checks against the references (relative error, must be < 1e-2 before timing): "
        + "; ".join(
            f"{r['what']} kv_heads={r['kv_heads']} S={r['seq']}: {r['rel_err']}"
            for r in records
            if r["record"] == "check"
        ),
        f"- measured bf16 matmul (8192³): {peak:.0f} TFLOP/s",
        "",
        "Block-scoring kernel (32 query heads, head_dim 128, block 64; FLOPs = causal half of q·kᵀ):",
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
            ratio = "1.00 (dense)" if r["method"] == "dense_sdpa" else f"{r['vs_dense']:.2f}"
            lines.append(
                f"| {r['seq']} | {r['keep'] if r['method'] != 'dense_sdpa' else 'dense'} | {r['ms']:.2f} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    sections = [s for s in [*core_sections(), kernel_section()] if s]
    (HERE / "RESULTS.md").write_text(PREAMBLE + "\n".join(sections))
    print(f"wrote {HERE / 'RESULTS.md'} ({len(sections)} sections)")


if __name__ == "__main__":
    main()

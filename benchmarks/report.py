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
    ("shared-selection", "One block selection for all sparse layers (shared_selection) against per-layer selection"),
    ("core-reference-scorer", "Core benchmark, first run (PyTorch reference scorer, no lean norms)"),
]


def run_sections() -> list[str]:
    sections = []
    for folder, title in RUN_FOLDERS:
        models = sorted({p.name.split("_")[0] for p in (LOGS / folder).glob("*_*_*.jsonl")})
        sections += [t for model in models if (t := runs_table(LOGS / folder, model, title))]
    return sections


def max_length_section() -> str | None:
    """Longest trainable length per model and method, read from every probe log (searches and single probes).

    A probe is one training step at one length in its own process; the longest length that passed and the
    shortest failing length above it bracket the limit. Ratios are against the baseline of the same kind
    (with or without gradient checkpointing).
    """
    runs: dict[tuple[str, str], list[tuple[int, str, dict]]] = {}
    for path in sorted((LOGS / "e2e" / "probes").glob("*_*_*.jsonl")):
        model, method, seq = path.stem.split("_")
        records = read_jsonl(path)
        summary = next((r for r in records if r.get("record") == "summary"), {"status": "incomplete"})
        runs.setdefault((model, method), []).append((int(seq), summary["status"], records[0]))
    if not runs:
        return None
    longest = {key: max((s for s, status, _ in probes if status == "ok"), default=0) for key, probes in runs.items()}
    lines = [
        "## Longest trainable sequence (one training step without OOM; every probe, one process each)",
        "",
        "| model | method | longest OK | first failing above | vs baseline | probes (length: status) | device, git |",
        "|---|---|---|---|---|---|---|",
    ]
    for (model, method), probes in sorted(runs.items()):
        best = longest[(model, method)]
        failing = min((s for s, status, _ in probes if s > best and status != "ok"), default=None)
        baseline = (model, "lora+ckpt" if method.endswith("+ckpt") else "lora")
        ratio = f"{best / longest[baseline]:.2f}x" if longest.get(baseline) and baseline != (model, method) else ""
        listed = ", ".join(f"{s}: {status}" for s, status, _ in sorted(probes, key=lambda p: p[0]))
        where = sorted({f"{h.get('device')} {h.get('git_commit')}" for _, _, h in probes})
        lines.append(f"| {model} | {method} | {best} | {failing or '-'} | {ratio} | {listed} | {'; '.join(where)} |")
    lines += ["", "Probe logs in `benchmarks/logs/e2e/probes/`; the searches that chose them in `e2e/maxlen/`."]
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

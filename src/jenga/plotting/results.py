"""benchmarks/RESULTS.md from the benchmark logs (CPU only): the runner sweeps, the longest trainable lengths and
the kernel timings (attention, scoring, element-wise), one generator with the figures so that `python -m
jenga.plotting` rebuilds every result."""

from __future__ import annotations

from pathlib import Path

from .logs import baseline_method, load_runs, runner_runs
from .tables import runs_table

PREAMBLE = """# Benchmark results

Generated from the JSON-lines logs in `benchmarks/logs/` by `bash RUNME-a.sh` (no GPU needed); the logs come
from real runs of the commands named in each section, on the device each section names. Do not edit by hand.
The last sweep sections read `logs/real-model/bench` (the keep-0.5 schedule's cost) and `logs/longest`.

"""

# The sweeps under benchmarks/logs, then those under logs/, with their section titles.
BENCH_SWEEPS = [
    ("e2e", "End-to-end sweep"),
    ("predictor-timing", "Selection cost: oracle scoring vs two-tower predictors (random-init weights, timing only)"),
    ("core", "Core benchmark (Triton block scoring, lean norms)"),
    ("shared-selection", "One block selection for all sparse layers (shared_selection) against per-layer selection"),
    ("core-reference-scorer", "Core benchmark, first run (PyTorch reference scorer, no lean norms)"),
    ("eliminated-local", "The schema-1 default (a block-local attention pass for eliminated tokens), 8K"),
    ("saved-attention", "Checkpointing whose recompute reuses the attention outputs (+attnckpt) against plain +ckpt"),
    ("fewer-checkpoints/first-fit-h100", "Only the first layers checkpointed (+fitckpt, the first fit) against +ckpt"),
    ("fewer-checkpoints/fit-h100", "Only the first layers checkpointed, as many as fit (+fitckpt, +fitattnckpt)"),
    ("fewer-checkpoints/h200-uncapped", "scripts/fewer-checkpoints/run.sh uncapped, H200: as few checkpoints as fit"),
]
FIGURE_SWEEPS = [
    ("real-model/bench", "The keep-0.5 schedule of config schemas 2-3 on 7B/8B architectures (random weights)"),
    ("longest/shared-64k-h200", "64K on one H200 (uncapped): checkpoints on the GPU (+ckpt) or offloaded (+offckpt)"),
]


def run_sections(bench_logs: Path, logs: Path) -> list[str]:
    """One section per sweep folder and model (models by name)."""
    sweeps = [(bench_logs / f, t) for f, t in BENCH_SWEEPS] + [(logs / f, t) for f, t in FIGURE_SWEEPS]
    sections = []
    for folder, title in sweeps:
        models = sorted({model for model, _, _ in runner_runs(folder)})
        sections += [t for model in models if (t := runs_table(folder, model, title))]
    return sections


def max_length_section(probes: Path) -> str | None:
    """Longest trainable length per model and method, read from every probe log (searches and single probes).

    A probe is one training step at one length in its own process; the longest length that passed and the
    shortest failing length above it bracket the limit. Ratios are against the baseline of the same kind
    (with or without gradient checkpointing).
    """
    runs: dict[tuple[str, str], list[tuple[int, dict, dict]]] = {}
    for (model, method, seq), run in sorted(runner_runs(probes).items()):
        runs.setdefault((model, method), []).append((seq, run.summary, run.header))
    if not runs:
        return None
    longest = {key: max((s for s, r, _ in probes if r["status"] == "ok"), default=0) for key, probes in runs.items()}
    lines = [
        "## Longest trainable sequence (one training step without OOM; every probe, one process each)",
        "",
        "| model | method | longest OK | first failing above | vs baseline | host peak GiB there | probes (length: "
        "status) | device, git |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, method), found in sorted(runs.items()):
        best = longest[(model, method)]
        failing = min((s for s, r, _ in found if s > best and r["status"] != "ok"), default=None)
        baseline = (model, baseline_method(found[0][2]))
        ratio = f"{best / longest[baseline]:.2f}x" if longest.get(baseline) and baseline != (model, method) else ""
        # the process's peak resident host memory at the longest length (pinned offload buffers included)
        host = next((r.get("host_peak_gib") for s, r, _ in found if s == best and r["status"] == "ok"), None)
        host_cell = f"{host:.1f}" if host is not None else "—"
        listed = ", ".join(f"{s}: {r['status']}" for s, r, _ in found)
        where = sorted({f"{h.get('device')} {h.get('git_commit')}" for _, _, h in found})
        cells = [model, method, str(best), str(failing or "-"), ratio, host_cell, listed, "; ".join(where)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Probe logs in `benchmarks/logs/e2e/probes/`; the searches that chose them in `e2e/maxlen/`."]
    return "\n".join(lines) + "\n"


def _bench_heading(title: str, header: dict) -> list[str]:
    """A benchmark section's title and where and how it ran."""
    return [
        f"## {title}",
        "",
        f"- device: {header['device']}; torch {header['torch']}, triton {header['triton']}; git {header['git_commit']}",
        f"- date: {header['date']}; command: `{header['command']}`",
    ]


def _check(record: dict) -> str:
    """One bf16 check of the kernel benchmark: per shape its errors, or (`jenga.kernel_checks.one_call_attention`)
    per case its dense / kept kernels and largest error, or why it fell back."""
    if "kv_heads" in record:
        return f"{record['what']} kv_heads={record['kv_heads']} S={record['seq']}: {record['rel_err']}"

    def case(name: str, v: dict) -> str:
        if "error" in v:
            return f"{name} {v['error']}"
        # logs before commit 660da16 name one kernel, the kept pass's
        kernels = f"kept {v['kernel']}" if "kernel" in v else f"{v['dense_kernel']} / {v['kept_kernel']}"
        return f"{name} ({kernels}) {max(v['relative_errors']):.1e}"

    return f"{record['what']}: " + ", ".join(case(k, v) for k, v in record.items() if isinstance(v, dict))


def kernel_section(folder: Path, title: str = "Kernels (`benchmarks/bench_kernels.py`)") -> str | None:
    """The kernel benchmark (`benchmarks/bench_kernels.py`): correctness checks, scoring and attention timings."""
    run = next((r for r in load_runs(folder) if r.header.get("experiment") == "bench_kernels"), None)
    if run is None:
        return None
    header = run.header
    peak = run.of("matmul")[0]["tflops"]
    lines = [
        *_bench_heading(title, header),
        "- bf16 checks against the references (relative error, must be < 1e-2 before timing): "
        + "; ".join(_check(r) for r in run.of("check")),
        f"- measured bf16 matmul (8192³): {peak:.0f} TFLOP/s",
    ]
    if run.of("scoring"):
        lines += [
            "",
            "Block-scoring kernel (32 query heads, head_dim 128, block 64; FLOPs = causal half of q·kᵀ; the launch",
            "(tile, warps, stages) is chosen per shape by one timing of each candidate):",
            "",
            "| kv heads | length | ms | TFLOP/s | of matmul rate |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['kv_heads']} | {r['seq']} | {r['ms']:.2f} | {r['tflops']:.0f} | {r['of_matmul']:.0%} |"
            for r in run.of("scoring")
        ]
    lines += [
        "",
        "Attention over kept blocks vs dense causal SDPA, forward + backward (`kept_sdpa`: gather q/k/v rows, causal",
        "SDPA, scatter; a sparse layer's whole attention, `two_pass`: a dense forward without autograd, then",
        "`kept_sdpa`, and `one_call`: the dense forward keeping its softmax statistics, the kept rows' backward",
        "from them (`jenga.attention`); `flex_block_mask`: FlexAttention with a block mask of the kept blocks;",
        "TFLOP/s of the kept tokens' causal attention, the backward counted as 2.5 forwards; logs before the",
        "forward was timed apart have no forward, backward or TFLOP/s, and timed 32 kv heads):",
        "",
        "| length | kv heads | method | keep | ms | forward ms | backward ms | TFLOP/s | of matmul | vs dense SDPA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in run.of("attention"):
        ratio = 1.0 if r["method"] == "dense_sdpa" else r["vs_dense"]
        cells = [r["seq"], r.get("kv_heads", 32), r["method"], r["keep"], f"{r['ms']:.2f}"]
        cells += [_cell(r, "forward_ms", ".2f"), _cell(r, "backward_ms", ".2f"), _cell(r, "tflops", ".0f")]
        cells += [_cell(r, "of_matmul", ".0%"), f"{ratio:.2f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def _cell(record: dict, key: str, spec: str) -> str:
    return "—" if record.get(key) is None else format(record[key], spec)


def elementwise_section(folder: Path) -> str | None:
    """The element-wise kernels (`benchmarks/bench_elementwise.py`): their bf16 checks, their time against the
    eager passes they replace and, where Liger Kernel was installed, against Liger's kernel for the same op."""
    run = next((r for r in load_runs(folder) if r.header.get("experiment") == "bench_elementwise"), None)
    if run is None:
        return None
    header = run.header
    checks = ", ".join(f"{r['what']}: {'ok' if r['ok'] else 'FAILED'}" for r in run.of("check"))
    lines = [
        *_bench_heading("Element-wise kernels (`benchmarks/bench_elementwise.py`)", header),
        f"- bf16 checks against the references (before any timing): {checks}",
        "",
        "Each kernel against the eager PyTorch passes it replaces (8192 rows"
        + (", 1024 for a loss segment" if run.of("loss") else "")
        + "; `_fp8` ops also write the float8 copy backward reads):",
        "",
        "| op | shape | kernel ms | eager ms | speed-up | kernel GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in run.of("fp8") + run.of("loss") + run.of("rotary"):
        shape = (
            f"{r['rows']}x{r['cols']}" if "cols" in r else f"{r['tokens']} tokens, {r['heads']}/{r['kv_heads']} heads"
        )
        speedup = r["eager_ms"] / r["kernel_ms"]
        cells = [
            r["op"],
            shape,
            f"{r['kernel_ms']:.3f}",
            f"{r['eager_ms']:.3f}",
            f"{speedup:.1f}x",
            f"{r['kernel_gb_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    liger = run.of("liger")
    if liger:
        lines += [
            "",
            f"Jenga's kernel against Liger Kernel's for the same op, forward + backward ({_liger(header)}):",
            "",
            "| op | shape | Jenga ms | Liger ms | Jenga / Liger |",
            "|---|---|---|---|---|",
        ]
        for r in liger:
            shape = f"{r['rows']}x{r['cols']}" if "cols" in r else f"{r['rows']} tokens, {r['kv_heads']} kv heads"
            ratio = r["jenga_ms"] / r["liger_ms"]
            lines.append(f"| {r['op']} | {shape} | {r['jenga_ms']:.3f} | {r['liger_ms']:.3f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def _liger(header: dict) -> str:
    """Which Liger the header says ran (from its optional packages, or the note added to older logs)."""
    version = header.get("optional_packages", {}).get("liger-kernel")
    return f"liger-kernel {version}" if version else header.get("git_commit_note", "Liger's version not logged")


def write_results(bench_logs: Path, logs: Path, out: Path) -> list[Path]:
    """`out` (benchmarks/RESULTS.md) from the benchmark logs and the sweeps of `logs`; [] when there are none."""
    found = [*run_sections(bench_logs, logs), max_length_section(bench_logs / "e2e/probes")]
    kernels = [
        kernel_section(bench_logs / "kernels"),
        kernel_section(bench_logs / "kernels-one-call", "Kernels: one attention call per sparse layer (`one_call`)"),
        elementwise_section(bench_logs / "elementwise"),
    ]
    sections = [s for s in [*found, *kernels] if s]
    if not sections:
        return []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(PREAMBLE + "\n".join(sections))
    return [out]

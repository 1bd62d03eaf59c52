"""The accuracy tables and figure (the paper's perplexity and LongBench tables): base model and each
fine-tuning method, mean and spread over seeds, read from `python -m jenga.experiments.accuracy` logs.

The tables hold every method found in the logs, ablations included; the figure draws only the main methods.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure

from .logs import load_runs
from .style import color, figure, save

# The methods of the retrieval figure, in legend order, with their legend names and (colour, line, marker).
MAIN_METHODS: dict[str, tuple[str, tuple[str, str, str]]] = {
    "base": ("base (no fine-tune)", ("black", "--", "o")),
    "lora": ("dense LoRA", (color("lora"), "-", "o")),
    "longlora": ("LongLoRA", (color("longlora"), "-", "o")),
    "jenga": ("Jenga", (color("jenga"), "-", "o")),
    "jenga-predictor": ("Jenga predictor", ("#ff7f0e", "--", "s")),
    "jenga-nolocal": ("Jenga zero-output", ("#2ca02c", ":", "^")),
}
METHOD_ORDER = (*MAIN_METHODS, "jenga-predictor-nolocal", "jenga-norecent", "jenga-predictor-norecent")


def load_accuracy(logs: Path) -> dict[str, list[dict]]:
    """Complete evaluation logs grouped by their header's method: per run, its header, perplexities, task cells
    and per-task mean scores."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for log in load_runs(logs):
        if log.header.get("experiment") != "accuracy" or "method" not in log.header or not log.of("summary"):
            continue
        run = {
            "header": log.header,
            "ppl": {r["window"]: r["perplexity"] for r in log.of("perplexity")},
            "cells": log.of("task"),
        }
        run["means"] = task_means(run)
        runs[log.header["method"]].append(run)
    return dict(sorted(runs.items(), key=lambda kv: METHOD_ORDER.index(kv[0]) if kv[0] in METHOD_ORDER else 99))


def task_means(run: dict, by: str | None = None) -> dict:
    """Sample-weighted mean score per task (or per (task, `by`) value)."""
    sums: dict = defaultdict(float)
    counts: dict = defaultdict(int)
    for cell in run["cells"]:
        key = cell["task"] if by is None else (cell["task"], cell[by])
        sums[key] += cell["score"] * cell["samples"]
        counts[key] += cell["samples"]
    return {k: sums[k] / counts[k] for k in sums}


def _mean_spread(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def accuracy_table(runs: dict[str, list[dict]]) -> str:
    """Markdown: perplexity per window and score per task, mean ± half-range over seeds, plus Jenga vs LoRA."""
    windows = sorted({w for rs in runs.values() for r in rs for w in r["ppl"]})
    task_names = sorted({c["task"] for rs in runs.values() for r in rs for c in r["cells"]})
    head = ["method", "seeds"] + [f"ppl @{w}" for w in windows] + task_names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, rs in runs.items():
        seeds = ", ".join(str(r["header"]["seed"]) for r in rs if r["header"].get("seed") is not None) or "—"
        cells = [_mean_spread([r["ppl"][w] for r in rs if w in r["ppl"]], 3) for w in windows]
        cells += [_mean_spread([r["means"][t] for r in rs if t in r["means"]], 1) for t in task_names]
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    if "lora" in runs:
        lines += ["", "Against dense LoRA (means over seeds): perplexity ratio and score difference in points.", ""]
        lines += ["| method | " + " | ".join([f"ppl @{w}" for w in windows] + task_names) + " |"]
        lines += ["|---|" + "---|" * (len(windows) + len(task_names))]
        ref = runs["lora"]
        for method in [m for m in runs if m.startswith("jenga") or m == "longlora"]:
            rs = runs[method]
            row = []
            for w in windows:
                row.append(
                    f"{statistics.mean(r['ppl'][w] for r in rs) / statistics.mean(r['ppl'][w] for r in ref):.4f}"
                )
            for t in task_names:
                delta = statistics.mean(r["means"][t] for r in rs) - statistics.mean(r["means"][t] for r in ref)
                row.append(f"{delta:+.1f}")
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def lm_eval_table(folder: Path) -> str | None:
    """Markdown of the newest lm_eval results file per model folder under `folder` (None if there are none)."""
    rows = []
    for model in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        files = sorted(model.rglob("results_*.json"))
        if not files:
            continue
        data = json.loads(files[-1].read_text())
        results = data["results"]
        tasks = sorted(results)
        samples = {t: data["n-samples"][t]["effective"] for t in tasks}
        config = data.get("config", {})
        gpu = re.search(r"GPU 0: ([^\n]+)", data.get("pretty_env_info") or "")
        about = (data.get("lm_eval_version"), config.get("device", "?") + (f" = {gpu[1]}" if gpu else ""))
        rows.append((model.name, {t: results[t]["score,none"] for t in tasks}, samples, about, config))
    if not rows:
        return None
    tasks = sorted({t for row in rows for t in row[1]})
    version, device = rows[0][3]
    lines = [
        f"lm_eval {version} (`--model hf`, {device}, the repository's `tasks/`), merged checkpoints; "
        f"samples per task: {rows[0][2][tasks[0]]} (the first records, which span every length × depth cell); "
        "prompts longer than a checkpoint's max length are cut from the left.",
        "",
        "| checkpoint | " + " | ".join(tasks) + " | max length |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for name, scores, _, _, config in rows:
        length = config.get("model_args", {}).get("max_length", "—")
        lines.append(f"| {name} | " + " | ".join(f"{scores[t]:.1f}" for t in tasks) + f" | {length} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(logs: Path, out: Path) -> list[Path]:
    """`out/accuracy.md` (tables) and `out/retrieval.png` (score vs context length per task and method)."""
    runs = load_accuracy(logs)
    if not runs:
        return []
    headers = [r["header"] for rs in runs.values() for r in rs]
    first = headers[0]
    commits = ", ".join(sorted({str(h.get("git_commit")) for h in headers}))
    dates = sorted(str(h.get("date")) for h in headers)
    provenance = (
        f"Logs: {logs} (device {first.get('device')}, torch {first.get('torch')}, transformers "
        f"{first.get('transformers')}, git {commits}, {dates[0]} to {dates[-1]}). Scores are LongBench "
        "metrics ×100 (retrieval accuracy for passkey and kv_retrieval, token F1 for var_tracking), averaged over "
        "depths; perplexity is sliding-window (stride = window / 2) over the held-out test documents; ± is half "
        "the range over seeds."
    )
    out.mkdir(parents=True, exist_ok=True)
    table = out / "accuracy.md"
    table.write_text("# Accuracy of long-context fine-tuning (paper tables: perplexity and LongBench)\n\n")
    with table.open("a") as f:
        f.write(provenance + "\n\n" + accuracy_table(runs))
        for sub in sorted(p for p in logs.iterdir() if p.is_dir() and p.name not in ("runs", "lm_eval")):
            other = load_accuracy(sub)
            if other:
                f.write(f"\n## Base `{sub.name}` (logs: {sub})\n\n{accuracy_table(other)}")
        harness = lm_eval_table(logs / "lm_eval")
        if harness:
            f.write("\n## lm_eval on the merged checkpoints\n\n" + harness)
    fig = retrieval_figure(runs)
    caption = (
        "Retrieval score by context length of the base model and the main fine-tuning methods (mean over seeds; "
        f"ablations are in {table.name}). " + provenance
    )
    return [table, save(fig, out / "retrieval.png", caption)]


def retrieval_figure(
    runs: dict[str, list[dict]], methods: Mapping[str, tuple[str, tuple[str, str, str]]] = MAIN_METHODS
) -> Figure:
    """Score against context length, a panel per task, a line per method of `methods` found in `runs` (mean
    over seeds); one legend below the panels."""
    task_names = sorted({c["task"] for rs in runs.values() for r in rs for c in r["cells"]})
    width = max(3.4 * len(task_names), 6.8)
    fig, axes = figure(width, 3.8, ncols=len(task_names), layout="constrained")
    for ax, task in zip(axes[0], task_names, strict=True):
        for method, (label, (shade, line, marker)) in methods.items():
            per_length: dict[int, list[float]] = defaultdict(list)
            for r in runs.get(method, []):
                for (t, length), value in task_means(r, by="length").items():
                    if t == task:
                        per_length[length].append(value)
            if not per_length:
                continue
            xs = sorted(per_length)
            ys = [statistics.mean(per_length[x]) for x in xs]
            ax.plot(xs, ys, marker=marker, ms=4, mfc="none", color=shade, ls=line, label=label)
        lengths = sorted({c["length"] for rs in runs.values() for r in rs for c in r["cells"] if c["task"] == task})
        ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.set(title=task, xlabel="context length (tokens)", ylim=(-2, 102))
    axes[0][0].set_ylabel("score")
    entries = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    ncols = min(len(entries), int(width // 1.6))  # as many columns as fit the figure's width
    fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncols=ncols, frameon=False)
    fig.suptitle("Retrieval score against context length\nbase model and fine-tuning methods, mean over seeds")
    return fig

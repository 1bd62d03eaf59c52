"""Grouped bars with explicit OOM and not-run cells, shared by the ablation and extension figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..profiling import read_jsonl
from .style import PALETTE, color
from .tables import load_run

Cell = float | str | None  # a value, a failure status ("oom", "failed", ...), or None when not run


def runs_by_key(folder: Path) -> dict[tuple[str, str, int], tuple[dict, dict]]:
    """Runner logs `<model>_<method>_<length>.jsonl` of `folder` as (model, method, length) -> (header, summary)."""
    runs = {}
    for path in sorted(folder.glob("*_*_*.jsonl")) if folder.is_dir() else []:
        model, method, seq = path.stem.rsplit("_", 2)
        runs[(model, method, int(seq))] = load_run(path)
    return runs


def cell(runs: dict, key: tuple[str, str, int], field: str) -> Cell:
    """The summary's `field` of one run, its failure status, or None when it was not run."""
    if key not in runs:
        return None
    summary = runs[key][1]
    return summary.get(field) if summary.get("status") == "ok" else summary.get("status", "incomplete")


def measured_peak(path: Path) -> Cell:
    """Peak memory over a run's measured steps (warm-up excluded: an offloading run calibrates there)."""
    _, summary = load_run(path)
    if summary.get("status") != "ok":
        return summary.get("status", "incomplete")
    peaks = [r["peak_gib"] for r in read_jsonl(path) if r.get("record") == "step" and not r.get("warmup")]
    return max((p for p in peaks if p is not None), default=None) or summary.get("peak_gib")


def devices(runs: dict) -> str:
    return ", ".join(sorted({str(h.get("device")) for h, _ in runs.values() if h})) or "unknown"


def series_colors(series: Sequence[str]) -> dict[str, str]:
    """The method family's colour for the first series of each family, distinct palette colours after it."""
    colors: dict[str, str] = {}
    for j, name in enumerate(series):
        family = color(name, j)
        free = [c for c in PALETTE if c not in colors.values()] or PALETTE
        colors[name] = family if family not in colors.values() else free[0]
    return colors


def grouped_bars(ax, groups: Sequence[str], series: Sequence[str], values: dict, fmt: str, ylabel: str) -> None:
    """Bars of `values[(group, series)]`; failures are hatched and labelled, missing cells say "not run"."""
    width = 0.8 / max(1, len(series))
    numbers = [v for v in values.values() if isinstance(v, int | float)]
    top = max(numbers, default=1.0) or 1.0
    colors = series_colors(series)
    for j, name in enumerate(series):
        for i, group in enumerate(groups):
            x = i + (j - (len(series) - 1) / 2) * width
            value = values.get((group, name))
            label = name if i == 0 else None
            if value is None:
                ax.text(x, 0, "not run", ha="center", va="bottom", fontsize=6, rotation=90)
            elif isinstance(value, str):
                ax.bar(x, top * 1.05, width, color="white", edgecolor=colors[name], hatch="//", label=label)
                ax.text(x, top * 1.07, value.upper(), ha="center", fontsize=6, rotation=90)
            else:
                bar = ax.bar(x, value, width, color=colors[name], label=label)
                ax.bar_label(bar, fmt=fmt, fontsize=6)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylabel=ylabel)
    ax.set_ylim(0, top * 1.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)

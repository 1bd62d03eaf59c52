"""Grouped bars with explicit OOM and not-run cells, and the card's capacity line, shared by the figures.

An out-of-memory run needed more than the card holds: on a memory axis it is a hatched bar up to the capacity
line. Elsewhere (time axes, other failures) a run without a value is a label in its slot, never a made-up value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from .logs import Key, Run
from .style import PALETTE, color

Cell = float | str | None  # a value, a status ("oom", "failed", "n/a" for no value, ...), or None when not run
Capacity = tuple[float, str]  # the GiB a run could allocate, and the label that says where that number comes from


def cell(runs: dict[Key, Run], key: Key, field: str) -> Cell:
    """The summary's `field` of one run, its failure status, or None when it was not run."""
    if key not in runs:
        return None
    summary = runs[key].summary
    if summary.get("status") != "ok":
        return summary.get("status", "incomplete")
    return "n/a" if summary.get(field) is None else summary[field]  # n/a: e.g. the peak memory of a CPU run


def capacity(card: Path, headers: Iterable[dict]) -> Capacity | None:
    """What the runs of `card` could allocate: their memory cap, else the device memory their headers report,
    else the set's name (`80gb`: 80 GiB); None when none of these is known."""
    headers = [h for h in headers if h]
    caps = [h for h in headers if h.get("memory_cap_gib")]
    if caps:
        gib, device = min((h["memory_cap_gib"], str(h.get("device"))) for h in caps)
        return gib, f"capacity {gib:g} GiB (memory cap on {device})"
    cards = [h for h in headers if h.get("gpu_memory_gib")]
    if cards:
        gib, device = min((h["gpu_memory_gib"], str(h.get("device"))) for h in cards)
        return gib, f"capacity {gib:.1f} GiB ({device})"
    match = re.fullmatch(r"(\d+)gb", card.name)
    return (float(match[1]), f"capacity {match[1]} GiB ({card.name} set)") if match else None


def draw_capacity(ax, cap: Capacity) -> None:
    """The capacity as a dashed line across `ax`, labelled in the legend (gid "capacity")."""
    ax.axhline(cap[0], color="black", ls="--", lw=1, label=cap[1], gid="capacity", zorder=3)


def slot_label(ax, x: float, text: str, color: str = "black", rotation: float = 90) -> None:
    """A run without a bar (OOM on a time axis, failed, not run, n/a): its status written in its slot."""
    ax.text(x, 0, f" {text}", ha="center", va="bottom", fontsize=7, rotation=rotation, color=color, gid="status")


def measured_peak(run: Run) -> Cell:
    """Peak memory over a run's measured steps (warm-up excluded: an offloading run calibrates there)."""
    if not run.ok:
        return run.summary.get("status", "incomplete")
    peaks = [r["peak_gib"] for r in run.steps if not r.get("warmup")]
    peak = max((p for p in peaks if p is not None), default=None) or run.summary.get("peak_gib")
    return "n/a" if peak is None else peak


def devices(runs: Iterable[Run]) -> str:
    return ", ".join(sorted({str(run.header.get("device")) for run in runs})) or "unknown"


def series_colors(series: Sequence[str]) -> dict[str, str]:
    """The method family's colour for the first series of each family, distinct palette colours after it."""
    colors: dict[str, str] = {}
    for j, name in enumerate(series):
        family = color(name, j)
        free = [c for c in PALETTE if c not in colors.values()] or PALETTE
        colors[name] = family if family not in colors.values() else free[0]
    return colors


def oom_bar(ax, x: float, width: float, cap: Capacity, edge: str, label: str | None, rotation: float = 90) -> None:
    """An out-of-memory run on a memory axis: a hatched bar up to the capacity line, "OOM" written inside."""
    ax.bar(x, cap[0], width, color="white", edgecolor=edge, hatch="//", label=label, gid="oom")
    box = {"facecolor": "white", "edgecolor": "none", "pad": 1}
    ax.text(x, cap[0] / 2, "OOM", ha="center", va="center", fontsize=6, rotation=rotation, bbox=box)


def grouped_bars(
    ax,
    groups: Sequence[str],
    series: Sequence[str],
    values: dict,
    fmt: str,
    ylabel: str,
    cap: Capacity | None = None,
) -> None:
    """Bars of `values[(group, series)]`. With `cap` (a memory axis) the capacity line is drawn and OOM runs are
    hatched bars up to it; other cells without a value are labelled in their slot ("not run" when missing)."""
    width = 0.8 / max(1, len(series))
    numbers = [v for v in values.values() if isinstance(v, int | float)]
    top = max([*numbers, cap[0] if cap else 0.0], default=1.0) or 1.0
    colors = series_colors(series)
    if cap is not None:
        draw_capacity(ax, cap)
    for j, name in enumerate(series):
        labelled = False
        for i, group in enumerate(groups):
            x = i + (j - (len(series) - 1) / 2) * width
            value = values.get((group, name))
            label = None if labelled else name
            if isinstance(value, int | float):
                bar = ax.bar(x, value, width, color=colors[name], label=label)
                ax.bar_label(bar, fmt=fmt, fontsize=6)
            elif value == "oom" and cap is not None:
                oom_bar(ax, x, width, cap, colors[name], label)
            else:
                slot_label(ax, x, "not run" if value is None else value.upper(), colors[name])
                continue
            labelled = True
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set(ylabel=ylabel)
    ax.set_ylim(0, top * 1.15)


def legend_outside(ax, sources: Sequence | None = None) -> None:
    """One legend right of `ax`, outside the data, with every labelled artist of `sources` (default: `ax`)."""
    entries: dict[str, object] = {}
    for source in [ax] if sources is None else sources:
        for handle, label in zip(*source.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        ax.legend(list(entries.values()), list(entries), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))

"""Figures 12 and 13: peak memory and step time per model and method, and both against sequence length.

Reads the runner logs of `<logs>/<card>/` (bars) and
`<logs>/<card>/length/` plus the same card's per-model runs of that model (lines). Models are ordered by size.
Runs that ran out of memory are never left out: on memory axes they reach the card's capacity line (a hatched
bar, or an x on the line of the length plot); on time axes they are labelled OOM in their slot (bars) or marked
in an OOM row above the plot (length plot).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from .bars import Capacity, capacity, cell, devices, draw_capacity, grouped_bars, legend_outside
from .logs import Key, Run, cards, runner_runs
from .models import by_size
from .style import color, figure, in_method_order, save

METHODS = in_method_order({"lora", "longlora", "jenga"})  # the paper's figures 12-13 compare these three
QUANTITIES = (("peak_gib", "peak memory (GiB)", "memory", 12), ("median_step_s", "step time (s)", "time", 13))

Runs = dict[Key, Run]


def bars_figure(runs: Runs, seq: int, key: str, ylabel: str, cap: Capacity | None) -> Figure | None:
    """`key` per model (smallest first) and method at `seq` tokens; the capacity line on the memory figure."""
    models = by_size(m for m, _, s in runs if s == seq)
    if not models:
        return None
    fig, axes = figure(1.5 * len(models) + 3.2, 3.4)  # + the legend right of the axes
    ax = axes[0][0]
    values = {(model, method): cell(runs, (model, method, seq), key) for model in models for method in METHODS}
    fmt = "%.1f" if key == "peak_gib" else "%.2f"
    grouped_bars(ax, models, METHODS, values, fmt, ylabel, cap if key == "peak_gib" else None)
    ax.set_title(f"{ylabel} at {seq // 1024}K tokens")
    legend_outside(ax)
    return fig


def length_figure(runs: Runs, model: str, key: str, ylabel: str, cap: Capacity | None) -> Figure:
    """One model's `key` against sequence length per method. OOM runs: an x on the capacity line when `key` is
    memory and the capacity is known, else an x in an "OOM" row above the plot (one line per method). Runs that
    failed or never finished: a grey + at the foot of the plot."""
    points = {
        method: sorted((s, run.summary) for (m, me, s), run in runs.items() if m == model and me == method)
        for method in METHODS
    }
    on_line = key == "peak_gib" and cap is not None
    if on_line:
        fig, axes = figure(7.6, 3.4)
        ax, row = axes[0][0], None
    else:
        fig, axes = figure(7.6, 4.0, nrows=2, sharex=True, height_ratios=[1, 4])
        row, ax = axes[0][0], axes[1][0]
    if on_line:
        draw_capacity(ax, cap)
    for j, method in enumerate(METHODS):
        shade = color(method, j)
        ok = [(s, r[key]) for s, r in points[method] if r.get("status") == "ok" and r.get(key) is not None]
        oom = [s for s, r in points[method] if r.get("status") == "oom"]
        if ok:
            ax.plot(*zip(*ok, strict=True), marker="o", color=shade, label=method)
        if oom and row is None:  # on the line, nudged sideways per method so that equal lengths stay visible
            nudged = [s * 2 ** (0.05 * (j - (len(METHODS) - 1) / 2)) for s in oom]
            ax.scatter(nudged, [cap[0]] * len(oom), marker="X", s=50, color=shade, label=f"{method}: OOM", zorder=4)
        elif oom:
            row.scatter(oom, [j] * len(oom), marker="X", s=60, color=shade)
        failed = [s for s, r in points[method] if r.get("status") not in ("ok", "oom")]
        if failed:
            ax.scatter(failed, [0.0] * len(failed), marker="P", s=50, color="0.5", label=f"{method}: failed", zorder=4)
    lengths = sorted({s for line in points.values() for s, _ in line})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{s // 1024}K" if s % 1024 == 0 else str(s) for s in lengths])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="sequence length (tokens)", ylabel=ylabel)
    ax.set_ylim(bottom=0)
    if on_line:
        ax.set_ylim(0, cap[0] * 1.12)
    if row is not None:
        row.set_yticks(range(len(METHODS)), [f"{m}: OOM" for m in METHODS], fontsize=7)
        row.set_ylim(-0.6, len(METHODS) - 0.4)
        row.tick_params(axis="x", which="both", labelbottom=False)
        row.grid(False, axis="y")
    (row or ax).set_title(f"{model}: {ylabel.split(' (')[0]} vs length")
    legend_outside(ax)
    return fig


def plot_end2end(logs: Path, out: Path) -> list[Path]:
    """Bars per card set (80gb / 48gb) and length, and memory/time-vs-length lines; returns the files written."""
    written = []
    for card in cards(logs):
        runs = runner_runs(card)
        for seq in sorted({s for _, _, s in runs}):
            for key, ylabel, folder, paper in QUANTITIES:
                cap = capacity(card, (run.header for (_, _, s), run in runs.items() if s == seq))
                fig = bars_figure(runs, seq, key, ylabel, cap)
                if fig is None:
                    continue
                oom = (
                    f"Hatched bars up to the dashed line, {cap[1]}, ran out of memory"
                    if key == "peak_gib" and cap
                    else "Runs labelled OOM ran out of memory"
                )
                caption = (
                    f"Paper figure {paper}: {ylabel} of {' / '.join(METHODS)} per model (smallest first) at {seq} "
                    f"tokens, {card.name} set; logs {card}; device {devices(runs.values())}. {oom}."
                )
                written.append(save(fig, out / folder / f"{card.name}_{seq}.png", caption))
        swept = runner_runs(card / "length")
        # the length sweeps skip the per-model set's lengths: those points come from the same card's runs,
        # taken only where they ran on the device of that model's sweep, so that no line mixes GPUs
        swept_on = {(m, run.header.get("device")) for (m, _, _), run in swept.items()}
        same = {k: v for k, v in runs.items() if (k[0], v.header.get("device")) in swept_on}
        lengths = {**same, **swept}
        for model in by_size(m for m, _, _ in swept):
            mine = {k: v for k, v in lengths.items() if k[0] == model}
            cap = capacity(card, (run.header for run in mine.values()))
            for key, ylabel, folder, paper in QUANTITIES:
                oom = (
                    f"An x on the dashed line, {cap[1]}, is a length that ran out of memory"
                    if key == "peak_gib" and cap
                    else "An x in the OOM row above the plot is a length that ran out of memory"
                )
                caption = (
                    f"Paper figure {paper} (right): {ylabel} against sequence length for {model}, {card.name} set; "
                    f"logs {card / 'length'} and {card}; device {devices(mine.values())}. {oom}."
                )
                fig = length_figure(mine, model, key, ylabel, cap)
                written.append(save(fig, out / folder / f"{card.name}_{model}_length.png", caption))
    return written

"""Figure 18: allocated memory over one training step with and without the segmented loss.

Reads the allocator snapshots that `scripts/ablations/segment/run.sh` saves beside its logs (the file its log's
`memory_breakdown` record names, from `torch.cuda.memory._dump_snapshot`; gunzip one to open it at
https://pytorch.org/memory_viz). The curve starts at the memory allocated before the recorded step (logged in
the run's `memory_breakdown` record) and follows every allocation and completed free of the device trace.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

from ..profiling import GIB
from .bars import series_colors
from .logs import cards, runner_runs
from .style import figure, in_method_order, save


def memory_curve(snapshot: dict, start_bytes: float) -> tuple[list[float], list[float]]:
    """(seconds since the first event, allocated GiB) after each alloc / free_completed of device 0."""
    events = [e for e in snapshot["device_traces"][0] if e["action"] in ("alloc", "free_completed")]
    if not events:
        raise ValueError("the snapshot holds no allocation events (was memory history recorded?)")
    t0, level = events[0]["time_us"], float(start_bytes)
    times, levels = [], []
    for event in events:
        level += event["size"] if event["action"] == "alloc" else -event["size"]
        times.append((event["time_us"] - t0) / 1e6)
        levels.append(level / GIB)
    return times, levels


def plot_segment(logs: Path, out: Path) -> list[Path]:
    written = []
    for card in cards(logs):
        curves = []
        for run in runner_runs(card).values():
            breakdown = run.first("memory_breakdown") or {}
            if not breakdown.get("snapshot"):  # snapshots are CUDA-only: CPU runs name none
                continue
            with gzip.open(card / breakdown["snapshot"], "rb") as f:
                snapshot = pickle.load(f)
            curves.append((run.header, memory_curve(snapshot, breakdown["allocated_before_gib"] * GIB)))
        if not curves:
            continue
        order = in_method_order(header["method"] for header, _ in curves)
        curves.sort(key=lambda curve: order.index(curve[0]["method"]))
        fig, axes = figure(7.0, 3.6)
        ax = axes[0][0]
        colors = series_colors([h["method"] for h, _ in curves])
        for header, (times, levels) in curves:
            label = f"{header['method']} ({header['method_description']}); peak {max(levels):.1f} GiB"
            ax.plot(times, levels, color=colors[header["method"]], lw=1, label=label)
        header = curves[0][0]
        ax.set(xlabel="time in the step (s)", ylabel="allocated (GiB)")
        ax.set_title(f"{header['model']}, {header['seq_len']} tokens: one training step", fontsize=9)
        ax.legend(fontsize=6, loc="lower center")
        caption = (
            f"Paper figure 18: allocated GPU memory over one {header['model']} training step at "
            f"{header['seq_len']} tokens, Jenga with and without the segmented loss, from allocator snapshots "
            f"(the *.snapshot.pickle.gz in {card}; gunzip and open at pytorch.org/memory_viz); device "
            f"{header.get('device')}."
        )
        written.append(save(fig, out / f"{card.name}_memory_over_time.png", caption))
    return written

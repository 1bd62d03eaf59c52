"""Figure 18: allocated memory over one training step with and without the segmented loss.

Reads the allocator snapshots that `scripts/ablations/segment/run.sh` saves beside its logs
(`<run>.snapshot.pickle.gz`, from `torch.cuda.memory._dump_snapshot`; gunzip one to open it at
https://pytorch.org/memory_viz). The curve starts at the memory allocated before the recorded step (logged in
the run's `memory_breakdown` record) and follows every allocation and completed free of the device trace.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

from ..profiling import GIB, read_jsonl
from .bars import series_colors
from .style import figure, save


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
    for card in sorted(p for p in logs.iterdir() if p.is_dir()) if logs.is_dir() else []:
        curves = []
        for path in sorted(card.glob("*.snapshot.pickle.gz")):
            log = path.with_name(path.name.removesuffix(".snapshot.pickle.gz") + ".jsonl")
            records = read_jsonl(log)
            header = next(r for r in records if r.get("record") == "header")
            breakdown = next(r for r in records if r.get("record") == "memory_breakdown")
            with gzip.open(path, "rb") as f:
                snapshot = pickle.load(f)
            curves.append((header, memory_curve(snapshot, breakdown["allocated_before_gib"] * GIB)))
        if not curves:
            continue
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

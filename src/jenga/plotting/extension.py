"""Figure 19: Jenga combined with shifted sparse attention (upper) and with activation offloading (lower).

Reads the runner logs `<logs>/<card>/*.jsonl` of `scripts/extension/{2d,offload}/run.sh` (by their headers):
peak memory over the measured steps and median step time per method and length; OOM runs are hatched bars up
to the card's capacity line on the memory panel and labelled in their slot on the time panel, missing runs are
marked "not run". The offload figure also prints how many GiB each offloading run moved to the CPU per step.
"""

from __future__ import annotations

from pathlib import Path

from ..profiling import GIB
from .bars import Cell, capacity, cell, devices, grouped_bars, legend_outside, measured_peak
from .logs import Key, Run, cards, runner_runs
from .models import by_size
from .style import figure, in_method_order, save


def _offloaded_gib(run: Run) -> float | None:
    record = run.first("offload")
    return None if record is None else sum(record["offloaded_bytes"]) / GIB


def _value(runs: dict[Key, Run], key: Key, field: str) -> Cell:
    """Median step time from the summary; peak memory over the measured steps (see `measured_peak`)."""
    if field == "peak_gib" and key in runs:
        return measured_peak(runs[key])
    return cell(runs, key, field)


def _figure(logs: Path, out: Path, paper: str, what: str) -> list[Path]:
    """A memory and a time panel per card and model: every method found in the logs, in the registry's order."""
    written = []
    for card in cards(logs):
        runs = runner_runs(card)
        cap = capacity(card, (run.header for run in runs.values()))
        for model in by_size(m for m, _, _ in runs):
            keys = [k for k in runs if k[0] == model]
            seqs = sorted({s for _, _, s in keys})
            methods = in_method_order(me for _, me, _ in keys)
            groups = [f"{s // 1024}K" if s % 1024 == 0 else str(s) for s in seqs]
            fig, axes = figure(11.0, 3.8, ncols=2)
            for ax, field, ylabel, fmt, line in (
                (axes[0][0], "peak_gib", "peak memory (GiB)", "%.1f", cap),
                (axes[0][1], "median_step_s", "step time (s)", "%.2f", None),
            ):
                values = {
                    (g, m): _value(runs, (model, m, s), field)
                    for g, s in zip(groups, seqs, strict=True)
                    for m in methods
                }
                grouped_bars(ax, groups, methods, values, fmt, ylabel, line)
                ax.set(xlabel="sequence length", title=f"{model}: {ylabel}")
            legend_outside(axes[0][1], axes[0])
            offloaded = [
                f"{m} {g}: {gib:.1f} GiB"
                for g, s in zip(groups, seqs, strict=True)
                for m in methods
                if (model, m, s) in runs and (gib := _offloaded_gib(runs[(model, m, s)])) is not None
            ]
            note = f" Offloaded to CPU per step: {'; '.join(offloaded)}." if offloaded else ""
            caption = (
                f"Paper figure 19 ({paper}): {what} for {model}; hatched bars up to the dashed capacity line ran out "
                f"of memory (on the time panel, such runs are labelled OOM).{note} Logs {card}; "
                f"device {devices(runs.values())}."
            )
            written.append(save(fig, out / f"{card.name}_{model}.png", caption))
    return written


def plot_2d(logs: Path, out: Path) -> list[Path]:
    return _figure(
        logs,
        out,
        "upper",
        "peak memory and step time of LongLoRA's shifted sparse attention, Jenga, and both combined (jenga-2d), "
        "all with gradient checkpointing",
    )


def plot_offload(logs: Path, out: Path) -> list[Path]:
    return _figure(
        logs,
        out,
        "lower",
        "peak memory and step time with activation offloading to CPU (half of the layers' saved bytes resident; "
        "the same budget per layer, or budgets sized by Jenga's keep ratios: jenga-offload-sparse)",
    )

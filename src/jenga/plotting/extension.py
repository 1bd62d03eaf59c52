"""Figure 19: Jenga combined with shifted sparse attention (upper) and with activation offloading (lower).

Reads runner logs `<logs>/<card>/<model>_<method>_<len>.jsonl` of `scripts/extension/{2d,offload}/run.sh`:
peak memory over the measured steps and median step time per method and length; OOM runs are hatched bars up
to the card's capacity line on the memory panel and labelled in their slot on the time panel, missing runs are
marked "not run". The offload figure also prints how many GiB each offloading run moved to the CPU per step.
"""

from __future__ import annotations

from pathlib import Path

from ..profiling import GIB, read_jsonl
from .bars import Cell, capacity, cell, devices, grouped_bars, legend_outside, measured_peak, runs_by_key
from .models import by_size
from .style import figure, save

TWO_D = ("longlora+ckpt", "jenga+ckpt", "jenga-2d+ckpt")
OFFLOAD = ("lora", "lora-offload", "jenga", "jenga-offload", "jenga-offload-sparse")


def _offloaded_gib(path: Path) -> float | None:
    record = next((r for r in read_jsonl(path) if r.get("record") == "offload"), None)
    return None if record is None else sum(record["offloaded_bytes"]) / GIB


def _value(card: Path, runs: dict, key: tuple[str, str, int], field: str) -> Cell:
    """Median step time from the summary; peak memory over the measured steps (see `measured_peak`)."""
    if field == "peak_gib" and key in runs:
        return measured_peak(card / f"{key[0]}_{key[1]}_{key[2]}.jsonl")
    return cell(runs, key, field)


def _figure(logs: Path, out: Path, order: tuple[str, ...], paper: str, what: str) -> list[Path]:
    written = []
    for card in sorted(p for p in logs.iterdir() if p.is_dir()) if logs.is_dir() else []:
        runs = runs_by_key(card)
        cap = capacity(card, (h for h, _ in runs.values()))
        for model in by_size(m for m, _, _ in runs):
            keys = [k for k in runs if k[0] == model]
            seqs = sorted({s for _, _, s in keys})
            found = {me for _, me, _ in keys}
            methods = [m for m in order if m in found] + sorted(found - set(order))
            groups = [f"{s // 1024}K" if s % 1024 == 0 else str(s) for s in seqs]
            fig, axes = figure(11.0, 3.8, ncols=2)
            for ax, field, ylabel, fmt, line in (
                (axes[0][0], "peak_gib", "peak memory (GiB)", "%.1f", cap),
                (axes[0][1], "median_step_s", "step time (s)", "%.2f", None),
            ):
                values = {
                    (g, m): _value(card, runs, (model, m, s), field)
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
                if (model, m, s) in runs and (gib := _offloaded_gib(card / f"{model}_{m}_{s}.jsonl")) is not None
            ]
            note = f" Offloaded to CPU per step: {'; '.join(offloaded)}." if offloaded else ""
            caption = (
                f"Paper figure 19 ({paper}): {what} for {model}; hatched bars up to the dashed capacity line ran out "
                f"of memory (on the time panel, such runs are labelled OOM).{note} Logs {card}; "
                f"device {devices(runs)}."
            )
            written.append(save(fig, out / f"{card.name}_{model}.png", caption))
    return written


def plot_2d(logs: Path, out: Path) -> list[Path]:
    return _figure(
        logs,
        out,
        TWO_D,
        "upper",
        "peak memory and step time of LongLoRA's shifted sparse attention, Jenga, and both combined (jenga-2d), "
        "all with gradient checkpointing",
    )


def plot_offload(logs: Path, out: Path) -> list[Path]:
    return _figure(
        logs,
        out,
        OFFLOAD,
        "lower",
        "peak memory and step time with activation offloading to CPU (half of the layers' saved bytes resident; "
        "the same budget per layer, or budgets sized by Jenga's keep ratios: jenga-offload-sparse)",
    )

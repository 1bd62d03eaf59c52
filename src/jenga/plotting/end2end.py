"""Figures 12 and 13: peak memory and step time per model and method, and both against sequence length.

Reads runner logs `<model>_<method>_<length>.jsonl` from `<logs>/<card>/` (bars) and
`<logs>/<card>/length/` plus the same card's per-model runs of that model (lines). Runs that ran out of
memory are drawn as hatched bars labelled OOM (and as an x on the length plots), never left out.
"""

from __future__ import annotations

from pathlib import Path

from .style import color, figure, save
from .tables import load_run

METHODS = ("lora", "longlora", "jenga")


def _runs(folder: Path) -> dict[tuple[str, str, int], tuple[dict, dict]]:
    runs = {}
    for path in folder.glob("*_*_*.jsonl"):
        model, method, seq = path.stem.split("_")
        runs[(model, method, int(seq))] = load_run(path)
    return runs


def _bars(runs, seq: int, key: str, ylabel: str, out: Path, caption: str) -> Path | None:
    models = sorted({m for m, _, s in runs if s == seq}, key=lambda m: (m.split("-")[0], len(m), m))
    if not models:
        return None
    fig, axes = figure(max(6.4, 1.3 * len(models)), 3.4)
    ax = axes[0][0]
    width = 0.8 / len(METHODS)
    top = max((runs[k][1].get(key) or 0) for k in runs if k[2] == seq) or 1.0
    for j, method in enumerate(METHODS):
        for i, model in enumerate(models):
            header, summary = runs.get((model, method, seq), ({}, {"status": "missing"}))
            x = i + (j - (len(METHODS) - 1) / 2) * width
            label = method if i == 0 else None
            if summary.get("status") == "missing":
                ax.text(x, 0, "not run", ha="center", va="bottom", fontsize=6, rotation=90)
            elif summary.get("status") == "ok" and summary.get(key) is None:  # e.g. memory of a CPU run
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=6)
            elif summary.get("status") == "ok":
                bar = ax.bar(x, summary[key], width, color=color(method, j), label=label)
                ax.bar_label(bar, fmt="%.1f" if key == "peak_gib" else "%.2f", fontsize=6)
            else:
                ax.bar(x, top * 1.05, width, color="white", edgecolor=color(method, j), hatch="//", label=label)
                ax.text(x, top * 1.07, summary["status"].upper(), ha="center", fontsize=6, rotation=90)
    ax.set_xticks(range(len(models)), models)
    ax.set(ylabel=ylabel, title=f"{ylabel} at {seq // 1024}K tokens")
    ax.set_ylim(0, top * 1.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return save(fig, out, caption)


def _length_plot(lengths, model: str, key: str, ylabel: str, out: Path, card: Path, paper: int) -> Path:
    """One model's `key` against sequence length per method; OOM lengths drawn as x above the lines."""
    fig, axes = figure(5.6, 3.4)
    ax = axes[0][0]
    for j, method in enumerate(METHODS):
        points = sorted((s, r[1]) for (m, me, s), r in lengths.items() if m == model and me == method)
        ok = [(s, r[key]) for s, r in points if r.get("status") == "ok" and r.get(key) is not None]
        oom = [s for s, r in points if r.get("status") == "oom"]
        if ok:
            ax.plot(*zip(*ok, strict=True), marker="o", color=color(method, j), label=method)
        if oom:
            top = max((v for _, v in ok), default=1.0) * 1.1
            ax.scatter(oom, [top] * len(oom), marker="x", color=color(method, j), label=f"{method}: OOM")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="sequence length (tokens)", ylabel=ylabel, title=f"{model}: {ylabel.split(' (')[0]} vs length")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    caption = (
        f"Paper figure {paper} (right): {ylabel} against sequence length for {model}, {card.name} set; logs "
        f"{card / 'length'} and {card}; device {_device(lengths)}. x marks lengths that ran out of memory."
    )
    return save(fig, out / f"{card.name}_{model}_length.png", caption)


def _device(runs) -> str:
    return ", ".join(sorted({str(h.get("device")) for h, _ in runs.values() if h}))


def plot_end2end(logs: Path, out: Path) -> list[Path]:
    """Bars per card set (80gb / 48gb) and length, and memory/time-vs-length lines; returns the files written."""
    written = []
    for card in sorted(p for p in logs.iterdir() if p.is_dir()) if logs.is_dir() else []:
        runs = _runs(card)
        for seq in sorted({s for _, _, s in runs}):
            for key, ylabel, folder, paper in (
                ("peak_gib", "peak memory (GiB)", "memory", 12),
                ("median_step_s", "step time (s)", "time", 13),
            ):
                caption = (
                    f"Paper figure {paper}: {ylabel} of lora / longlora / jenga per model at {seq} tokens, "
                    f"{card.name} set; logs {card}; device {_device(runs)}. Hatched bars ran out of memory."
                )
                path = _bars(runs, seq, key, ylabel, out / folder / f"{card.name}_{seq}.png", caption)
                written += [path] if path else []
        swept = _runs(card / "length") if (card / "length").is_dir() else {}
        models = {m for m, _, _ in swept}
        # the length sweeps skip the per-model set's lengths: those points come from the same card's runs,
        # taken only where they ran on the sweep's device, so that no line mixes GPUs
        devices = {h.get("device") for h, _ in swept.values()}
        same = {k: v for k, v in runs.items() if k[0] in models and v[0].get("device") in devices}
        lengths = {**same, **swept}
        for model in sorted(models):
            for key, ylabel, folder, paper in (
                ("peak_gib", "peak memory (GiB)", "memory", 12),
                ("median_step_s", "step time (s)", "time", 13),
            ):
                written.append(_length_plot(lengths, model, key, ylabel, out / folder, card, paper))
    return written

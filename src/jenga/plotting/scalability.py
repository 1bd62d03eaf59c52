"""Figure 20: peak memory and step time against GPU count, per model and per-GPU sequence length.

Reads every runner log under `<logs>/<card>/` (any sub-folder): the header says the model, method, length,
and, for distributed runs (`jenga.experiments.distributed`), `num_gpus` and `backend`. A log without them is a
single-GPU run, the 1-GPU point of every backend's curve. Lines are coloured by method and dashed by backend;
runs that ran out of memory are an x above the axis' highest point, never left out.
"""

from __future__ import annotations

from pathlib import Path

from .logs import cards, is_runner_log, load_runs
from .models import by_size
from .style import color, figure, save

LINESTYLES = {"deepspeed-zero2": "-", "deepspeed-zero3": "--", "fsdp": ":"}
METRICS = (("peak_gib", "peak memory (GiB)", "memory"), ("median_step_s", "step time (s)", "time"))

Key = tuple[str, str, int, int]  # (model, method, per-GPU length, GPUs)


def _runs(card: Path) -> tuple[dict[str, dict[Key, dict]], set[str]]:
    """Summaries by backend and key (single-GPU runs under every backend), and the devices of the logs."""
    single: dict[Key, dict] = {}
    multi: dict[str, dict[Key, dict]] = {}
    devices = set()
    for run in [r for r in load_runs(card, recursive=True) if is_runner_log(r.header)]:  # GPU counts may share keys
        header = run.header
        devices.add(str(header.get("device")))
        key = (*run.key, header["num_gpus"])
        if header["backend"] is None:
            single[key] = run.summary
        else:
            multi.setdefault(header["backend"], {})[key] = run.summary
    by_backend = {b: {**single, **runs} for b, runs in multi.items()} or {"single GPU": single}
    return by_backend, devices


def _panel(ax, by_backend: dict[str, dict[Key, dict]], model: str, seq: int, field: str, ylabel: str) -> None:
    points = [
        (backend, method, gpus, summary)
        for backend, runs in by_backend.items()
        for (m, method, s, gpus), summary in runs.items()
        if m == model and s == seq
    ]
    values = [s[field] for *_, s in points if s.get("status") == "ok" and s.get(field) is not None]
    top = max(values, default=1.0)
    for j, (backend, method) in enumerate(sorted({(b, me) for b, me, _, _ in points})):
        line = sorted((g, s) for b, me, g, s in points if (b, me) == (backend, method))
        ok = [(g, s[field]) for g, s in line if s.get("status") == "ok" and s.get(field) is not None]
        failed = [g for g, s in line if s.get("status") != "ok"]
        style = dict(color=color(method, j), linestyle=LINESTYLES.get(backend, "-"))
        if ok:
            ax.plot(*zip(*ok, strict=True), marker="o", label=f"{method}, {backend}", **style)
        if failed:
            ax.scatter(failed, [top * 1.1] * len(failed), marker="x", color=style["color"])
    gpus = sorted({g for _, _, g, _ in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(gpus, [str(g) for g in gpus])
    ax.set(xlabel="GPUs", ylabel=ylabel, title=f"{model}, {seq // 1024}K tokens per GPU")
    ax.set_ylim(0, top * 1.25)


def plot_scalability(logs: Path, out: Path) -> list[Path]:
    """One memory and one time figure per card and model (a panel per length); [] when there are no logs."""
    written: list[Path] = []
    for card in cards(logs):
        by_backend, devices = _runs(card)
        keys = {k for runs in by_backend.values() for k in runs}
        for model in by_size(m for m, _, _, _ in keys):
            seqs = sorted({s for m, _, s, _ in keys if m == model})
            for field, ylabel, folder in METRICS:
                fig, axes = figure(4.0 * len(seqs), 3.4, ncols=len(seqs))
                for ax, seq in zip(axes[0], seqs, strict=True):
                    _panel(ax, by_backend, model, seq, field, ylabel)
                handles, labels = axes[0][0].get_legend_handles_labels()
                if handles:
                    axes[0][0].legend(handles, labels, fontsize=7)
                caption = (
                    f"Paper figure 20: {ylabel} of {model} against GPU count (batch 1 per GPU) at each per-GPU "
                    f"length, {card.name} set; solid ZeRO-2, dashed ZeRO-3, dotted FSDP; the 1-GPU point is the "
                    f"single-GPU runner. Logs {card}; device {', '.join(sorted(devices))}. x: out of memory/failed."
                )
                written.append(save(fig, out / folder / f"{card.name}_{model}.png", caption))
    return written

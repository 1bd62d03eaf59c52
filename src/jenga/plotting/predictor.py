"""Figure 16 (left): predictor training loss per data source, and elastic sizes per layer.

Reads the training logs `python -m jenga.experiments.predictor_train` writes into each predictor's folder under
`<logs>` (header experiment `predictor_train`); a run is named by its predictor's folder.
"""

from __future__ import annotations

from pathlib import Path

from .logs import load_runs
from .style import color, figure, save


def plot_predictor_ablation(logs: Path, out: Path) -> list[Path]:
    """Draw `out/predictor.png` (+ caption) from every predictor training log under `logs`."""
    trained = [r for r in load_runs(logs, recursive=True) if r.header.get("experiment") == "predictor_train"]
    runs = {run.path.parent.name: run for run in trained}
    if not runs:
        return []
    fig, axes = figure(9.6, 3.4, ncols=2)
    loss_ax, size_ax = axes[0]
    width = 0.8 / (2 * len(runs))
    # Runs of different models patch different layers: one slot per layer index found in any run.
    slots = sorted({int(k) for run in runs.values() for r in run.of("eval") for k in r["sizes"]})
    notes = []
    for i, (source, run) in enumerate(runs.items()):
        header, steps, final = run.header, run.steps, run.of("eval")[0]
        xs_loss, ys_loss = [r["step"] for r in steps], [r["loss"] for r in steps]
        loss_ax.plot(xs_loss, ys_loss, color=color(source, i), lw=0.6, alpha=0.3)
        window = max(1, min(50, len(ys_loss) // 10))
        smooth = [
            sum(ys_loss[max(0, k - window + 1) : k + 1]) / len(ys_loss[max(0, k - window + 1) : k + 1])
            for k in range(len(ys_loss))
        ]
        loss_ax.plot(xs_loss, smooth, color=color(source, i), lw=1.5, label=f"{source} ({window}-step mean)")
        layers = sorted(int(k) for k in final["sizes"])
        after = [final["sizes"][str(k)]["query_units"] + final["sizes"][str(k)]["key_units"] for k in layers]
        xs = [slots.index(k) + 2 * i * width for k in layers]
        size_ax.bar(
            xs,
            [2 * header["units"]] * len(layers),
            width,
            color=color(source, i),
            alpha=0.35,
            label=f"{source}: before pruning",
        )
        size_ax.bar_label(
            size_ax.bar([x + width for x in xs], after, width, color=color(source, i), label=f"{source}: after"),
            fontsize=7,
        )
        prior = final.get("mean_positional_prior_recall")
        notes.append(
            f"{source} (model {Path(str(header.get('model'))).name}, data {Path(str(header.get('data'))).name}): "
            f"held-out top-k recall {final['mean_recall']:.3f}"
            + ("" if prior is None else f" (positional prior {prior:.3f})")
            + f" on {header['device']}"
        )
    size_ax.set_xticks([x + width * len(runs) - width / 2 for x in range(len(slots))], [f"layer {k}" for k in slots])
    loss_ax.set(xlabel="training step", ylabel="listwise ranking loss", title="predictor training loss")
    loss_ax.legend()
    size_ax.set(ylabel="hidden units (query + key towers)", title="elastic predictor size per layer")
    size_ax.set_ylim(0, size_ax.get_ylim()[1] * 1.45)
    size_ax.legend(fontsize=7)
    caption = (
        "Paper figure 16 (left): predictor training loss per run (data sources and models below), and per-layer "
        "predictor size "
        f"before and after elastic pruning. Logs: {logs}. " + "; ".join(notes)
    )
    return [save(fig, out / "predictor.png", caption)]

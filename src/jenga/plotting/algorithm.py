"""Figure 15: the per-layer sparsity Jenga uses, and where in the sequence selection kept blocks.

Reads the `layer_sparsity` record of Jenga runs (`<logs>/<card>/*.jsonl`, by their headers): random-init
architectures and the trained small model. Left: per layer, the configured attention keep ratio, the fraction
of tokens the attention actually ran on, and the fraction of MLP channels saved for backward. Right: per layer
and position range, the fraction of blocks selection kept.
"""

from __future__ import annotations

from pathlib import Path

from .logs import cards, runner_runs
from .style import color, figure, save


def plot_algorithm(logs: Path, out: Path) -> list[Path]:
    written = []
    for card in cards(logs):
        for (model, method, seq), run in sorted(runner_runs(card).items()):
            header, sparsity = run.header, run.first("layer_sparsity")
            if sparsity is None:
                continue
            layers = sparsity["layers"]
            index = [la["layer"] for la in layers]
            fig, axes = figure(10.0, 3.6, ncols=2)
            left, right = axes[0]
            left.step(index, [la["attn_keep"] for la in layers], where="mid", color="black", label="attention keep")
            ran = [(la["layer"], la["kept_tokens"] / seq) for la in layers if la.get("kept_tokens") and seq]
            if ran:
                left.plot(*zip(*ran, strict=True), "o", color=color("jenga"), ms=4, label="tokens attention ran on")
            mlp = [la["mlp_channels_saved"] / la["mlp_channels"] for la in layers]
            left.plot(index, mlp, "s", mfc="none", color="#1f77b4", ms=5, label="MLP channels saved")
            left.set(xlabel="layer", ylabel="fraction kept", ylim=(0, 1.08), title="per-layer sparsity")
            left.legend(fontsize=7, loc="lower right")
            scored = [la for la in layers if la.get("kept_by_position")]
            if scored:
                bins = max(len(la["kept_by_position"]) for la in scored)
                grid = [la.get("kept_by_position") or [1.0] * bins for la in layers]
                image = right.imshow(grid, aspect="auto", cmap="Reds", vmin=0, vmax=1, origin="lower")
                fig.colorbar(image, ax=right, label="fraction of blocks kept")
                right.set_xticks(range(bins), [f"{k + 1}/{bins}" for k in range(bins)], fontsize=7)
                right.set(xlabel="position range in the sequence", ylabel="layer", title="where blocks were kept")
                right.grid(False)
            fig.suptitle(f"{model} {method}, {seq} tokens ({header.get('weights')} weights)", fontsize=9)
            weights = header.get("weights")
            meaning = (
                "so positions show the mechanism rather than trained attention patterns"
                if weights == "random-init"
                else f"trained on {header.get('data', 'random tokens')}, so positions follow learned attention"
            )
            caption = (
                f"Paper figure 15: per-layer attention/MLP sparsity of {model} ({method}, {seq} tokens) and where "
                f"block selection kept blocks in the last step (dense layers drawn as fully kept); weights "
                f"{weights}, {meaning}. Log {run.path}; device {header.get('device')}."
            )
            written.append(save(fig, out / f"{card.name}_{model}_{method}_{seq}.png", caption))
    return written

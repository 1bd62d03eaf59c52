"""One look for every figure: colours per method, sizes, and how figures are saved."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..experiments.methods import METHODS  # noqa: E402

COLORS = {"lora": "#7f7f7f", "longlora": "#1f77b4", "liger": "#9467bd", "jenga": "#d62728", "unsloth": "#2ca02c"}
PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def color(name: str, index: int = 0) -> str:
    """Colour of a method (by its family prefix), or the palette's `index`-th colour."""
    for family, value in COLORS.items():
        if name.startswith(family):
            return value
    return PALETTE[index % len(PALETTE)]


def in_method_order(names: Iterable[str]) -> list[str]:
    """`names` without repeats in the method registry's order (said once, in `jenga.experiments.methods`), names
    the registry does not know after them by name."""
    order = list(METHODS)
    return sorted(set(names), key=lambda m: (m not in METHODS, order.index(m) if m in METHODS else 0, m))


def figure(width: float = 6.4, height: float = 3.6, ncols: int = 1, nrows: int = 1, **subplots: Any):
    """(figure, axes[row][column]); `subplots` go to `plt.subplots` (layout, sharex, height_ratios, ...)."""
    plt.rcParams.update(
        {"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False}
    )
    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **subplots)


def save(fig, path: Path, caption: str) -> Path:
    """Write the PNG and a one-line caption file beside it (what it shows, from which logs). The saved area is
    everything drawn, so legends and titles outside the axes are never clipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    path.with_suffix(".txt").write_text(caption.strip() + "\n")
    return path

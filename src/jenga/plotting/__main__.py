"""Redraw every figure whose logs exist: `python -m jenga.plotting --logs logs --out output_figures`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .end2end import plot_end2end
from .predictor import plot_predictor_ablation

FIGURES = [("end2end", plot_end2end), ("ablations/predictor", plot_predictor_ablation)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logs", type=Path, default=Path("logs"))
    parser.add_argument("--out", type=Path, default=Path("output_figures"))
    args = parser.parse_args(argv)
    for folder, plot in FIGURES:
        written = plot(args.logs / folder, args.out / folder)
        print(f"{folder}: " + (", ".join(map(str, written)) if written else "no logs yet"))


if __name__ == "__main__":
    main()

"""Redraw every figure whose logs exist and rebuild benchmarks/RESULTS.md: `python -m jenga.plotting` (what
RUNME-a.sh runs; the defaults are the repository's folders, relative to the working directory)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .accuracy import plot_accuracy
from .algorithm import plot_algorithm
from .breakdown import plot_memory_breakdown, plot_time_breakdown
from .end2end import plot_end2end
from .extension import plot_2d, plot_offload
from .longest import plot_longest
from .predictor import plot_predictor_ablation
from .real_model import plot_real_model
from .results import write_results
from .scalability import plot_scalability
from .segment import plot_segment

FIGURES = [
    ("real-model", plot_real_model),
    ("end2end", plot_end2end),
    ("end2end/accuracy", plot_accuracy),
    ("ablations/memory-breakdown", plot_memory_breakdown),
    ("ablations/time-breakdown", plot_time_breakdown),
    ("ablations/algorithm", plot_algorithm),
    ("ablations/predictor", plot_predictor_ablation),
    ("ablations/segment", plot_segment),
    ("extension/2d", plot_2d),
    ("extension/offload", plot_offload),
    ("scalability", plot_scalability),
    ("longest", plot_longest),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logs", type=Path, default=Path("logs"))
    parser.add_argument("--out", type=Path, default=Path("output_figures"))
    parser.add_argument("--benchmarks", type=Path, help="folder of the benchmark logs/ (default: beside --logs)")
    parser.add_argument("--results", type=Path, help="the benchmark report (default: <benchmarks>/RESULTS.md)")
    args = parser.parse_args(argv)
    benchmarks = args.benchmarks or args.logs.parent / "benchmarks"
    results = write_results(benchmarks / "logs", args.logs, args.results or benchmarks / "RESULTS.md")
    print("benchmark results: " + (", ".join(map(str, results)) if results else "no logs yet"))
    for folder, plot in FIGURES:
        written = plot(args.logs / folder, args.out / folder)
        print(f"{folder}: " + (", ".join(map(str, written)) if written else "no logs yet"))


if __name__ == "__main__":
    main()

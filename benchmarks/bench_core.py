"""Core benchmark: HF+PEFT LoRA vs Jenga on one GPU, side by side (a preset of the experiment runner).

    python benchmarks/bench_core.py --model llama-2-7b --seqs 4096 8192 --logs benchmarks/logs/core

Every run goes through `python -m jenga.experiments.run` (one process per configuration); the tables in
RESULTS.md are rebuilt from the logs by `python -m jenga.plotting` (RUNME-a.sh).
"""

from __future__ import annotations

import sys

from jenga.experiments.run import main

DEFAULTS = ["--methods", "lora", "jenga-dense", "jenga", "jenga-0.25", "--steps", "5", "--warmup", "2"]

if __name__ == "__main__":
    main(DEFAULTS + ["--logs", "benchmarks/logs/core"] + sys.argv[1:])

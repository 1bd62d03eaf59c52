#!/usr/bin/env bash
# Regenerates every result that has committed logs, on a CPU machine (no GPU needed).
# Sets up .venv on first use. Figures for the paper's evaluation land in output_figures/ as their
# experiments are added; today it rebuilds benchmarks/RESULTS.md and the figures whose logs exist.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
.venv/bin/python benchmarks/report.py
.venv/bin/python -m jenga.plotting --logs logs --out output_figures

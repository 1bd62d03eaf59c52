#!/usr/bin/env bash
# Regenerates every result from the committed logs on a CPU machine (no GPU needed); sets up .venv on first use.
# Rebuilds benchmarks/RESULTS.md and every figure in output_figures/ whose logs exist (which ones, and which
# configurations did not run, is listed in output_figures/README.md). The GPU runs that write those logs are
# RUNME-b-a800.sh (80 GB set) and RUNME-b-a40.sh (48 GB set).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
.venv/bin/python -m jenga.plotting --logs logs --out output_figures

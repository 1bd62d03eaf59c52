#!/usr/bin/env bash
# The 48 GB set (A40 in the paper): figures 12 and 13 at 4K plus the OPT length sweeps, into logs/end2end/48gb,
# then redraws all figures. On a card with more memory every run is capped at 48 GiB with
# torch.cuda.set_per_process_memory_fraction (runner option --memory-gib 48); each log header records the cap
# (memory_cap_gib) and the real device. Resumable; extra arguments go to every runner call (--force, --fork).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
bash scripts/end2end/run.sh 48 "$@"
python -m jenga.plotting --logs logs --out output_figures

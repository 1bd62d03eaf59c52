#!/usr/bin/env bash
# Figure 18 (output_figures/ablations/segment): allocator snapshots of one Llama-2-7B 8K step with Jenga at
# keep 0.5, with the segmented loss (jenga-0.5) and with the model's own loss (jenga-noseg). Each run saves
# <log>.snapshot.pickle.gz (gunzip, then open at https://pytorch.org/memory_viz); the plot draws memory over
# time from them. Resumable; extra arguments go to the runner.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
python -m jenga.experiments.run --model llama-2-7b --methods jenga-0.5 jenga-noseg --seqs 8192 --steps 1 \
  --warmup 1 --snapshot --logs logs/ablations/segment/80gb "$@"

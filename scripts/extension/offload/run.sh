#!/usr/bin/env bash
# Figure 19 lower (output_figures/extension/offload): activation offloading to CPU (jenga.offload) keeping half
# of the layers' saved bytes on the GPU, with the same budget per layer (lora-offload, jenga-offload) or with
# per-layer budgets sized by Jenga's keep ratios (jenga-offload-sparse), against lora and jenga without
# offloading; Llama-2-7B 4K-16K. 2 warm-up steps: the first calibrates the budgets, the second fills the
# pinned-memory cache. Resumable; extra arguments go to the runner.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
python -m jenga.experiments.run --model llama-2-7b --seqs 8192 4096 16384 --steps 3 --warmup 2 \
  --methods lora jenga-0.5 lora-offload jenga-offload jenga-offload-sparse --logs logs/extension/offload/80gb "$@"

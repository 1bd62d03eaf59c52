#!/usr/bin/env bash
# Figure 15 (output_figures/ablations/algorithm): the per-layer attention and MLP sparsity Jenga uses on the
# Llama-2-7B and OPT-6.7b architectures at 8K, and what block selection kept in each layer (every Jenga run
# logs a layer_sparsity record). Weights are random-init unless checkpoints/<model> holds real ones, so the
# kept positions show the mechanism, not trained attention patterns. Resumable; extra arguments go to the runner.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
for model in llama-2-7b opt-6.7b; do
  python -m jenga.experiments.run --model "$model" --methods jenga --seqs 8192 --steps 1 --warmup 1 \
    --logs logs/ablations/algorithm/80gb "$@"
done

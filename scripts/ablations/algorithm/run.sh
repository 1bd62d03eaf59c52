#!/usr/bin/env bash
# Figure 15 (output_figures/ablations/algorithm): the per-layer attention and MLP sparsity Jenga uses on the
# Llama-2-7B and OPT-6.7b architectures at 8K, and what block selection kept in each layer (every Jenga run
# logs a layer_sparsity record). Those two are random-init unless checkpoints/<model> holds real weights, so
# their kept positions show the mechanism; the trained small model of the accuracy study (checkpoints/code-llama,
# at its 4K fine-tuning length, on held-out text of the built dataset; pretrained first where its weights are
# missing) shows selection on learned attention.
# Resumable; extra arguments go to the runner.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
logs=logs/ablations/algorithm/80gb
for model in llama-2-7b opt-6.7b; do
  python -m jenga.experiments.run --model "$model" --methods jenga-0.5 --seqs 8192 --steps 1 --warmup 1 --logs $logs "$@"
done
[ -f dataset/tokens/validation.pt ] || python -m jenga.data.corpus --out dataset
bash scripts/accuracy/run.sh pretrain  # the trained small base (its weights are not committed; skipped if present)
python -m jenga.experiments.run --model code-llama --methods jenga-0.5 --seqs 4096 --steps 1 --warmup 1 --data dataset \
  --logs $logs "$@"

#!/usr/bin/env bash
# Figures 12 and 13 (output_figures/end2end/{memory,time}): peak memory and step time of lora / longlora /
# jenga for the six models, plus memory and time against length for OPT-350m, OPT-1.3b and the two Llama
# models. Resumable: complete logs are skipped unless --force is passed.
#   bash scripts/end2end/run.sh 80 [--force]   # 80 GB card (A800/H100): 8K then 4K -> logs/end2end/80gb
#   bash scripts/end2end/run.sh 48 [--force]   # 48 GB card (A40), or capped at 48 GiB -> logs/end2end/48gb
# Each configuration is a fresh process (model load dominates its time), so these sweeps take 3 measured steps
# after 1 warm-up step (median of 3); pass --steps 5 to measure more. The length sweeps skip the lengths of
# the per-model set: the length plots read those points from the per-model logs of the same card.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
case "${1:-}" in
  80|48) card=$1; shift ;;
  -*|"") card=80 ;;  # no card given: the 80 GB set, the arguments go to the runner
  *) echo "unknown card ${1} (80 or 48)" >&2; exit 2 ;;
esac
run() { python -m jenga.experiments.run --methods lora longlora jenga --steps 3 --warmup 1 "$@"; }
if [ "$card" = 48 ]; then
  cap=(--memory-gib 48); seqs=(4096); logs=logs/end2end/48gb
  opt350=(8192 16384 32768 65536); opt13=(2048 8192 16384 32768); llama=(2048 8192 12288)
else
  cap=(); seqs=(8192 4096); logs=logs/end2end/80gb
  opt350=(16384 32768 65536); opt13=(2048 16384 32768); llama=(2048 12288 16384)
fi
for seq in "${seqs[@]}"; do
  for model in opt-350m opt-1.3b opt-2.7b opt-6.7b llama-2-7b llama-3-8b; do
    run --model "$model" --seqs "$seq" --logs "$logs" "${cap[@]}" "$@"
  done
done
run --model opt-350m --seqs "${opt350[@]}" --logs "$logs/length" "${cap[@]}" "$@"
run --model opt-1.3b --seqs "${opt13[@]}" --logs "$logs/length" "${cap[@]}" "$@"
for model in llama-2-7b llama-3-8b; do
  run --model "$model" --seqs "${llama[@]}" --logs "$logs/length" "${cap[@]}" "$@"
done

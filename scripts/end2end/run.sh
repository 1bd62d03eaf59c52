#!/usr/bin/env bash
# Figures 12 and 13 (output_figures/end2end/{memory,time}): peak memory and step time of lora / longlora /
# jenga for the six models, plus memory against length for OPT-350m and OPT-1.3b. Resumable: complete logs
# are skipped unless --force is passed.
#   bash scripts/end2end/run.sh 80 [--force]   # 80 GB card (A800/H100): 4K and 8K  -> logs/end2end/80gb
#   bash scripts/end2end/run.sh 48 [--force]   # 48 GB card (A40), or capped at 48 GiB -> logs/end2end/48gb
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
card="${1:-80}"
shift || true
run() { python -m jenga.experiments.run --methods lora longlora jenga "$@"; }
if [ "$card" = 48 ]; then
  cap=(--memory-gib 48); seqs=(4096); logs=logs/end2end/48gb
else
  cap=(); seqs=(4096 8192); logs=logs/end2end/80gb
fi
for model in opt-350m opt-1.3b opt-2.7b opt-6.7b llama-2-7b llama-3-8b; do
  run --model "$model" --seqs "${seqs[@]}" --logs "$logs" "${cap[@]}" "$@"
done
run --model opt-350m --seqs 4096 8192 16384 32768 65536 --logs "$logs/length" "${cap[@]}" "$@"
run --model opt-1.3b --seqs 2048 4096 8192 16384 32768 --logs "$logs/length" "${cap[@]}" "$@"

#!/usr/bin/env bash
# Figure 14 (output_figures/ablations/{memory,time}-breakdown): Llama-2-7B at 8K and 16K, the LoRA baseline
# and Jenga adding one technique at a time: lean norms + sparse-saved MLP path (jenga-norms), + LoRA that saves
# its bf16 input instead of PEFT's fp32 casts (jenga-lean), + segmented loss
# (jenga-dense), + attention elimination (jenga-attn), + MLP elimination (jenga-0.5), + learned predictors
# (jenga-predictor-timing; random-init predictors, cost only). Each run logs its timed steps (the time split)
# and one extra untimed step that splits memory by part and sublayer (--breakdown). Resumable; extra
# arguments go to the runner (e.g. --force, --fork, --seqs 8192).
#   bash scripts/ablations/memory-breakdown/run.sh [runner args]   -> logs/ablations/memory-breakdown/80gb
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
python -m jenga.experiments.run --model llama-2-7b --seqs 8192 16384 --steps 3 --warmup 1 --breakdown \
  --methods lora jenga-norms jenga-lean jenga-dense jenga-attn jenga-0.5 jenga-predictor-timing \
  --logs logs/ablations/memory-breakdown/80gb "$@"

#!/usr/bin/env bash
# Figure 19 upper (output_figures/extension/2d): Jenga combined with LongLoRA's shifted sparse attention
# (jenga-2d) against each alone, Llama-2-7B 16K-64K, all with gradient checkpointing (LoRA without it runs
# out of memory past 8K). 2 measured steps after 1 warm-up (long steps). Resumable; extra args go to the runner.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
python -m jenga.experiments.run --model llama-2-7b --methods longlora+ckpt jenga-0.5+ckpt jenga-2d+ckpt \
  --seqs 16384 32768 65536 --steps 2 --warmup 1 --logs logs/extension/2d/80gb "$@"

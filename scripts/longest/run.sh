#!/usr/bin/env bash
# Longest trainable context on one GPU, per method: LoRA and Jenga (the default and the keep-0.5 schedule
# jenga-0.5) with checkpointing, with transformers' offloaded checkpoints (+offckpt: the saved layer inputs
# wait in pinned host memory) and with half of them offloaded (+halfoffckpt: where all of them would outgrow
# the host's memory), the last also with the MLP recomputing its projections (jenga-tiledmlp); Liger with
# offloaded checkpoints when liger-kernel is installed. One step per probe; bf16 LoRA r=8, batch 1, random
# weights. Unsloth (its offloaded checkpointing and tiled MLP, in its own interpreter) when it imports.
#   bash scripts/longest/run.sh
# Env: MODELS ("llama-3-8b llama-2-7b"), MEMORY_GIB (unset: the whole GPU; 80: the 80 GB set), CAP (1048576),
#      STEP (16384), LOGS (logs/longest). Unsloth's wheels: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
py=${PYTHON:-python}
methods="lora+ckpt lora+offckpt lora+halfoffckpt jenga+ckpt jenga+offckpt jenga+halfoffckpt jenga-0.5+ckpt"
methods="$methods jenga-0.5+offckpt jenga-tiledmlp+halfoffckpt"
$py -c "import liger_kernel" 2>/dev/null && methods="$methods liger+offckpt"
$py -c "import unsloth" 2>/dev/null && methods="$methods unsloth"
card=${MEMORY_GIB:+${MEMORY_GIB}gb}
for model in ${MODELS:-llama-3-8b llama-2-7b}; do
  $py -m jenga.experiments.run --model "$model" --methods $methods --max-length --cap "${CAP:-1048576}" \
    --length-step "${STEP:-16384}" --start 65536 ${MEMORY_GIB:+--memory-gib "$MEMORY_GIB"} \
    --logs "${LOGS:-logs/longest}/${card:-uncapped}"
done

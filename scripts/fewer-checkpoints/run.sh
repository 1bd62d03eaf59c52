#!/usr/bin/env bash
# Only the first layers checkpointed (jenga.checkpointing.fit_checkpoints, docs/benchmarks.md "Fewer checkpoints"):
# LoRA and Jenga's default with every layer checkpointed against the default with as few checkpoints as the GPU's
# memory needs (+fitckpt), and those keeping their attention outputs (+fitattnckpt); Llama-2-7B and Llama-3-8B
# architectures at 32K and 64K, 2 measured steps after a warm-up. `run.sh [80|uncapped]`: the process capped at
# 80 GiB (the 80 GB set; default) or the whole GPU. Logs: benchmarks/logs/fewer-checkpoints/<gpu>-<80gb|uncapped>
# (benchmarks/RESULTS.md reads h200-uncapped). Resumable; extra args go to the runner; PYTHON names the interpreter.
# Then the same fit through the HF Trainer (FitCheckpointsCallback) at 32K: <logs>/trainer/<model>_32768.jsonl
# (--force: again).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cap=(--memory-gib 80); gib=80
case "${1:-}" in
  80) shift ;;
  uncapped) shift; cap=(); gib= ;;
  -*|"") ;;
  *) echo "usage: $0 [80|uncapped] [runner args]" >&2; exit 2 ;;
esac
source scripts/gpu_setting.sh
name=$(gpu_setting "$gib")
for model in llama-2-7b llama-3-8b; do
  ${PYTHON:-python} -m jenga.experiments.run --model "$model" --methods lora+ckpt jenga+ckpt jenga+fitckpt jenga+fitattnckpt \
    --seqs 32768 65536 --steps 2 --warmup 1 "${cap[@]}" --logs "benchmarks/logs/fewer-checkpoints/$name" "$@"
done
for model in llama-2-7b llama-3-8b; do
  log="benchmarks/logs/fewer-checkpoints/$name/trainer/${model}_32768.jsonl"
  if [ ! -s "$log" ] || [[ " $* " == *" --force "* ]]; then
    ${PYTHON:-python} -m jenga.experiments.trainer_fit --model "$model" --seq 32768 "${cap[@]}" --log "$log"
  fi
done

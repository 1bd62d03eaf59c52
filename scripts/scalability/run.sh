#!/usr/bin/env bash
# Figure 20 (output_figures/scalability): peak memory and step time of LoRA / Jenga (default config) on 1, 2 and
# 4 GPUs under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2; Llama-2-7B and OPT-6.7b; batch 1 per GPU with gradient
# checkpointing at 1K/2K/4K tokens per GPU (the paper's setting) and at 8K/16K.
# Resumable: complete logs are skipped unless --force is passed (the one runner argument the multi-GPU runs take
# besides their own). ZeRO needs DeepSpeed (docs/multi-gpu.md).
#   bash scripts/scalability/run.sh             # 80 GB cards -> logs/scalability/80gb/
#   GPUS="1 2" bash scripts/scalability/run.sh   # a 2-GPU machine: leave out 4
# Env: LOGS (default logs/scalability/<CARD>), CARD (80gb), MODELS ("llama-2-7b opt-6.7b"), GPUS ("1 2 4"),
#      BACKENDS ("zero2 zero3 fsdp"), SEQS, METHODS.
# The 1-GPU point is the plain runner (no engine), shared by every backend's curve; N > 1 runs go through
# `accelerate launch` (jenga.experiments.distributed), one job per method covering every length, into
# logs/scalability/<card>/<zero2|zero3|fsdp>_<N>gpu/. Each job's first step is checked against one process
# on the whole global batch (loss and gradient norm in the log).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
logs=${LOGS:-logs/scalability/${CARD:-80gb}}
run() {
  # shellcheck disable=SC2086
  python -m jenga.experiments.run --methods ${METHODS:-lora+ckpt jenga+ckpt} --seqs ${SEQS:-1024 2048 4096 8192 16384} \
    --steps 2 --warmup 1 "$@"
}
for model in ${MODELS:-llama-2-7b opt-6.7b}; do
  for gpus in ${GPUS:-1 2 4}; do
    if [ "$gpus" = 1 ]; then
      run --model "$model" --logs "$logs/1gpu" --fork "$@"
      continue
    fi
    for stage in ${BACKENDS:-zero2 zero3 fsdp}; do
      backend=$([ "$stage" = fsdp ] && echo fsdp || echo "deepspeed-$stage")
      run --model "$model" --num-gpus "$gpus" --backend "$backend" --logs "$logs/${stage}_${gpus}gpu" "$@"
    done
  done
done

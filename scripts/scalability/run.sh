#!/usr/bin/env bash
# Figure 20 (output_figures/scalability): peak memory and step time of lora / jenga on 1, 2 and 4 GPUs with
# DeepSpeed ZeRO-2 and ZeRO-3, Llama-2-7B and OPT-6.7b, 1K/2K/4K tokens per GPU (batch 1 per GPU).
# Resumable: complete logs are skipped unless --force is passed. Needs `pip install deepspeed`.
#   bash scripts/scalability/run.sh            # 80 GB cards -> logs/scalability/80gb/
#   GPUS="1 2" bash scripts/scalability/run.sh  # a 2-GPU machine: leave out 4
# The 1-GPU point is the plain runner (no engine), shared by both ZeRO stages' curves; N > 1 runs go through
# `accelerate launch` (jenga.experiments.distributed) into logs/scalability/<card>/<zero2|zero3>_<N>gpu/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
logs=logs/scalability/${CARD:-80gb}
run() { python -m jenga.experiments.run --methods lora jenga --seqs 1024 2048 4096 --steps 3 --warmup 1 "$@"; }
for model in llama-2-7b opt-6.7b; do
  for gpus in ${GPUS:-1 2 4}; do
    if [ "$gpus" = 1 ]; then
      run --model "$model" --logs "$logs/1gpu" "$@"
      continue
    fi
    for stage in zero2 zero3; do
      run --model "$model" --num-gpus "$gpus" --backend "deepspeed-$stage" --logs "$logs/${stage}_${gpus}gpu" "$@"
    done
  done
done

#!/usr/bin/env bash
# Figure 16 left (output_figures/ablations/predictor): predictor training loss on two locally built data
# sources, a long-document corpus (code-corpus) and an instruction-style set (instructions), and the elastic
# sizes per layer before and after pruning. CPU-sized: the small checkpoints/tiny-code-llama at 512 tokens,
# recall on held-out corpus documents. The predictors of the accuracy study (checkpoints/code-llama at 4K,
# GPU) come from `bash scripts/accuracy/run.sh predictor`. Resumable: delete an output folder to rerun it.
#   bash scripts/ablations/predictor/run.sh   -> logs/ablations/predictor/{code-corpus,instructions}
# Builds the local data sets and pretrains the small base first where they are missing (its weights are not
# committed; 20 minutes, as its pretrain_log.jsonl records). Env: PYTHON (python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
py="${PYTHON:-python}"
logs=logs/ablations/predictor
[ -f dataset/code-corpus/train.jsonl ] && [ -f dataset/instructions/train.jsonl ] ||
  $py -m jenga.data.corpus --out dataset
[ -f checkpoints/tiny-code-llama/model.safetensors ] || $py -m jenga.experiments.pretrain --data dataset \
  --out checkpoints/tiny-code-llama --hidden 256 --layers 4 --heads 4 --minutes 20
for source in code-corpus instructions; do
  [ -f $logs/$source/predictor.json ] && grep -qs '"design"' $logs/$source/predictor.json && continue
  $py -m jenga.experiments.predictor_train --model checkpoints/tiny-code-llama --data dataset/$source/train.jsonl \
    --eval-data dataset/code-corpus/validation.jsonl --out $logs/$source --config $logs/jenga-config.json \
    --seq-len 512 --max-sequences 400 --steps 1500 --prune-every 300
done

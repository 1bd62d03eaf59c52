#!/usr/bin/env bash
# Longest trainable context on one GPU, per method: LoRA and Jenga (the default and the keep-0.5 schedule
# jenga-0.5) with checkpointing, with transformers' offloaded checkpoints (+offckpt: the saved layer inputs
# wait in pinned host memory), with half of them offloaded (+halfoffckpt: where all of them would outgrow the
# host's memory) and with as many offloaded as the host holds at each length (+fitoffckpt), the last ones also
# with the MLP recomputing its projections (jenga-tiledmlp) and two layers per checkpoint (jenga-long: half the
# checkpoints, for one more layer's activations during backward); Liger with checkpointing, on the GPU and offloaded,
# when liger-kernel is installed. One step per probe; bf16 LoRA r=8, batch 1, random weights. Unsloth (its
# offloaded checkpointing and tiled MLP, in its own interpreter) when it imports. Offloaded checkpoints that
# would outgrow 90% of the host's available memory are logged as OOM without running (the host budget).
#   bash scripts/longest/run.sh [runner args, e.g. --force: probe lengths whose logs hold a result again]
# Env: MODELS ("llama-3-8b llama-2-7b"), METHODS (those above), MEMORY_GIB (unset: the whole GPU; 80: the 80 GB
#      set), CAP (1048576), STEP (16384), START (the first length searched: 65536 rounded up to STEP; near the
#      expected limit it saves long probes), SHARED (the shared lengths: "65536 131072 262144"; empty: none), LOGS
#      (logs/longest), PYTHON (python). Unsloth: scripts/longest/unsloth_bundle.sh. Figure and table:
#      python -m jenga.plotting (output_figures/longest/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
py=${PYTHON:-python}
step=${STEP:-16384}
start=${START:-$(( (65536 + step - 1) / step * step ))}
methods="lora+ckpt lora+offckpt lora+halfoffckpt jenga+ckpt jenga+offckpt jenga+halfoffckpt jenga-0.5+ckpt"
methods="$methods jenga-0.5+offckpt jenga-tiledmlp+halfoffckpt jenga-long+ckpt jenga-long+fitoffckpt"
$py -c "import liger_kernel" 2>/dev/null && methods="$methods liger+ckpt liger+offckpt"
$py -c "import unsloth" 2>/dev/null && methods="$methods unsloth"
methods=${METHODS:-$methods}
shared=${SHARED-65536 131072 262144}
# one folder per setting, e.g. logs/longest/h200-uncapped, logs/longest/h200-80gb
source scripts/gpu_setting.sh
setting="${LOGS:-logs/longest}/$(gpu_setting "${MEMORY_GIB:-}")"
for model in ${MODELS:-llama-3-8b llama-2-7b}; do
  $py -m jenga.experiments.run --model "$model" --methods $methods --max-length --cap "${CAP:-1048576}" \
    --length-step "$step" --start "$start" ${MEMORY_GIB:+--memory-gib "$MEMORY_GIB"} --logs "$setting" "$@"
  # the shared lengths, one measured step after a warm-up each (a length a method cannot train is logged OOM)
  [ -z "$shared" ] || $py -m jenga.experiments.run --model "$model" --methods $methods --seqs $shared \
    --steps 1 --warmup 1 ${MEMORY_GIB:+--memory-gib "$MEMORY_GIB"} --logs "$setting/shared" "$@"
done

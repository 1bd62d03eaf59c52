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
#   bash scripts/longest/run.sh
# Env: MODELS ("llama-3-8b llama-2-7b"), METHODS (those above), MEMORY_GIB (unset: the whole GPU; 80: the 80 GB
#      set), CAP (1048576), STEP (16384), START (the first length searched: 65536 rounded up to STEP; near the
#      expected limit it saves long probes), SHARED (the shared lengths: "65536 131072 262144"; empty: none), LOGS
#      (logs/longest), PYTHON (python). Unsloth's wheels: docs/benchmarks.md. Figure and table:
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
# one folder per setting: the GPU's model and the cap, e.g. logs/longest/h200-uncapped, logs/longest/h200-80gb
command -v nvidia-smi > /dev/null || { echo "scripts/longest/run.sh needs an NVIDIA GPU (no nvidia-smi here)" >&2; exit 1; }
# the GPU's model: the first word of its name with a digit, up to a dash (NVIDIA H100 80GB HBM3: h100; A800-SXM4-80GB: a800)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 \
  | awk '{for (i = 1; i <= NF; i++) if ($i ~ /[0-9]/) { print tolower($i); exit }}' | cut -d- -f1)
cap=${MEMORY_GIB:+${MEMORY_GIB}gb}
setting="${LOGS:-logs/longest}/${gpu}-${cap:-uncapped}"
for model in ${MODELS:-llama-3-8b llama-2-7b}; do
  $py -m jenga.experiments.run --model "$model" --methods $methods --max-length --cap "${CAP:-1048576}" \
    --length-step "$step" --start "$start" ${MEMORY_GIB:+--memory-gib "$MEMORY_GIB"} --logs "$setting"
  # the shared lengths, one measured step after a warm-up each (a length a method cannot train is logged OOM)
  [ -z "$shared" ] || $py -m jenga.experiments.run --model "$model" --methods $methods --seqs $shared \
    --steps 1 --warmup 1 ${MEMORY_GIB:+--memory-gib "$MEMORY_GIB"} --logs "$setting/shared"
done

# Sourced by the GPU scripts: `gpu_setting [cap GiB]` prints the folder name of a GPU setting, the GPU's model
# and the memory cap (h200-uncapped, h100-80gb), so logs of different GPUs never share a folder. The model is the
# first word of the GPU's name with a digit, up to a dash (NVIDIA H100 80GB HBM3: h100; A800-SXM4-80GB: a800).
gpu_setting() {
  command -v nvidia-smi > /dev/null || { echo "$0 needs an NVIDIA GPU (no nvidia-smi here)" >&2; return 1; }
  local gpu
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 \
    | awk '{for (i = 1; i <= NF; i++) if ($i ~ /[0-9]/) { print tolower($i); exit }}' | cut -d- -f1)
  if [ -n "${1:-}" ]; then echo "$gpu-${1}gb"; else echo "$gpu-uncapped"; fi
}

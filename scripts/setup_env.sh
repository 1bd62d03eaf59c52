#!/usr/bin/env bash
# Creates .venv with the pinned CPU environment and installs jenga in editable mode (first use only).
# Plain pip resolves torch==X to the CUDA build on Linux (several GB of CUDA wheels). To get the CPU build, point
# JENGA_TORCH_INDEX at PyTorch's CPU index (torch alone is installed from it first):
#   JENGA_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup_env.sh
# It is not the default because that index was unreachable where this script is tested.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
pins="$root/.ci/requirements-ci.txt"
stamp="$venv/.jenga-env-$(sha1sum "$pins" "$root/setup.py" "$root/requirements.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] creating $venv (pinned CPU environment; takes a few minutes the first time)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  if [ -n "${JENGA_TORCH_INDEX:-}" ]; then
    "$venv/bin/python" -m pip install -q --index-url "$JENGA_TORCH_INDEX" "$(grep -E '^torch==' "$pins")"
  else
    echo "[setup] note: torch comes from the default index (set JENGA_TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build)"
  fi
  "$venv/bin/python" -m pip install -q -r "$pins"
  "$venv/bin/python" -m pip install -q --no-deps -e "$root"
  rm -f "$venv"/.jenga-env-*
  touch "$stamp"
fi

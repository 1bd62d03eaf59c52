#!/usr/bin/env bash
# Creates .venv with the pinned CPU environment and installs jenga in editable mode (first use only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.jenga-env-$(sha1sum "$root/.ci/requirements-ci.txt" "$root/setup.py" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] creating $venv (pinned CPU environment; takes a few minutes the first time)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r "$root/.ci/requirements-ci.txt"
  "$venv/bin/python" -m pip install -q --no-deps -e "$root"
  rm -f "$venv"/.jenga-env-*
  touch "$stamp"
fi

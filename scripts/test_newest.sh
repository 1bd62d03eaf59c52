#!/usr/bin/env bash
# CI's second job: the patching, checkpointing, Trainer and error tests against the newest transformers that
# requirements.txt allows (everything else pinned as in .ci/requirements-ci.txt), so a release inside the declared
# range that breaks the patches shows up. Creates .venv-newest (rebuilt daily, since "newest" moves); extra arguments go to pytest.
# JENGA_TORCH_INDEX works as in setup_env.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-newest"
pins="$root/.ci/requirements-ci.txt"
range="$(grep -E '^transformers' "$root/requirements.txt")"
stamp="$venv/.jenga-env-$( (sha1sum "$pins" "$root/requirements.txt"; date +%F) | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[newest] creating $venv ($range, newest release; the rest pinned)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  if [ -n "${JENGA_TORCH_INDEX:-}" ]; then
    "$venv/bin/python" -m pip install -q --index-url "$JENGA_TORCH_INDEX" "$(grep -E '^torch==' "$pins")"
  fi
  # Only what the library and these tests import.
  mapfile -t needed < <(grep -E '^(torch|peft|triton|accelerate|safetensors|tqdm|pytest)==' "$pins")
  "$venv/bin/python" -m pip install -q --upgrade "${needed[@]}" "$range"  # --upgrade: the newest in range on a rebuild
  "$venv/bin/python" -m pip install -q --no-deps -e "$root"
  rm -f "$venv"/.jenga-env-*
  touch "$stamp"
fi
echo "[newest] transformers $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
cd "$root"
"$venv/bin/python" -m pytest tests/test_patching.py tests/test_trainer.py tests/test_errors.py tests/test_checkpointing.py "$@"

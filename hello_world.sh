#!/usr/bin/env bash
# Checks a set-up: libraries, device, the models / data / predictors present, the Triton kernel against its
# reference, and a tiny Jenga training step. One PASS / FAIL / INFO line per check; exit code 1 on a FAIL.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
.venv/bin/python -m jenga.experiments.hello

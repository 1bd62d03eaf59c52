#!/usr/bin/env bash
# The project's test command: lint, then the whole CPU test suite, both tiers (sets up .venv on first use).
# Extra arguments go to pytest: `-m "not integration"` runs the fast unit tier only (markers in pyproject.toml).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/python -m pytest "$@"

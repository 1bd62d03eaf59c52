#!/usr/bin/env bash
# Figure 14 lower (output_figures/ablations/time-breakdown): the time split comes from the same runs as the
# memory split (their timed steps record forward / backward / optimizer and scoring), so this runs the
# memory-breakdown sweep, which skips the runs already logged.
set -euo pipefail
bash "$(dirname "${BASH_SOURCE[0]}")/../memory-breakdown/run.sh" "$@"

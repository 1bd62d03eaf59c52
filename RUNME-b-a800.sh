#!/usr/bin/env bash
# Every GPU experiment of the 80 GB set (A800 in the paper; any 80 GB card such as the H100 here; the logs name
# the real device), then redraws all figures. Each script is resumable: complete logs of a method's config of
# today are skipped (one of an older config is rerun), so an interrupted run continues where it stopped. Extra
# arguments go to every runner call except the predictor, accuracy and real-model scripts' (e.g. --force to
# rerun, --fork to fork each configuration from the sweep process instead of starting Python anew; multi-GPU
# runs take only --force).
# Needs a CUDA GPU, the packages of requirements.txt, and `python` on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
bash scripts/end2end/run.sh 80 "$@"                      # figures 12, 13
bash scripts/ablations/memory-breakdown/run.sh "$@"      # figure 14 (memory and time split)
bash scripts/ablations/algorithm/run.sh "$@"             # figure 15
bash scripts/ablations/predictor/run.sh                  # figure 16 left (needs dataset/: python -m jenga.data.corpus)
bash scripts/ablations/segment/run.sh "$@"               # figure 18
bash scripts/extension/2d/run.sh "$@"                    # figure 19 upper
bash scripts/extension/offload/run.sh "$@"               # figure 19 lower
bash scripts/fewer-checkpoints/run.sh 80 "$@"            # only the first layers checkpointed (benchmarks/RESULTS.md)
for stage in pretrain predictor "finetune 0 1 2" eval lm_eval; do
  bash scripts/accuracy/run.sh $stage                    # the accuracy tables on the toy bases (docs/toy-accuracy.md)
done
bash scripts/real_model/run.sh                           # the real-model study (SmolLM2-135M; docs/real-model.md)
MEMORY_GIB=80 bash scripts/longest/run.sh "$@"           # the longest context per method (hours: long probes)
python -m jenga.plotting --logs logs --out output_figures

#!/usr/bin/env bash
# The whole pipeline on the built-in phantom HGG/LGG cohort (32³), CPU only, no data to download.
# Smoke run of every stage and of the report; the numbers mean nothing about the paper.
# Results: runs/demo/report.md (run root: $MRRL_RUN_ROOT or paths.run_root=<dir>).
# Extra arguments are Hydra overrides, e.g. `experiments/demo.sh seed=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/mrrl-pipeline experiment=demo "$@"

#!/usr/bin/env bash
# The demo on the OASIS-like AD/CN phantom cohort (32³), CPU only, no data to download.
# Results: runs/demo_atrophy/report.md (run root: $MRRL_RUN_ROOT or paths.run_root=<dir>).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/mrrl-pipeline experiment=demo_atrophy "$@"

#!/usr/bin/env bash
# Paper Tables 1-3, OASIS-1 column (AD/CN, T1 MPRAGE, 64³): every stage, VQGAN to classification.
#
# Data:     export OASIS1_ROOT=/data/oasis1   (holds disc1 ... disc12 and oasis_cross-sectional.csv)
#           or pass data.root=<dir>. AD: CDR >= 0.5, CN: CDR = 0, subjects without a CDR left out.
# Hardware: one node with 4 GPUs (trainer=ddp, bf16; the paper used 4 × A100 40 GB). One GPU:
#           `experiments/oasis1.sh trainer=gpu` (about 4× longer for the training stages).
# Time:     roughly 6-10 h on 4 × A100 (estimate, see experiments/README.md); rerun to resume.
# Results:  runs/oasis1/report.md (run root: $MRRL_RUN_ROOT or paths.run_root=<dir>).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/mrrl-pipeline experiment=oasis1 \
  "pipeline.stages=[check_data,vqgan,diffusion,reward_data,reward,ppo,evaluate,classify]" "$@"

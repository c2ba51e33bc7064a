#!/usr/bin/env bash
# Paper Tables 1-3, BraTS 2019 column (HGG/LGG, FLAIR, 64³): every stage, VQGAN to classification.
#
# Data:     export BRATS2019_ROOT=/data/MICCAI_BraTS_2019_Data_Training   (holds HGG/ and LGG/)
#           or pass data.root=<dir>.
# Hardware: one node with 4 GPUs (trainer=ddp, bf16; the paper used 4 × A100 40 GB). One GPU:
#           `experiments/brats2019.sh trainer=gpu` (about 4× longer for the training stages).
# Time:     roughly 6-10 h on 4 × A100 (estimate, see experiments/README.md). Interrupted? Run the same
#           command again: finished stages are skipped, the interrupted one resumes from last.ckpt.
# Results:  runs/brats2019/report.md (run root: $MRRL_RUN_ROOT or paths.run_root=<dir>).
#           The Table 5 ablations (experiments/ablation_*.sh) reuse this run: start them after it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/mrrl-pipeline experiment=brats2019 \
  "pipeline.stages=[check_data,vqgan,diffusion,reward_data,reward,ppo,evaluate,classify]" "$@"

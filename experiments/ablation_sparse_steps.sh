#!/usr/bin/env bash
# Paper Table 5, "Sparse steps (1, 50, 99)": reward data from steps {1, 50, 99} of both trajectories,
# then new reward models, PPO, evaluation and (RL protocol only) classification.
#
# Needs:    the finished BraTS run (experiments/brats2019.sh) in the same run root: its split, VQGAN and
#           diffusion model are reused (conf/preset/ablation_sparse_steps_*.yaml), so BRATS2019_ROOT (or
#           data.root=<dir>) must point at the same data.
# Hardware: as brats2019 (4 GPUs, trainer=ddp; `trainer=gpu` for one). Time: roughly 2-4 h (estimate).
# Results:  runs/ablation_sparse_steps/report.md, and Table 5 in runs/brats2019/report.md (refreshed below).
set -euo pipefail
cd "$(dirname "$0")/.."
run_root="${MRRL_RUN_ROOT:-runs}"
for arg in "$@"; do [[ "$arg" == paths.run_root=* ]] && run_root="${arg#paths.run_root=}"; done
if [[ ! -f "$run_root/brats2019/diffusion/manifest.json" ]]; then
  echo "ablation_sparse_steps reuses the brats2019 run: no $run_root/brats2019/diffusion/manifest.json;" \
    "run experiments/brats2019.sh first" >&2
  exit 1
fi
.venv/bin/mrrl-pipeline experiment=ablation_sparse_steps "$@"
.venv/bin/python -m mrrl.report "$run_root/brats2019"

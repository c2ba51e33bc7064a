#!/usr/bin/env bash
# Paper Table 5, "3D reward only": PPO with w2d = 0 (R3D alone, w3d = 1), then evaluation and (RL protocol
# only) classification.
#
# Needs:    the finished BraTS run (experiments/brats2019.sh) in the same run root: its split, VQGAN,
#           diffusion model and R3D reward model are reused (conf/preset/ablation_3d_only_*.yaml), so
#           BRATS2019_ROOT (or data.root=<dir>) must point at the same data.
# Hardware: as brats2019 (4 GPUs, trainer=ddp; `trainer=gpu` for one). Time: roughly 1.5-3 h (estimate).
# Results:  runs/ablation_3d_only/report.md, and Table 5 in runs/brats2019/report.md (refreshed below).
set -euo pipefail
cd "$(dirname "$0")/.."
run_root="${MRRL_RUN_ROOT:-runs}"
for arg in "$@"; do [[ "$arg" == paths.run_root=* ]] && run_root="${arg#paths.run_root=}"; done
if [[ ! -f "$run_root/brats2019/reward/manifest.json" ]]; then
  echo "ablation_3d_only reuses the brats2019 run: no $run_root/brats2019/reward/manifest.json;" \
    "run experiments/brats2019.sh first" >&2
  exit 1
fi
.venv/bin/mrrl-pipeline experiment=ablation_3d_only "$@"
.venv/bin/python -m mrrl.report "$run_root/brats2019"

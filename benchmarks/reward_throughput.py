"""Reward-stage throughput and peak memory: training R3D / R2D, and scoring volumes as PPO does.

* ``r3d-train`` / ``r2d-train``: mrrl's ``RewardModule.training_step`` (MSE on normalised targets, R2D per
  slice on ``slices_per_volume`` random axial slices, plus the pairwise ranking loss) with AdamW, driven by a
  Lightning Trainer on synthetic volumes held in memory;
* ``r3d-score`` / ``r2d-score``: ``RewardNet.score_volumes`` in eval mode without gradients (R2D scores every
  axial slice), the reward PPO computes on every rollout, at ``--score-batch`` volumes per call.

Each case runs in a fresh process (clean peak-memory counters). Volumes/s = volumes per step (or call) /
mean seconds after ``--warmup`` untimed ones. Networks follow ``conf/stage/reward.yaml`` with the preset's
sizes.

Not a test. Examples::

    python benchmarks/reward_throughput.py --preset tiny --device cpu --threads 2
    python benchmarks/reward_throughput.py --preset paper --device cuda --score-batch 64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import (
    STEP_COLUMNS,
    PeakMemory,
    StepTimer,
    device_name,
    lightning_trainer,
    run_benchmark,
    sync,
)

REPO = Path(__file__).resolve().parent.parent
CASES = ("r3d-train", "r2d-train", "r3d-score", "r2d-score")
PRESETS = {
    # The stage defaults at the paper's 64³: R3D ResNet-18 (width 32), R2D ResNet-18 (width 64).
    "paper": {
        "image_size": 64,
        "r3d": {"arch": "resnet18", "width": 32, "batch_size": 4},
        "r2d": {"arch": "resnet18", "width": 64, "batch_size": 8, "slices_per_volume": 8},
    },
    # ResNet-10s at a quarter of the widths, 32³.
    "tiny": {
        "image_size": 32,
        "r3d": {"arch": "resnet10", "width": 8, "batch_size": 4},
        "r2d": {"arch": "resnet10", "width": 16, "batch_size": 4, "slices_per_volume": 4},
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--image-size", type=int, help="volume side (overrides the preset)")
    parser.add_argument("--batch", type=int, help="training volumes per step (overrides the preset)")
    parser.add_argument("--score-batch", type=int, default=16, help="volumes per scoring call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="Lightning precision of the training cases")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (calls) per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    return parser.parse_args(argv)


def stage_config(preset: dict, kind: str) -> dict:
    from omegaconf import OmegaConf

    stage = OmegaConf.load(REPO / "conf" / "stage" / "reward.yaml")
    stage = OmegaConf.merge(stage, {kind: preset[kind]})
    cfg = OmegaConf.to_container(stage, resolve=True)
    assert isinstance(cfg, dict)
    return cfg


def volumes(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 1, size, size, size) * 2 - 1


def train_case(args, kind: str, preset: dict, size: int, device: torch.device) -> dict:
    from mrrl.reward.module import RewardModule

    cfg = stage_config(preset, kind)
    batch = args.batch or int(cfg[kind]["batch_size"])
    module = RewardModule(
        kind=kind,
        image_shape=(1, size, size, size),
        net=cfg[kind],
        optim=cfg["optim"],
        ranking=cfg["ranking"],
        ranking_weight=float(cfg["ranking_weight"]),
        slice_targets=bool(cfg["r2d"]["slice_targets"]) if kind == "r2d" else False,
    )
    n_steps = args.warmup + args.steps
    images = volumes(batch * n_steps, size)
    items = [
        {"image": images[i], "reward": torch.rand(()), "group": torch.tensor(i % 4)}
        for i in range(len(images))
    ]
    loader = torch.utils.data.DataLoader(items, batch_size=batch, pin_memory=device.type == "cuda")
    timer = StepTimer(device)
    trainer = lightning_trainer(
        device, args.precision, [timer.callback], max_epochs=1, limit_train_batches=n_steps
    )
    memory = PeakMemory(device).start()
    trainer.fit(module, train_dataloaders=loader)
    seconds = timer.mean(skip=args.warmup)
    return {"s_per_step": seconds, "volumes": batch, **memory.stop(), "memory_method": memory.method}


def score_case(args, kind: str, preset: dict, size: int, device: torch.device) -> dict:
    from mrrl.reward.models import build_reward_net

    cfg = stage_config(preset, kind)
    net = build_reward_net(kind, (1, size, size, size), cfg[kind], load_pretrained=False)
    net = net.eval().requires_grad_(False).to(device)
    batch = volumes(args.score_batch, size).to(device)
    memory = PeakMemory(device).start()
    times = []
    for _ in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        net.score_volumes(batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = sum(times[args.warmup :]) / max(args.steps, 1)
    return {
        "s_per_step": seconds,
        "volumes": args.score_batch,
        **memory.stop(),
        "memory_method": memory.method,
    }


def run_case(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    size = args.image_size or preset["image_size"]
    device = torch.device(args.device)
    torch.manual_seed(0)
    kind, what = args.case.split("-")
    result = (train_case if what == "train" else score_case)(args, kind, preset, size, device)
    result.update(
        case=args.case,
        volumes_per_s=result["volumes"] / result["s_per_step"],
        size=size,
        device=device_name(device),
        model=f"{preset[kind]['arch']} width {preset[kind]['width']}",
    )
    return result


def main() -> None:
    args = parse_args()
    run_benchmark(
        __file__,
        args,
        run_case,
        CASES,
        lambda first: (
            f"Reward models {args.preset}: {first['size']}³ volumes, training {args.precision}, {first['device']}; "
            f"{args.steps} timed steps after {args.warmup}; memory: {first['memory_method']}"
        ),
        columns=[("what", "case", "s"), ("volumes", "volumes/step", "d"), *STEP_COLUMNS[1:]],
        decorate=lambda row: row.update(what=f"{row['case']} ({row['model']})"),
    )


if __name__ == "__main__":
    main()

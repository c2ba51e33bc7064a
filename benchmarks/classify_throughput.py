"""Classify-stage throughput and peak memory: training steps of mrrl's downstream 3D ResNet classifier.

mrrl's ``ClassifierModule.training_step`` (MONAI 3D ResNet, cross-entropy, AdamW) driven by a Lightning
Trainer on synthetic volumes held in memory, as the classify stage trains it on real and synthetic volumes.
The case runs in a fresh process (clean peak-memory counters). Volumes/s = batch / mean seconds per step
after ``--warmup`` untimed steps. The network follows ``conf/stage/classify.yaml`` (``paper``: ResNet-50) or
the demo's ResNet-10 at half width (``tiny``).

Not a test. Examples::

    python benchmarks/classify_throughput.py --preset tiny --device cpu --threads 2
    python benchmarks/classify_throughput.py --preset paper --device cuda --batch 8 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import (
    PeakMemory,
    StepTimer,
    lightning_trainer,
    run_benchmark,
    step_result,
)

REPO = Path(__file__).resolve().parent.parent
CASES = ("train",)
PRESETS = {
    "paper": {"image_size": 64, "batch": 8, "arch": None, "net": {}},  # the stage's defaults (ResNet-50)
    "tiny": {"image_size": 32, "batch": 4, "arch": "resnet10", "net": {"widen_factor": 0.5}},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--image-size", type=int, help="volume side (overrides the preset)")
    parser.add_argument("--batch", type=int, help="volumes per step (overrides the preset)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    return parser.parse_args(argv)


def build_module(preset: dict):
    from omegaconf import OmegaConf

    from mrrl.classify.model import ClassifierModule

    stage = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "stage" / "classify.yaml"), resolve=True)
    assert isinstance(stage, dict)
    net = {**stage["net"], **preset["net"]}
    return ClassifierModule(
        arch=preset["arch"] or stage["arch"],
        in_channels=1,
        class_names=["class0", "class1"],
        net=net,
        optim={**stage["finetune"], "scheduler": "none"},
        threshold=float(stage["threshold"]),
    )


def run_case(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    size, batch = args.image_size or preset["image_size"], args.batch or preset["batch"]
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = build_module(preset)
    n_steps = args.warmup + args.steps
    items = [
        {"image": torch.rand(1, size, size, size) * 2 - 1, "label": torch.tensor(i % 2)}
        for i in range(batch * n_steps)
    ]
    loader = torch.utils.data.DataLoader(items, batch_size=batch, pin_memory=device.type == "cuda")
    timer = StepTimer(device)
    trainer = lightning_trainer(
        device, args.precision, [timer.callback], max_epochs=1, limit_train_batches=n_steps
    )
    memory = PeakMemory(device).start()
    trainer.fit(module, train_dataloaders=loader)
    seconds = timer.mean(skip=args.warmup)
    return {
        "arch": module.hparams.arch,
        **step_result(args.case, seconds, batch, module, size, device, memory),
    }


def main() -> None:
    args = parse_args()
    run_benchmark(
        __file__,
        args,
        run_case,
        CASES,
        lambda first: (
            f"Classifier {args.preset}: {first['arch']} {first['params_m']:.2f} M parameters, {first['size']}³ "
            f"volumes, batch {first['batch']}, {args.precision}, {first['device']}; {args.steps} timed steps after "
            f"{args.warmup}; memory: {first['memory_method']}"
        ),
    )


if __name__ == "__main__":
    main()

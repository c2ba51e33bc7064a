"""VQGAN-stage throughput and peak memory: training steps of mrrl's ``VQGANModule``.

The stage's own ``training_step`` (encoder, chunked EMA quantiser, decoder, L1 + commitment loss, and once
the warm-up is over the 3D volume and 2D slice discriminators with the adaptive weight and their own
optimiser step), driven by a Lightning Trainer on synthetic volumes held in memory. Two cases:

* ``warmup``: before ``adv_start_step``, generator only;
* ``adversarial``: discriminators on from the first step (the reconstruction is reused for their step).

Each case runs in a fresh process (clean peak-memory counters). Volumes/s = batch / mean seconds per step
after ``--warmup`` untimed steps. Networks follow ``conf/stage/vqgan.yaml`` with the preset's sizes.

Not a test. Examples::

    python benchmarks/vqgan_throughput.py --preset tiny --device cpu --threads 2
    python benchmarks/vqgan_throughput.py --preset paper --device cuda --batch 2
    python benchmarks/vqgan_throughput.py --preset paper --device cuda --image-size 128 --precision bf16-mixed
    python benchmarks/vqgan_throughput.py --preset paper --device cuda --image-size 128 --grad-ckpt --channels-last

Speed flags (``stage.speed``, see ``mrrl/training/speed.py``): ``--channels-last`` (generator and 3D discriminator),
``--grad-ckpt`` (the generator's encoder/decoder blocks), ``--compile [BACKEND]`` (encoder/decoder blocks and
both discriminators; the untimed warm-up steps absorb the compilation). Run once per setting and compare.
"""

from __future__ import annotations

import argparse

import torch
from _common import (
    PeakMemory,
    StepTimer,
    add_speed_arguments,
    lightning_trainer,
    run_benchmark,
    speed_config,
    speed_label,
    stage_settings,
    step_result,
)

CASES = ("warmup", "adversarial")
PRESETS = {
    # DESIGN defaults: 64³, ×4 downsampling, codebook 512 × 8, 3-layer patch discriminators.
    "paper": {
        "image_size": 64,
        "batch": 2,
        "net": {"channels": [64, 128], "num_res_blocks": 2, "codebook_size": 512, "codebook_dim": 8},
        "discriminator": {"channels": 64, "num_layers": 3, "slices_per_volume": 4},
    },
    # The demo's VQGAN (conf/preset/demo_vqgan.yaml) at 32³: two busy CPU cores manage it.
    "tiny": {
        "image_size": 32,
        "batch": 2,
        "net": {"channels": [16, 32], "num_res_blocks": 1, "codebook_size": 256, "codebook_dim": 8},
        "discriminator": {"channels": 16, "num_layers": 3, "slices_per_volume": 4},
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--image-size", type=int, help="volume side (overrides the preset)")
    parser.add_argument("--batch", type=int, help="volumes per step (overrides the preset)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision", default="32-true", help="Lightning precision, e.g. 32-true, bf16-mixed"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    add_speed_arguments(parser)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    return parser.parse_args(argv)


def build_module(preset: dict, image_size: int, adversarial: bool, speed: dict | None = None):
    from mrrl.vqgan.module import VQGANModule, VQGANSettings

    overrides = {
        "net": preset["net"],
        "discriminator": preset["discriminator"],
        "loss": {"adv_start_step": 0 if adversarial else 10**9},
    }
    settings = stage_settings(VQGANSettings, "vqgan", overrides)
    return VQGANModule((1, image_size, image_size, image_size), settings, speed=speed)


def run_case(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    size, batch = args.image_size or preset["image_size"], args.batch or preset["batch"]
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = build_module(preset, size, adversarial=args.case == "adversarial", speed=speed_config(args))
    n_steps = args.warmup + args.steps
    volumes = [{"image": torch.rand(1, size, size, size) * 2 - 1} for _ in range(batch * n_steps)]
    loader = torch.utils.data.DataLoader(volumes, batch_size=batch, pin_memory=device.type == "cuda")
    timer = StepTimer(device)
    trainer = lightning_trainer(
        device, args.precision, [timer.callback], max_epochs=1, limit_train_batches=n_steps
    )
    memory = PeakMemory(device).start()
    trainer.fit(module, train_dataloaders=loader)
    seconds = timer.mean(skip=args.warmup)
    return step_result(args.case, seconds, batch, module, size, device, memory)


def main() -> None:
    args = parse_args()
    run_benchmark(
        __file__,
        args,
        run_case,
        CASES,
        lambda first: (
            f"VQGAN {args.preset} [{speed_label(args)}]: {first['size']}³ volumes, batch {first['batch']}, "
            f"{args.precision}, "
            f"{first['params_m']:.2f} M parameters (generator + discriminators), {first['device']}; "
            f"{args.steps} timed steps after {args.warmup}; memory: {first['memory_method']}"
        ),
    )


if __name__ == "__main__":
    main()

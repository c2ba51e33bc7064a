"""PPO-stage iteration time and peak memory, and how memory scales with the rollout length K.

One PPO iteration of mrrl's ``PPOModule`` (one Lightning epoch): a K-step DDIM (η = 1) rollout of
``--rollout-batch`` class-balanced latents with the policy, recording every transition on the CPU; VQGAN
decoding; the multi-scale reward ``0.5·R3D + 0.5·R2D``; per-class advantages; then the clipped-ratio update
with the KL penalty to the frozen reference, backpropagated one timestep at a time. Networks are built
directly with random weights (no training): a VQGAN, a diffusion UNet and both reward regressors.

Each K runs in a fresh process (clean peak-memory counters). Reported: seconds per iteration (rollout and
update separately), generated volumes per second (``--rollout-batch`` / iteration time), peak memory and
its growth over the start of the measured section, and the peak-memory ratio between the largest and the
smallest K (goal ≤ 1.3: the update keeps one timestep's graph alive, the rollout buffer lives on the CPU —
on a GPU the buffer is host memory and does not count; on the CPU it is part of the RSS).

Speed flags (``stage.speed`` of the PPO stage, see ``mrrl/training/speed.py``), applied through ``PPOModule``:
``--channels-last`` (policy and reference UNets), ``--grad-ckpt`` (the policy UNet's blocks in the update,
where one timestep's graph is alive at a time), ``--compile [BACKEND]`` (policy and reference UNets; the
untimed warm-up iteration absorbs the compilation). Run once per setting and compare.

Not a test. Examples::

    python benchmarks/ppo_iteration.py --preset tiny --device cpu --threads 2
    python benchmarks/ppo_iteration.py --preset paper --device cuda --steps 10 50
    python benchmarks/ppo_iteration.py --preset paper --device cuda --image-size 128 --steps 10 --grad-ckpt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    PeakMemory,
    StepTimer,
    add_speed_arguments,
    device_name,
    emit,
    lightning_trainer,
    print_table,
    run_case_in_child,
    speed_config,
    speed_label,
)

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["class0", "class1"]
PRESETS = {
    # Paper scale: 64³ volumes, ×4 VQGAN (8 × 16³ latents), the DESIGN UNet, the reward stage's defaults.
    "paper": {
        "image_size": 64,
        "vq_channels": [64, 128],
        "vq_res_blocks": 2,
        "unet": {
            "channels": [64, 128, 256],
            "attention_levels": [False, False, True],
            "num_res_blocks": 2,
            "num_head_channels": 64,
            "norm_num_groups": 32,
        },
        "r3d": {"arch": "resnet18", "width": 32},
        "r2d": {"arch": "resnet18", "width": 64},
        "rollout_batch": 16,
        "train_batch": 8,
    },
    # The tiny diffusion benchmark's networks at 32³ (8 × 8³ latents), ResNet-10 rewards.
    "tiny": {
        "image_size": 32,
        "vq_channels": [16, 32],
        "vq_res_blocks": 1,
        "unet": {
            "channels": [16, 32, 64],
            "attention_levels": [False, False, True],
            "num_res_blocks": 1,
            "num_head_channels": 16,
            "norm_num_groups": 8,
        },
        "r3d": {"arch": "resnet10", "width": 8},
        "r2d": {"arch": "resnet10", "width": 16},
        "rollout_batch": 4,
        "train_batch": 2,
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--image-size", type=int, help="volume side (overrides the preset)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50], help="rollout lengths K to compare")
    parser.add_argument("--rollout-batch", type=int, help="volumes sampled per iteration (overrides)")
    parser.add_argument("--train-batch", type=int, help="trajectories per optimiser step (overrides)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="Lightning precision")
    parser.add_argument("--iterations", type=int, default=2, help="timed PPO iterations per K")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    add_speed_arguments(parser)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # "K=<n>": one K, in this process
    return parser.parse_args(argv)


def _nonzero_outputs(module: torch.nn.Module) -> None:
    """MONAI zero-initialises the UNet's output convolutions; small random weights make it depend on inputs."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            if param.abs().sum() == 0:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def build_checkpoints(preset: dict, size: int, folder: Path) -> tuple[str, str]:
    """Random-weight VQGAN and diffusion checkpoints in the stages' formats."""
    from _common import stage_settings

    from mrrl.diffusion.module import DiffusionModule, DiffusionSettings
    from mrrl.vqgan.module import VQGANModule, VQGANSettings

    net = {
        "channels": preset["vq_channels"],
        "num_res_blocks": preset["vq_res_blocks"],
        "codebook_size": 512,
        "codebook_dim": 8,
    }
    vq_settings = stage_settings(
        VQGANSettings, "vqgan", {"net": net, "discriminator": {"channels": 8, "num_layers": 2}}
    )
    diff_settings = stage_settings(DiffusionSettings, "diffusion", {"unet": preset["unet"]})
    vq = VQGANModule((1, size, size, size), vq_settings)
    vq_path = folder / "vqgan.ckpt"
    torch.save({"hyper_parameters": dict(vq.hparams), "state_dict": vq.state_dict()}, vq_path)
    diff = DiffusionModule(
        (8, size // 4, size // 4, size // 4), CLASSES, diff_settings, vqgan_ckpt=str(vq_path), seed=0
    )
    _nonzero_outputs(diff.denoiser.unet)
    diff.ema.unet.load_state_dict(diff.denoiser.unet.state_dict())
    diff.set_scale_factor(1.0)
    diff_path = folder / "diffusion.ckpt"
    torch.save({"hyper_parameters": dict(diff.hparams), "state_dict": diff.state_dict()}, diff_path)
    return str(vq_path), str(diff_path)


def ppo_config(args, preset: dict, k: int) -> dict:
    """``conf/stage/ppo.yaml`` with this run's K and batch sizes (no FID probe, no figures)."""
    from omegaconf import OmegaConf

    stage = OmegaConf.load(REPO / "conf" / "stage" / "ppo.yaml")
    stage.seed = 0
    cfg = OmegaConf.to_container(stage, resolve=True)
    assert isinstance(cfg, dict)
    cfg["sample"].update(num_steps=k, batch_size=args.rollout_batch or preset["rollout_batch"])
    cfg["train"].update(batch_size=args.train_batch or preset["train_batch"])
    cfg["probe"].update(every=0)
    cfg["figures"].update(every=10**9)
    return cfg


def run_case(args: argparse.Namespace) -> dict:
    from mrrl.ppo.module import PPOModule
    from mrrl.ppo.multiscale_reward import MultiScaleReward
    from mrrl.reward.models import build_reward_net

    preset = PRESETS[args.preset]
    size = args.image_size or preset["image_size"]
    k = int(args.case.removeprefix("K="))
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ppo_config(args, preset, k)
    with tempfile.TemporaryDirectory() as folder:
        vq_path, diff_path = build_checkpoints(preset, size, Path(folder))
        module = PPOModule(diff_path, vq_path, CLASSES, cfg, reward_ckpts=None, speed=speed_config(args))
    shape = (1, size, size, size)
    r3d = build_reward_net("r3d", shape, preset["r3d"]).eval().requires_grad_(False)
    r2d = build_reward_net("r2d", shape, preset["r2d"]).eval().requires_grad_(False)
    reward = cfg["reward"]
    module.reward_fn = MultiScaleReward(
        r3d, r2d, float(reward["w3d"]), float(reward["w2d"]), float(reward["uncertainty_penalty"])
    )
    phases: dict[str, list[float]] = {"rollout": [], "update": []}

    def timed(name: str, fn):
        def wrapper(*a, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            phases[name].append(time.perf_counter() - t0)
            return out

        return wrapper

    module.rollout = timed("rollout", module.rollout)
    module.update = timed("update", module.update)
    timer = StepTimer(device)
    trainer = lightning_trainer(
        device,
        args.precision,
        [timer.callback],
        max_epochs=args.warmup + args.iterations,
        use_distributed_sampler=False,
    )
    memory = PeakMemory(device).start()
    trainer.fit(module)
    seconds = timer.mean(skip=args.warmup)
    n = int(cfg["sample"]["batch_size"])
    return {
        "case": args.case,
        "k": k,
        "s_per_iteration": seconds,
        "rollout_s": sum(phases["rollout"][args.warmup :]) / max(args.iterations, 1),
        "update_s": sum(phases["update"][args.warmup :]) / max(args.iterations, 1),
        "volumes_per_s": n / seconds,
        "rollout_batch": n,
        "train_batch": int(cfg["train"]["batch_size"]),
        "unet_params_m": sum(p.numel() for p in module.policy.parameters()) / 1e6,
        "size": size,
        "device": device_name(device),
        "skipped_updates": int(module.skipped_updates),
        **memory.stop(),
        "memory_method": memory.method,
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        emit(run_case(args))
        return
    rows = [run_case_in_child(__file__, sys.argv[1:], f"K={k}") for k in args.steps]
    first = rows[0]
    print(
        f"PPO {args.preset} [{speed_label(args)}]: {first['size']}³ volumes, rollout batch {first['rollout_batch']}, train batch "
        f"{first['train_batch']}, UNet {first['unet_params_m']:.2f} M parameters, {args.precision}, "
        f"{first['device']}; {args.iterations} timed iterations after {args.warmup}; memory: {first['memory_method']}"
    )
    print_table(
        rows,
        [
            ("case", "K", "s"),
            ("s_per_iteration", "s/iteration", ".2f"),
            ("rollout_s", "rollout s", ".2f"),
            ("update_s", "update s", ".2f"),
            ("volumes_per_s", "volumes/s", ".3f"),
            ("peak_mib", "peak MiB", ".0f"),
            ("growth_mib", "growth MiB", ".0f"),
        ],
    )
    small, large = min(rows, key=lambda r: r["k"]), max(rows, key=lambda r: r["k"])
    if small is not large:
        ratio = large["peak_mib"] / small["peak_mib"]
        growth = large["growth_mib"] / max(small["growth_mib"], 1e-9)
        print(
            f"peak memory K={large['k']} / K={small['k']}: {ratio:.2f} (goal ≤ 1.3; "
            f"{'met' if ratio <= 1.3 else 'NOT met'}), growth over the start {growth:.2f}"
        )


if __name__ == "__main__":
    main()

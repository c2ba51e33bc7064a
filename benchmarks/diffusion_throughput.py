"""Diffusion-stage throughput: cached latents vs on-the-fly VQGAN encoding, DDIM vs DDPM sampling.

(a) training optimiser steps per second of mrrl's ``DiffusionModule`` (loss, backward, clipping, AdamW,
    EMA update) on a batch of latents taken from the in-memory latent cache (what ``LatentDataModule``
    does), and on a batch of preprocessed volumes read from ``.npy`` files (what the volume cache of
    ``MRIDataModule`` holds; warm page cache, no DataLoader workers) and encoded by the frozen VQGAN inside
    every step. Both batches start on the CPU and are copied to the device.
(b) seconds per generated volume (sampling + VQGAN decoding) of DDIM with 50 steps and DDPM with 1000
    steps at the sampling batch size. DDPM over all 1000 training timesteps needs ``steps_offset=0``
    (the stage default, 1, allows at most 999 steps), so that run uses the same weights with that schedule.

Speed flags (``stage.speed`` of the diffusion stage, see ``mrrl/training/speed.py``), applied through
``DiffusionModule``: ``--channels-last`` (UNet and EMA copy), ``--grad-ckpt`` (the UNet's down/mid/up blocks),
``--compile [BACKEND]`` (the trained UNet; the untimed warm-up steps absorb the compilation, and the sampling
cases use the uncompiled EMA copy). Each training case also reports its peak memory (see ``_common.py``);
``--skip-sampling`` leaves out (b). Run once per setting and compare.

Not a test. Examples::

    python benchmarks/diffusion_throughput.py --preset tiny --device cpu
    python benchmarks/diffusion_throughput.py --preset paper --device cuda --batch 16 --sample-batch 128
    python benchmarks/diffusion_throughput.py --preset paper --device cuda --precision bf16 --channels-last --skip-sampling
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import PeakMemory, add_speed_arguments, speed_config, speed_label, stage_settings

from mrrl.diffusion.generate import generate_volumes
from mrrl.diffusion.module import DiffusionModule, DiffusionSettings
from mrrl.diffusion.unet import DenoiserModel
from mrrl.vqgan.networks import VQGAN

PRESETS = {
    # The paper-scale networks: 64³ volumes, ×4 VQGAN (8 × 16³ latents), the 41 M-parameter DESIGN UNet.
    "paper": {
        "image_size": 64,
        "vq_channels": [64, 128],
        "unet_channels": [64, 128, 256],
        "attention": [False, False, True],
        "head_channels": 64,
        "norm_groups": 32,
    },
    # Something two busy CPU cores finish in a minute: both networks at 1/4 of the paper's widths.
    "tiny": {
        "image_size": 32,
        "vq_channels": [16, 32],
        "unet_channels": [16, 32, 64],
        "attention": [False, False, True],
        "head_channels": 16,
        "norm_groups": 8,
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--image-size", type=int, help="volume side (overrides the preset)")
    parser.add_argument("--vq-channels", type=int, nargs="+", help="VQGAN channels per level (overrides)")
    parser.add_argument(
        "--unet-channels",
        type=int,
        nargs="+",
        help="UNet channels per level (overrides; attention at the last level)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    parser.add_argument("--batch", type=int, default=4, help="training batch")
    parser.add_argument("--train-steps", type=int, default=10, help="timed optimiser steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--sample-batch", type=int, default=4, help="sampling batch (= volumes generated)")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: leave as is; on a shared CPU 1 avoids OpenMP stalls)",
    )
    parser.add_argument("--skip-sampling", action="store_true", help="time training only")
    parser.add_argument("--skip-training", action="store_true", help="time sampling only")
    parser.add_argument(
        "--skip-on-the-fly", action="store_true", help="time training from cached latents only"
    )
    add_speed_arguments(parser)
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 0) -> float:
    """Mean seconds per call after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / max(iters, 1)


def build(
    preset: dict, image_size: int, device: torch.device, speed: dict | None = None
) -> tuple[VQGAN, DiffusionModule, tuple[int, ...]]:
    vqgan = (
        VQGAN(
            channels=preset["vq_channels"],
            num_res_blocks=2,
            downsample_factor=4,
            codebook_size=512,
            codebook_dim=8,
        )
        .to(device)
        .eval()
        .requires_grad_(False)
    )
    latent_shape = (8, *(image_size // 4,) * 3)
    unet = {
        "channels": preset["unet_channels"],
        "attention_levels": preset["attention"],
        "num_res_blocks": 2,
        "num_head_channels": preset["head_channels"],
        "norm_num_groups": preset["norm_groups"],
    }
    settings = stage_settings(DiffusionSettings, "diffusion", {"unet": unet})
    module = DiffusionModule(
        latent_shape, ["class0", "class1"], settings, vqgan_ckpt=None, seed=0, speed=speed
    ).to(device)
    module.set_scale_factor(1.0)
    return vqgan, module, latent_shape


def write_volumes(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` float32 ``[1, size, size, size]`` volumes as ``.npy``, like the preprocessing cache."""
    paths = []
    for i in range(count):
        paths.append(folder / f"volume_{i:04d}.npy")
        np.save(paths[-1], np.random.default_rng(i).uniform(-1, 1, (1, size, size, size)).astype(np.float32))
    return paths


def training_cases(
    args, vqgan: VQGAN, module: DiffusionModule, volume_files: list[Path], device: torch.device
) -> dict[str, tuple[float, dict]]:
    """(seconds per optimiser step, peak memory incl. the warm-up steps), from the latent cache and through
    the VQGAN encoder."""
    pool = len(volume_files)
    with torch.no_grad():
        latents = torch.cat(
            [vqgan.encode(torch.from_numpy(np.load(f))[None].to(device)).cpu() for f in volume_files]
        )
    labels = torch.randint(0, 2, (pool,))
    optimizer = module.configure_optimizers()["optimizer"]
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    step = [0]

    def train_on(z: torch.Tensor, y: torch.Tensor) -> None:
        with autocast:
            loss = module.diffusion_loss(z, y, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.denoiser.parameters(), 1.0)
        optimizer.step()
        step[0] += 1
        module.update_ema(step[0])

    def batch_index() -> list[int]:
        return torch.randint(0, pool, (args.batch,)).tolist()

    def cached() -> None:
        idx = batch_index()
        train_on(latents[idx].to(device, non_blocking=True), labels[idx].to(device))

    def on_the_fly() -> None:
        idx = batch_index()
        volumes = torch.stack([torch.from_numpy(np.load(volume_files[i])) for i in idx])
        with torch.no_grad(), autocast:
            z = vqgan.encode(volumes.to(device, non_blocking=True))
        train_on(z.float(), labels[idx].to(device))

    def measured(fn: Callable[[], None]) -> tuple[float, dict]:
        memory = PeakMemory(device).start()
        seconds = timed(fn, device, args.train_steps, args.warmup)
        return seconds, {**memory.stop(), "method": memory.method}

    module.train()
    cases = {"cached latents": measured(cached)}
    if not args.skip_on_the_fly:
        cases["VQGAN encode on the fly"] = measured(on_the_fly)
    return cases


def sampling_cases(args, vqgan: VQGAN, module: DiffusionModule, latent_shape, device) -> dict[str, dict]:
    """Seconds per decoded volume and peak memory: DDIM ``--ddim-steps`` and DDPM ``--ddpm-steps`` (0: skip)."""
    ema = module.ema.eval()
    ddpm_model = DenoiserModel(
        ema.unet, ema.schedule.replace(steps_offset=0, set_alpha_to_one=True), ema.null_label
    )
    labels = torch.arange(args.sample_batch) % 2
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )

    def run(model: DenoiserModel, steps: int, sampler: str) -> Callable[[], object]:
        def go():
            with autocast:
                return generate_volumes(
                    model,
                    vqgan,
                    1.0,
                    labels,
                    latent_shape,
                    num_steps=steps,
                    sampler=sampler,
                    batch_size=args.sample_batch,
                    generator=torch.Generator().manual_seed(0),
                )

        return go

    n = args.sample_batch

    def measured(fn: Callable[[], object], warmup: int) -> dict:
        memory = PeakMemory(device).start()
        seconds = timed(fn, device, 1, warmup=warmup)
        return {"s_per_volume": seconds / n, "steps": 0, **memory.stop(), "method": memory.method}

    cases = {"ddim": {**measured(run(ema, args.ddim_steps, "ddim"), 1), "steps": args.ddim_steps}}
    if args.ddpm_steps > 0:
        cases["ddpm"] = {**measured(run(ddpm_model, args.ddpm_steps, "ddpm"), 0), "steps": args.ddpm_steps}
    return cases


def measure(args: argparse.Namespace) -> dict:
    """Build the networks and run the cases ``args`` asks for: ``{"info", "training", "sampling"}``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset])
    args.image_size = args.image_size or preset["image_size"]
    if args.vq_channels:
        preset["vq_channels"] = args.vq_channels
    if args.unet_channels:
        preset["unet_channels"] = args.unet_channels
        preset["attention"] = [False] * (len(args.unet_channels) - 1) + [True]
    device = torch.device(args.device)
    torch.manual_seed(0)
    vqgan, module, latent_shape = build(preset, args.image_size, device, speed_config(args))
    info = {
        "device": f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})",
        "latent_shape": list(latent_shape),
        "unet_channels": preset["unet_channels"],
        "unet_params_m": sum(p.numel() for p in module.denoiser.parameters()) / 1e6,
        "vq_channels": preset["vq_channels"],
        "vq_params_m": sum(p.numel() for p in vqgan.parameters()) / 1e6,
    }
    out: dict = {"info": info, "training": {}, "sampling": {}}
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as folder:
            volume_files = write_volumes(Path(folder), 4 * args.batch, args.image_size)
            train = training_cases(args, vqgan, module, volume_files, device)
        out["training"] = {
            name: {"s_per_step": seconds, **memory} for name, (seconds, memory) in train.items()
        }
    if not args.skip_sampling:
        out["sampling"] = sampling_cases(args, vqgan, module, latent_shape, device)
    return out


def main() -> None:
    args = parse_args()
    result = measure(args)
    info = result["info"]
    print(
        f"device {info['device']}, {args.precision}, volumes {args.image_size}³ -> latents {info['latent_shape']}, "
        f"UNet {info['unet_channels']} {info['unet_params_m']:.2f} M params, VQGAN {info['vq_channels']} "
        f"{info['vq_params_m']:.2f} M, torch threads {torch.get_num_threads()}; speed: {speed_label(args)}"
    )
    train = result["training"]
    if train:
        method = next(iter(train.values()))["method"]
        print(f"\n(a) training, batch {args.batch}, {args.train_steps} timed steps; memory: {method}")
        print(f"{'case':<28}{'s/step':>10}{'steps/s':>10}{'peak MiB':>10}{'growth MiB':>12}")
        for name, case in train.items():
            print(
                f"{name:<28}{case['s_per_step']:>10.4f}{1 / case['s_per_step']:>10.2f}{case['peak_mib']:>10.0f}"
                f"{case['growth_mib']:>12.0f}"
            )
        if "VQGAN encode on the fly" in train:
            ratio = train["VQGAN encode on the fly"]["s_per_step"] / train["cached latents"]["s_per_step"]
            print(f"cache speed-up: {ratio:.2f}x (goal >= 3x)")
    sampling = result["sampling"]
    if not sampling:
        return
    print(f"\n(b) sampling + decoding, batch {args.sample_batch}")
    print(f"{'case':<28}{'s/volume':>10}{'peak MiB':>10}")
    for name, case in sampling.items():
        label = f"{name.upper()} {case['steps']} steps"
        print(f"{label:<28}{case['s_per_volume']:>10.4f}{case['peak_mib']:>10.0f}")
    if "ddpm" in sampling:
        print(f"DDIM speed-up: {sampling['ddpm']['s_per_volume'] / sampling['ddim']['s_per_volume']:.1f}x")


if __name__ == "__main__":
    main()

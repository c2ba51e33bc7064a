"""``mrrl stage=export`` throughput and size on disk, at 32³ by default.

Builds a small phantom cohort (``data=phantom_tumor``, the demo's MNI-template brains), random-weight
VQGAN and diffusion checkpoints in the stages' formats (the ``tiny`` widths of ``diffusion_throughput.py``,
or ``paper``), then runs the real export stage in-process and reports:

* export volumes/s: sampling (DDIM, ``--steps``) + decoding + NIfTI writing, from the stage's manifest;
* write-only volumes/s: the same volumes written again through ``mrrl.export.cohort.write_case``;
* size on disk per volume (``.nii.gz``, float32) of the exported volumes, and of the real preprocessed
  volumes written the same way (random-weight samples are noise-like and compress worse than brains,
  whose background is constant, so the real-content size is the closer one to plan storage with).

Not a test. Examples::

    python benchmarks/export_throughput.py --device cpu --threads 2
    python benchmarks/export_throughput.py --preset paper --image-size 64 --device cuda --n 64 --batch 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from hydra import compose, initialize_config_dir

from mrrl.cli import CONFIG_DIR

PRESETS = {
    "tiny": {"vq_channels": [16, 32], "unet_channels": [16, 32, 64], "head_channels": 16, "norm_groups": 8},
    "paper": {
        "vq_channels": [64, 128],
        "unet_channels": [64, 128, 256],
        "head_channels": 64,
        "norm_groups": 32,
    },
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--n", type=int, default=16, help="volumes per class (2 classes)")
    parser.add_argument("--batch", type=int, default=8, help="stage.sample_batch_size")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    return parser.parse_args()


def _randomise_zero_params(module: torch.nn.Module) -> None:
    """MONAI zero-initialises the UNet's output convs; random ones make samples that depend on the noise."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            if param.abs().sum() == 0:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def checkpoints(folder: Path, preset: dict, size: int) -> dict[str, str]:
    from _common import stage_settings

    from mrrl.diffusion.module import DiffusionModule, DiffusionSettings
    from mrrl.vqgan.module import VQGANModule, VQGANSettings

    net = {"channels": preset["vq_channels"], "num_res_blocks": 2, "codebook_size": 512, "codebook_dim": 8}
    vq_settings = stage_settings(
        VQGANSettings, "vqgan", {"net": net, "discriminator": {"channels": 8, "num_layers": 2}}
    )
    levels = len(preset["unet_channels"])
    unet = {
        "channels": preset["unet_channels"],
        "attention_levels": [False] * (levels - 1) + [True],
        "num_res_blocks": 2,
        "num_head_channels": preset["head_channels"],
        "norm_num_groups": preset["norm_groups"],
    }
    diff_settings = stage_settings(DiffusionSettings, "diffusion", {"unet": unet})
    torch.manual_seed(0)
    vq = VQGANModule((1, size, size, size), vq_settings)
    vq_path = folder / "vqgan.ckpt"
    torch.save({"hyper_parameters": dict(vq.hparams), "state_dict": vq.state_dict()}, vq_path)
    diff = DiffusionModule(
        (8, size // 4, size // 4, size // 4), ["HGG", "LGG"], diff_settings, vqgan_ckpt=str(vq_path), seed=0
    )
    _randomise_zero_params(diff.denoiser.unet)
    diff.ema.unet.load_state_dict(diff.denoiser.unet.state_dict())
    diff.set_scale_factor(1.0)
    diff_path = folder / "diffusion.ckpt"
    torch.save({"hyper_parameters": dict(diff.hparams), "state_dict": diff.state_dict()}, diff_path)
    return {"vqgan": str(vq_path), "diffusion": str(diff_path)}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from mrrl.export.cohort import Case, write_case
    from mrrl.stages import export as export_stage
    from mrrl.training.runtime import build_datamodule

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = checkpoints(tmp, PRESETS[args.preset], args.image_size)
        accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=[
                    "stage=export",
                    "data=phantom_tumor",
                    "data.phantom.n_per_class=4",
                    "data.test_per_class=1",
                    f"data.image_size={args.image_size}",
                    "data.progress=false",
                    f"paths.run_root={tmp / 'runs'}",
                    f"paths.data_root={tmp / 'data'}",
                    f"paths.cache_dir={tmp / 'cache'}",
                    f"trainer.accelerator={accelerator}",
                    f"stage.ckpt={ckpt['diffusion']}",
                    f"stage.n_per_class={args.n}",
                    f"stage.sample_batch_size={args.batch}",
                    f"stage.num_steps={args.steps}",
                    "logger=none",
                ],
            )
        outputs = export_stage.run(cfg, tmp / "runs" / "export")
        cohort = Path(outputs["cohort"])
        files = sorted(cohort.rglob("*.nii.gz"))
        synthetic_bytes = np.mean([f.stat().st_size for f in files])
        geometry = json.loads((cohort / "provenance.json").read_text())["geometry"]
        affine = np.asarray(geometry["affine"])

        volumes = [np.asarray(nib.load(f).dataobj)[None] for f in files]
        start = time.perf_counter()
        for i, v in enumerate(volumes):
            write_case("brats", tmp / "rewrite", Case(f"case_{i:05d}", "HGG", 0, 0), v, affine, ["flair"])
        write_rate = len(volumes) / (time.perf_counter() - start)
        datamodule = build_datamodule(cfg).prepare()
        real = [datamodule.cache.load(s.id) for s in datamodule.dataset("train").subjects]
        for i, v in enumerate(real):
            write_case("brats", tmp / "real", Case(f"real_{i:05d}", "HGG", 0, 0), v, affine, ["flair"])
        real_bytes = np.mean([f.stat().st_size for f in (tmp / "real").rglob("*.nii.gz")])
    size = args.image_size
    raw = size**3 * 4
    print(
        f"\nexport at {size}³, preset {args.preset}, device {args.device}, threads {torch.get_num_threads()}, "
        f"DDIM {args.steps} steps, batch {args.batch}, {outputs['n_cases']} volumes"
    )
    print("| measure | value |\n|---|---|")
    print(f"| export volumes/s (sample + decode + write) | {outputs['volumes_per_second']:.3f} |")
    print(f"| write-only volumes/s (.nii.gz, float32) | {write_rate:.1f} |")
    print(f"| size per exported volume (random-weight model) | {synthetic_bytes / 1024:.1f} KiB |")
    print(f"| size per real preprocessed volume, same writer | {real_bytes / 1024:.1f} KiB |")
    print(f"| uncompressed float32 | {raw / 1024:.1f} KiB |")


if __name__ == "__main__":
    main()

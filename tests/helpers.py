"""Helpers for stage tests: compose the real Hydra config in-process with tiny overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mrrl.cli import CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY_DATA = [
    "data.image_size=16",
    "data.test_per_class=1",
    "data.val_fraction=0.25",
    "data.progress=false",
    "data.batch_size=2",
    "trainer.log_every_n_steps=1",
]
TINY_VQGAN = [
    "stage.net.channels=[8,16]",
    "stage.net.num_res_blocks=1",
    "stage.net.codebook_size=32",
    "stage.net.codebook_dim=4",
    "stage.discriminator.channels=8",
    "stage.discriminator.num_layers=2",
    "stage.discriminator.slices_per_volume=2",
    "stage.progress_bar=false",
    "stage.trainer.check_val_every_n_epoch=1",
]


def compose_cfg(overrides: Sequence[str], run_root: Path) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"paths.run_root={run_root}"])


def stage_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.run_root) / cfg.experiment_name / cfg.stage.name


def _randomise_zero_params(module, seed: int = 0) -> None:
    """MONAI zero-initialises the UNet's output convs: an untrained model would ignore its inputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.abs().sum() == 0:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def tiny_checkpoints(root: Path, class_names: Sequence[str], image_size: int = 16) -> dict[str, str]:
    """A tiny VQGAN and a tiny diffusion checkpoint in the stages' formats (random weights, no training)."""
    import torch

    from mrrl.diffusion.module import DiffusionModule
    from mrrl.settings import from_config
    from mrrl.stages import diffusion as diffusion_stage
    from mrrl.vqgan.module import VQGANModule, VQGANSettings

    vq_cfg = compose_cfg(
        [
            "stage=vqgan",
            "stage.net.channels=[8,16]",
            "stage.net.num_res_blocks=1",
            "stage.net.codebook_size=16",
            "stage.net.codebook_dim=2",
            "stage.discriminator.channels=8",
            "stage.discriminator.num_layers=2",
            "stage.discriminator.norm=BATCH",  # the discriminator these checkpoints always had
            "stage.loss.adv_start_step=0",
            "stage.optim.lr_g=1e-3",
            "stage.optim.lr_d=1e-3",
        ],
        root,
    )
    diff_cfg = compose_cfg(
        [
            "stage=diffusion",
            "stage.unet.channels=[8,8]",
            "stage.unet.attention_levels=[false,false]",
            "stage.unet.num_res_blocks=1",
            "stage.unet.num_head_channels=8",
            "stage.unet.norm_num_groups=8",
            "stage.ema.decay=0.999",
            "stage.optim.lr=1e-3",
        ],
        root,
    )
    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    vq = VQGANModule(
        (1, image_size, image_size, image_size), from_config(VQGANSettings, vq_cfg.stage, "stage")
    )
    vq_path = root / "vqgan.ckpt"
    torch.save({"hyper_parameters": dict(vq.hparams), "state_dict": vq.state_dict()}, vq_path)
    diff = DiffusionModule(
        (2, image_size // 4, image_size // 4, image_size // 4),
        list(class_names),
        diffusion_stage.settings(diff_cfg),
        vqgan_ckpt=str(vq_path),
        seed=0,
    )
    _randomise_zero_params(diff.denoiser.unet)
    diff.ema.unet.load_state_dict(diff.denoiser.unet.state_dict())
    diff.set_scale_factor(1.0)
    diff_path = root / "diffusion.ckpt"
    # No recorded sampler, as in checkpoints written before the stage recorded one (tests/test_ppo.py reads it).
    hparams = {**dict(diff.hparams), "sampling": None}
    torch.save({"hyper_parameters": hparams, "state_dict": diff.state_dict()}, diff_path)
    return {"vqgan": str(vq_path), "diffusion": str(diff_path)}


def run_mrrl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m mrrl <args>`` in a fresh process (the real CLI: Hydra, DDP re-execution), output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mrrl", *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )

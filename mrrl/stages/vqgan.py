"""Stage 1, ``mrrl stage=vqgan``: the 3D VQGAN (paper §3.1), whose reconstructions are the FID limit.

Generator: L1 reconstruction + commitment loss (+ optional perceptual loss) + adversarial loss from two
patch discriminators, a 3D one on whole volumes and a 2D one on random axial slices, switched on after a
warm-up. Manual optimisation with separate generator and discriminator optimisers; the discriminator
step reuses the generator pass's reconstruction (detached) instead of decoding twice.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from mrrl.errors import ConfigError
from mrrl.manifest import write_manifest
from mrrl.settings import from_config
from mrrl.tracking.wandb_run import finish as finish_wandb
from mrrl.training.runtime import build_datamodule
from mrrl.training.speed import SpeedOptions
from mrrl.training.trainer import already_finished, build_trainer, checkpoint_outputs, fit
from mrrl.vqgan.loading import LATENT_FILE, ensure_latents
from mrrl.vqgan.module import VQGANModule, VQGANSettings

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- runner


def settings(cfg: DictConfig) -> VQGANSettings:
    """The model's settings from ``cfg.stage`` (every key from the YAML; a missing one is a ConfigError)."""
    return from_config(VQGANSettings, cfg.stage, "stage")


def check_config(cfg: DictConfig, image_shape: tuple[int, ...]) -> None:
    settings(cfg)  # a missing key fails before any data is read
    SpeedOptions.from_config(cfg.stage.speed)  # so do bad speed values
    factor = int(cfg.stage.net.downsample_factor)
    if any(s % factor for s in image_shape[1:]):
        raise ConfigError(
            f"data.image_size {list(image_shape[1:])} is not divisible by stage.net.downsample_factor={factor}"
        )
    min_size = 2 ** (int(cfg.stage.discriminator.num_layers) + 2)
    if min(image_shape[1:]) < min_size:
        raise ConfigError(
            f"volumes of {list(image_shape[1:])} are too small for stage.discriminator.num_layers="
            f"{cfg.stage.discriminator.num_layers} (need ≥ {min_size} voxels per axis): lower num_layers"
        )


def build_module(cfg: DictConfig, image_shape: tuple[int, ...]) -> VQGANModule:
    return VQGANModule(tuple(image_shape), settings(cfg), speed=cfg.stage.speed)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    if already_finished(cfg, run_dir):
        return None
    datamodule = build_datamodule(cfg)
    check_config(cfg, datamodule.image_shape)
    module = build_module(cfg, datamodule.image_shape)
    trainer, best_cb = build_trainer(cfg, run_dir, monitor="val/l1", mode="min", find_unused_parameters=True)
    fit(trainer, module, datamodule, run_dir, fresh=bool(cfg.stage.force))
    if not trainer.is_global_zero:
        return None
    outputs = checkpoint_outputs(run_dir, best_cb)
    best = outputs.get("best_ckpt") or outputs["last_ckpt"]
    # Final metrics come from the best checkpoint, re-validated on the validation split.
    val_metrics = _validate_best(cfg, best, datamodule, run_dir)
    latent_path = None
    if cfg.stage.latents.export:
        device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
        latent_path = ensure_latents(
            best, datamodule, run_dir / LATENT_FILE, int(cfg.stage.latents.batch_size), device
        )
    net = module.vqgan
    outputs.update(
        {
            "image_shape": list(datamodule.image_shape),
            "latent_shape": [net.config.codebook_dim, *net.latent_shape(datamodule.image_shape[1:])[-3:]],
            "codebook_size": net.config.codebook_size,
            "val": val_metrics,
            "latents": str(latent_path.resolve()) if latent_path else None,
            "data": datamodule.summary(),
        }
    )
    write_manifest(run_dir, "vqgan", outputs, cfg)
    finish_wandb(trainer.loggers, {"final": val_metrics})
    print(
        "vqgan: val L1 {l1:.4f}  PSNR {psnr:.2f} dB  SSIM {ssim:.4f}  codebook usage {usage:.1%}  perplexity {ppl:.1f}".format(
            l1=val_metrics.get("val/l1", math.nan),
            psnr=val_metrics.get("val/psnr", math.nan),
            ssim=val_metrics.get("val/ssim", math.nan),
            usage=val_metrics.get("val/codebook_usage", math.nan),
            ppl=val_metrics.get("val/perplexity", math.nan),
        )
    )
    return outputs


def _validate_best(cfg: DictConfig, ckpt: str, datamodule, run_dir: Path) -> dict[str, float]:
    """Validation metrics of ``ckpt`` on one device (no logger: the numbers go to the manifest)."""
    # No speed options for a few validation batches: compiling would cost more than it saves.
    module = VQGANModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True, speed=None)
    accelerator = "cpu" if cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available() else "gpu"
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(run_dir),
    )
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}

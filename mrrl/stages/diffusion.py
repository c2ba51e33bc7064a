"""Stage 2, ``mrrl stage=diffusion``: class-conditional latent 3D diffusion on the frozen VQGAN's latents.

The dataset is encoded once by the VQGAN (``latents.pt``); this stage trains MONAI's 3D
``DiffusionModelUNet`` (via :func:`mrrl.diffusion.build_denoiser`) on those cached latents, scaled to unit
variance by ``scale_factor = 1 / std`` of the training latents:

* DDPM training objective (epsilon by default, v or x0 prediction selectable), MSE loss, AdamW with
  optional warm-up and cosine decay, gradient clipping (``stage.trainer.gradient_clip_val``);
* optional classifier-free guidance (label dropout ``stage.cfg_dropout``, guidance scale at sampling);
* EMA weights, kept in the module (``ema.*`` in every checkpoint) and used for validation and sampling;
* validation: MSE of the EMA and raw weights at fixed timesteps with fixed noise (``val/loss``, the EMA
  one, picks ``best.ckpt``), and every ``stage.sample_every_n_epochs`` a few DDIM samples per class
  decoded by the VQGAN as a mid-slice figure.

Why not Lightning's ``EMAWeightAveraging``: its ``AveragedModel`` reads its update counter on the device
twice per step (two host syncs in a launch-bound loop), averages or swaps *all* buffers (the scale
factor included, which is only known at fit start, so sanity-check validation and early checkpoints
would carry a placeholder), and before ``update_starting_at_step`` validates and saves the initial
random weights. A 10-line EMA with ``torch._foreach_lerp_`` and a Python-side step count has none of these.

The checkpoint reloads alone (:func:`mrrl.diffusion.generate.load_diffusion`): hyper-parameters rebuild
the network and schedule, the scale factor is a buffer, the VQGAN checkpoint path is a string.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mrrl.diffusion.generate import export_ema, schedule_from_config
from mrrl.diffusion.latent_data import LatentDataModule, LatentDataSettings
from mrrl.diffusion.module import DiffusionModule, DiffusionSettings
from mrrl.diffusion.sampling import SAMPLERS
from mrrl.errors import ConfigError
from mrrl.manifest import read_manifest, resolve_checkpoint, write_manifest
from mrrl.settings import from_config
from mrrl.tracking.wandb_run import finish as finish_wandb
from mrrl.training.runtime import build_datamodule
from mrrl.training.speed import SpeedOptions
from mrrl.training.trainer import already_finished, build_trainer, checkpoint_dir, checkpoint_outputs, fit
from mrrl.utils.checkpoints import safe_load
from mrrl.vqgan.loading import LATENT_FILE, ensure_latents

log = logging.getLogger(__name__)

EMA_FILE = "ema.pt"


def settings(cfg: DictConfig) -> DiffusionSettings:
    """The model's settings from ``cfg.stage`` (every key from the YAML; a missing one is a ConfigError)."""
    return from_config(DiffusionSettings, cfg.stage, "stage")


def _build_latent_cache(cfg: DictConfig, vqgan_ckpt: str | Path, run_dir: Path) -> Path:
    """Encode the dataset with ``vqgan_ckpt`` into ``<run_dir>/latents.pt`` (reused while still valid)."""
    datamodule = build_datamodule(cfg).prepare()
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    batch = int(cfg.stage.latent_batch_size)
    return ensure_latents(vqgan_ckpt, datamodule, run_dir / LATENT_FILE, batch, device)


def resolve_inputs(cfg: DictConfig, run_dir: Path) -> tuple[str, Path]:
    """(VQGAN checkpoint, latent cache): ``stage.vqgan_ckpt`` if given (its latent cache built in ``run_dir``),
    else the vqgan stage's manifest (its latent cache, when it exported one)."""
    override = cfg.stage.vqgan_ckpt
    ckpt = resolve_checkpoint(override, cfg.paths.experiment_dir, "vqgan", "stage.vqgan_ckpt")
    if override:
        ckpt = str(Path(ckpt).resolve())
    else:
        latents = read_manifest(cfg.paths.experiment_dir, "vqgan")["outputs"].get("latents")
        if latents and Path(latents).is_file():
            return ckpt, Path(latents)
    return ckpt, _build_latent_cache(cfg, ckpt, run_dir)


def build_latent_datamodule(cfg: DictConfig, latent_path: Path) -> LatentDataModule:
    loader = from_config(LatentDataSettings, cfg.stage, "stage")
    return LatentDataModule(
        latent_path,
        batch_size=int(loader.batch_size or cfg.data.batch_size),
        eval_batch_size=loader.eval_batch_size or cfg.data.eval_batch_size,
        balanced=loader.balanced,
        num_val_timesteps=len(cfg.stage.val_timesteps),
        val_seed=loader.val_seed,
        seed=int(cfg.seed),
        num_workers=loader.num_workers,
    )


def check_config(cfg: DictConfig, latent_shape: Sequence[int]) -> None:
    """Config mistakes as one clear error before any training."""
    model = settings(cfg)
    levels = len(model.unet.channels)
    factor = 2 ** (levels - 1)
    if any(s % factor for s in latent_shape[1:]):
        raise ConfigError(
            f"latents of spatial size {list(latent_shape[1:])} cannot go through a {levels}-level UNet "
            f"(needs multiples of {factor}): shorten stage.unet.channels"
        )
    dropout, guidance = model.cfg_dropout, model.guidance_scale
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"stage.cfg_dropout must be in [0, 1), got {dropout}")
    if guidance != 1.0 and dropout == 0.0:
        raise ConfigError(
            "stage.guidance_scale != 1 needs a model trained with classifier-free guidance: "
            "set stage.cfg_dropout > 0 (e.g. 0.1)"
        )
    try:
        schedule = schedule_from_config(dataclasses.asdict(model.schedule))
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"stage.schedule: {exc}") from exc
    if model.sampler not in SAMPLERS:
        raise ConfigError(f"stage.sampler must be one of {SAMPLERS}, got {model.sampler!r}")
    for key in ("inference_steps", "val_sampling_steps"):
        steps = getattr(model, key)
        try:
            schedule.timesteps(int(steps))
        except ValueError as exc:
            raise ConfigError(f"stage.{key}={steps} with this stage.schedule: {exc}") from exc
    bad = [t for t in model.val_timesteps if not 0 <= int(t) < schedule.num_train_timesteps]
    if bad:
        raise ConfigError(f"stage.val_timesteps {bad} are outside [0, {schedule.num_train_timesteps})")
    SpeedOptions.from_config(cfg.stage.speed)


def build_module(cfg: DictConfig, datamodule: LatentDataModule, vqgan_ckpt: str | None) -> DiffusionModule:
    return DiffusionModule(
        datamodule.latent_shape,
        datamodule.class_names,
        settings(cfg),
        vqgan_ckpt=vqgan_ckpt,
        seed=int(cfg.seed),
        speed=cfg.stage.speed,
    )


def _global_step(ckpt_path: str) -> int:
    """From the file, not the Trainer: under ``ddp_spawn`` the main process's loops never ran."""
    return int(safe_load(ckpt_path)["global_step"])


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    if already_finished(cfg, run_dir):
        return None
    vqgan_ckpt, latent_path = resolve_inputs(cfg, run_dir)
    datamodule = build_latent_datamodule(cfg, latent_path)
    datamodule.setup("fit")
    check_config(cfg, datamodule.latent_shape)
    module = build_module(cfg, datamodule, vqgan_ckpt)
    trainer, best_cb = build_trainer(cfg, run_dir, monitor="val/loss", mode="min")
    fit(trainer, module, datamodule, run_dir, fresh=bool(cfg.stage.force))
    if not trainer.is_global_zero:
        return None
    outputs = checkpoint_outputs(run_dir, best_cb)
    best = outputs.get("best_ckpt") or outputs["last_ckpt"]
    ema_path = export_ema(best, checkpoint_dir(run_dir) / EMA_FILE)
    schedule = module.schedule.config
    outputs.update(
        {
            "ema_ckpt": str(ema_path.resolve()),
            "vqgan_ckpt": vqgan_ckpt,
            "latents": str(Path(latent_path).resolve()),
            "latent_shape": list(datamodule.latent_shape),
            "scale_factor": float(module.scale_factor),
            "class_names": datamodule.class_names,
            "schedule": schedule,
            "prediction_type": schedule["prediction_type"],
            "classifier_free_guidance": module.denoiser.supports_guidance,
            "sampling": module.settings.sampling,
            "val_loss": outputs.get("best_score"),
            "global_step": _global_step(outputs["last_ckpt"]),
        }
    )
    write_manifest(run_dir, "diffusion", outputs, cfg)
    final = {k: outputs[k] for k in ("global_step", "scale_factor")}
    finish_wandb(trainer.loggers, {"final": {**final, "val/loss": outputs["val_loss"]}})
    print(
        f"diffusion: {trainer.global_step} steps, best val/loss (EMA) {outputs.get('best_score') or math.nan:.4f}, "
        f"latent scale factor {outputs['scale_factor']:.4g}, EMA weights {ema_path}"
    )
    return outputs

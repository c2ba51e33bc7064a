"""Stage 5, ``mrrl stage=ppo``: PPO fine-tuning of the latent diffusion model (paper §3.5, DDPO-style).

The denoising process is a K-step decision task and the diffusion UNet is the policy: each step is a
Gaussian ``N(μθ(x_t), σ_t²)`` (DDIM with η > 0), whose log-probability is averaged over the latent's
dimensions. One training step = one PPO iteration:

1. rollout (no grad): sample class-balanced latents with the current policy, recording every transition
   and its log-prob; decode x̂0 with the frozen VQGAN; reward ``w3d·R3D(x̂0) + w2d·R2D(x̂0)``;
2. advantages: rewards normalised per class with statistics gathered from every DDP rank, clipped;
3. update: ``inner_epochs`` passes over the recorded transitions in minibatches; per timestep the clipped
   surrogate plus β × the closed-form KL to the frozen reference policy, backpropagated one timestep at a
   time (memory does not grow with K), gradients averaged across ranks, clipped, non-finite updates skipped.

Each Lightning "epoch" is one iteration, so an interrupted run resumes at an iteration boundary.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mrrl.errors import ManifestError
from mrrl.manifest import read_manifest, resolve_checkpoint, write_manifest
from mrrl.ppo.module import (
    PPOModule,
    rollout_sampling,
    save_policy_as_diffusion_checkpoint,
)
from mrrl.ppo.probe import ValidationProbe
from mrrl.ppo.settings import RewardSettings, ppo_settings
from mrrl.tracking.wandb_run import finish as finish_wandb
from mrrl.training.runtime import build_datamodule
from mrrl.training.speed import SpeedOptions
from mrrl.training.trainer import already_finished, build_trainer, checkpoint_outputs, fit

log = logging.getLogger(__name__)

FINAL_CKPT = "ppo_final.ckpt"
BEST_CKPT = "ppo_best.ckpt"


# ---------------------------------------------------------------------------------------------- outputs


def _reward_checkpoints(
    reward: RewardSettings, experiment_dir: str | Path
) -> dict[str, str | list[str] | None]:
    """Each scale's reward checkpoint, or its list of ensemble members (``stage=reward ensemble_size > 1``).

    ``stage.reward.r3d_ckpt`` / ``r2d_ckpt`` (a path or a list of paths) replace the reward manifest's entries.
    """
    ckpts: dict[str, Any] = {"r3d": reward.r3d_ckpt, "r2d": reward.r2d_ckpt}
    ckpts = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in ckpts.items()}
    weights = {"r3d": float(reward.w3d), "r2d": float(reward.w2d)}
    if any(weights[k] and not ckpts[k] for k in ckpts):
        outputs = read_manifest(
            experiment_dir,
            "reward",
            "run `mrrl stage=reward` first or pass stage.reward.r3d_ckpt=<path> stage.reward.r2d_ckpt=<path>",
        )["outputs"]
        for key in ckpts:
            if weights[key] and not ckpts[key]:
                entry = outputs.get(key) or {}
                ckpts[key] = (
                    outputs.get(f"{key}_ckpts")
                    or outputs.get(f"{key}_ckpt")
                    or entry.get("best_ckpt")
                    or entry.get("ckpt")
                )
    for key, weight in weights.items():
        if weight == 0:
            ckpts[key] = None
            continue
        paths = ckpts[key] if isinstance(ckpts[key], list) else [ckpts[key]]
        for path in paths:
            if not path or not Path(path).is_file():
                raise ManifestError(f"reward model {key} checkpoint {path} does not exist")
    return ckpts


def _diffusion_checkpoint(cfg: DictConfig) -> str:
    # A Lightning checkpoint (not ema.pt): the fine-tuned policy is saved in its format.
    return resolve_checkpoint(
        cfg.stage.diffusion_ckpt,
        cfg.paths.experiment_dir,
        "diffusion",
        "stage.diffusion_ckpt",
        ("best_ckpt", "last_ckpt"),
    )


def _experiment_vqgan(cfg: DictConfig) -> str | None:
    """The experiment's VQGAN (its manifest), for a diffusion checkpoint whose recorded VQGAN is gone."""
    try:
        return resolve_checkpoint(None, cfg.paths.experiment_dir, "vqgan", "stage.vqgan_ckpt")
    except ManifestError:
        return None


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    if already_finished(cfg, run_dir):
        return None
    settings = ppo_settings(cfg.stage)  # bad values fail before anything is loaded
    speed = SpeedOptions.from_config(cfg.stage.speed)
    datamodule = build_datamodule(cfg).prepare()
    diffusion_ckpt = _diffusion_checkpoint(cfg)
    module = PPOModule(
        diffusion_ckpt,
        cfg.stage.vqgan_ckpt or None,
        datamodule.class_names,
        settings,
        _reward_checkpoints(settings.reward, cfg.paths.experiment_dir),
        speed,
        fallback_vqgan=_experiment_vqgan(cfg),
    )
    vqgan_ckpt = module.hparams.vqgan_ckpt
    force = bool(cfg.stage.force)
    if force:
        (run_dir / BEST_CKPT).unlink(missing_ok=True)  # a fresh run must not inherit another run's best
    if settings.probe.enabled:
        module.fid_probe = ValidationProbe(settings, datamodule, cfg.paths.experiment_dir)
        module.best_path = run_dir / BEST_CKPT
    trainer, _ = build_trainer(cfg, run_dir)
    fit(trainer, module, None, run_dir, fresh=force)
    if not trainer.is_global_zero:
        return None
    final = save_policy_as_diffusion_checkpoint(module, diffusion_ckpt, run_dir / FINAL_CKPT)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    best = run_dir / BEST_CKPT
    outputs = {
        **checkpoint_outputs(run_dir, None),
        "final_ckpt": str(final.resolve()),
        # Best on the validation probe (stage.probe.select), chosen on validation only; absent without a probe.
        "best_ckpt": str(best.resolve()) if module.fid_probe is not None and best.is_file() else None,
        "probe": {
            **module.best.state_dict(),
            "best_score": module.best.best_score
            if math.isfinite(module.best.best_score)
            else None,  # strict JSON
            "split": str(settings.probe.split),
            "extractor": module.fid_probe.extractor.identity if module.fid_probe is not None else None,
        },
        "kl_coef_final": module.kl.coef,
        "sampling": rollout_sampling(settings.sample),
        "base_diffusion_ckpt": diffusion_ckpt,
        "vqgan_ckpt": str(vqgan_ckpt),
        "iterations": int(module.iterations),
        "skipped_updates": int(module.skipped_updates),
        "final_metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
        "metrics_csv": str((run_dir / "logs" / "metrics.csv").resolve()),
    }
    write_manifest(run_dir, "ppo", outputs, cfg)
    probe = {"best_iteration": module.best.best_iteration, "best_score": outputs["probe"]["best_score"]}
    finish_wandb(trainer.loggers, {"final": {"iterations": int(module.iterations), "probe": probe}})
    return outputs

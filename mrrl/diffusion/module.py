"""The latent diffusion LightningModule (paper §3.2): the denoiser, its EMA copy, the learning-rate schedule and periodic samples."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mrrl.diffusion.generate import (
    denoiser_from_hparams,
    generate_volumes,
)
from mrrl.diffusion.latent_data import LatentDataModule
from mrrl.diffusion.sampling import randn, scale_factor_from_moments
from mrrl.diffusion.unet import DenoiserModel
from mrrl.errors import ConfigError, ManifestError
from mrrl.settings import given_or_rebuilt
from mrrl.tracking.wandb_run import step_axes
from mrrl.training.speed import (
    SpeedOptions,
    enable_activation_checkpointing,
    maybe_compile,
    to_channels_last_3d,
)
from mrrl.utils.viz import log_figure, slices_figure
from mrrl.vqgan.loading import load_vqgan


def lr_lambda(warmup_steps: int, total_steps: int | None, kind: str, min_ratio: float):
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to ``min_ratio`` at ``total_steps``."""
    if kind not in ("constant", "cosine"):
        raise ConfigError(f"stage.optim.scheduler must be 'constant' or 'cosine', got {kind!r}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant" or not total_steps or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ---------------------------------------------------------------------------------------------- settings
# Frozen dataclasses mirroring conf/stage/diffusion.yaml (its groups and the flat generation and validation
# keys); the YAML holds every default. A checkpoint stores them as plain dicts in its ``hyper_parameters``,
# where ``unet``, ``schedule``, ``cfg_dropout`` and ``sampling`` are also what ``load_diffusion`` reads.


@dataclass(frozen=True)
class UNetSettings:
    """``stage.unet``: MONAI's 3D ``DiffusionModelUNet`` (``mrrl.diffusion.unet.build_unet`` arguments)."""

    channels: list[int]
    attention_levels: list[bool]
    num_res_blocks: int
    num_head_channels: int
    norm_num_groups: int
    use_flash_attention: bool


@dataclass(frozen=True)
class ScheduleSettings:
    """``stage.schedule``: the noise schedule (``mrrl.diffusion.generate.schedule_from_config``)."""

    num_train_timesteps: int
    schedule: str
    prediction_type: str
    steps_offset: int
    set_alpha_to_one: bool
    args: dict[str, Any]


@dataclass(frozen=True)
class EMASettings:
    """``stage.ema``: the EMA copy of the weights (see ``DiffusionModule.ema_decay``)."""

    decay: float
    start_step: int
    warmup: bool


@dataclass(frozen=True)
class OptimSettings:
    """``stage.optim``: AdamW with linear warm-up, then constant or cosine learning rate."""

    lr: float
    betas: list[float]
    weight_decay: float
    eps: float
    warmup_steps: int
    scheduler: str
    min_lr_ratio: float


@dataclass(frozen=True)
class DiffusionSettings:
    """What conf/stage/diffusion.yaml says about the model: ``from_config(DiffusionSettings, cfg.stage, "stage")``."""

    unet: UNetSettings
    schedule: ScheduleSettings
    ema: EMASettings
    optim: OptimSettings
    cfg_dropout: float  # classifier-free guidance: label dropout in training
    guidance_scale: float
    # generation defaults, recorded in the checkpoint (``sampling``) and the manifest for later stages
    sampler: str
    inference_steps: int
    eta: float
    sample_batch_size: int
    decode_quantize: bool
    # validation
    val_timesteps: list[int]
    val_sampling_steps: int
    val_samples_per_class: int
    sample_every_n_epochs: int

    @property
    def sampling(self) -> dict[str, Any]:
        """The generation defaults in the checkpoint's ``sampling`` format (what evaluate/export/classify read)."""
        return {
            "sampler": self.sampler,
            "num_steps": self.inference_steps,
            "eta": self.eta,
            "guidance_scale": self.guidance_scale,
            "batch_size": self.sample_batch_size,
            "decode_quantize": self.decode_quantize,
        }


class DiffusionModule(L.LightningModule):
    """The class-conditional latent denoiser, its EMA copy and the latent scale factor."""

    def __init__(
        self,
        latent_shape: Sequence[int],
        class_names: Sequence[str],
        settings: DiffusionSettings | None = None,
        *,
        vqgan_ckpt: str | None,
        seed: int,
        speed: SpeedOptions | Mapping[str, Any] | None = None,
        **hyper_parameters: Any,
    ):
        """``settings`` from the stage; ``load_from_checkpoint`` passes its fields instead, as the plain dicts of
        the checkpoint's (flat) hyper-parameters. ``vqgan_ckpt``: the VQGAN whose latents these are (sample
        figures; later stages decode with it). ``speed``: ``stage.speed`` (None: every option off)."""
        super().__init__()
        self.settings = settings = given_or_rebuilt(DiffusionSettings, settings, hyper_parameters)
        self.speed = SpeedOptions.from_config(speed)
        self.save_hyperparameters(
            {
                "latent_shape": [int(s) for s in latent_shape],
                "class_names": list(class_names),
                **dataclasses.asdict(settings),
                "sampling": settings.sampling,
                "vqgan_ckpt": vqgan_ckpt,
                "seed": int(seed),
                "speed": self.speed.to_dict(),
            }
        )
        self.denoiser: DenoiserModel = denoiser_from_hparams(self.hparams)
        self.ema = DenoiserModel(
            copy.deepcopy(self.denoiser.unet), self.denoiser.schedule, self.denoiser.null_label
        )
        self.ema.requires_grad_(False)
        # 1 / std of the (unscaled) training latents; 0 until fit start sets it (or a checkpoint restores it).
        self.register_buffer("scale_factor", torch.zeros((), dtype=torch.float32))
        self._noise_generator: torch.Generator | None = None
        self._frozen: dict[str, Any] = {}  # the VQGAN for sample figures: kept out of state_dict and DDP
        if self.speed.channels_last:  # both copies: the EMA update lerps parameters of equal layouts
            to_channels_last_3d(self.denoiser.unet)
            to_channels_last_3d(self.ema.unet)
        if self.speed.gradient_checkpointing:  # the EMA copy never runs with gradients
            enable_activation_checkpointing(self.denoiser.unet)
        self._compile()

    def _compile(self) -> None:
        """``stage.speed.compile``: the trained UNet, in place (state_dict keys unchanged). Called again in
        ``setup``, since a spawned DDP process receives an uncompiled copy."""
        maybe_compile(self.denoiser.unet, self.speed.compile)

    def setup(self, stage: str) -> None:
        self._compile()

    @property
    def schedule(self):
        return self.denoiser.schedule

    def set_scale_factor(self, value: float) -> None:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"the latent scale factor must be a positive number, got {value}")
        self.scale_factor.fill_(value)

    # ------------------------------------------------------------------------------------------ loss
    def diffusion_loss(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        label_dropout: float = 0.0,
    ) -> torch.Tensor:
        """MSE between the raw denoiser's output and the schedule's training target.

        ``latents`` come straight from the cache (unscaled); the scale factor is applied here. Noise and
        timesteps (uniform over the T training steps) are drawn from ``generator`` unless given.
        """
        x0 = latents.to(self.device, torch.float32) * self.scale_factor
        batch = x0.shape[0]
        if timesteps is None:
            gen_device = generator.device if generator is not None else x0.device
            timesteps = torch.randint(
                0, self.schedule.num_train_timesteps, (batch,), generator=generator, device=gen_device
            )
        timesteps = timesteps.to(x0.device).long()
        noise = randn(tuple(x0.shape), generator, x0.device, x0.dtype) if noise is None else noise.to(x0)
        labels = self.denoiser.drop_labels(labels.to(x0.device).long(), label_dropout, generator)
        x_t = self.schedule.add_noise(x0, noise, timesteps)
        target = self.schedule.training_target(x0, noise, timesteps)
        return F.mse_loss(self.denoiser(x_t, timesteps, labels).float(), target.float())

    # ------------------------------------------------------------------------------------------ fit
    def on_fit_start(self) -> None:
        """Scale factor = 1 / std of the training latents, from ``latent_moments`` of each rank's shard summed
        over the DDP ranks (all-reduce), so every rank gets the same, full-training-set value. A checkpoint's
        value (resume) is kept; a mismatch with the data is reported."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, LatentDataModule):
            raise RuntimeError(
                "DiffusionModule trains with a LatentDataModule (it computes the latent scale)"
            )
        moments = datamodule.train_moments(self.global_rank, self.trainer.world_size).to(self.device)
        moments = self.trainer.strategy.reduce(moments, reduce_op="sum")
        scale = scale_factor_from_moments(moments.cpu())
        restored = float(self.scale_factor)
        if restored > 0 and not math.isclose(restored, scale, rel_tol=1e-4):
            rank_zero_warn(
                f"the training latents' scale factor is {scale:.6g} but the checkpoint was trained "
                f"with {restored:.6g}; keeping the checkpoint's (did the VQGAN or the data change?)"
            )
        elif restored <= 0:
            self.set_scale_factor(scale)
        rank_zero_info(
            f"diffusion: latent scale factor {float(self.scale_factor):.6g} (1 / std of the training latents)"
        )

    def _step_generator(self) -> torch.Generator:
        """Noise, timesteps and label dropout of this step: different on every rank (seed_everything gives
        all ranks one seed) and a function of (seed, rank, step) only, so a resumed run draws what an
        uninterrupted one would (``mrrl/resume.py``)."""
        seed = (int(self.hparams.seed) * 1_000_003 + self.global_step) * 65_537 + self.global_rank
        if self._noise_generator is None or self._noise_generator.device != self.device:
            self._noise_generator = torch.Generator(device=self.device)
        return self._noise_generator.manual_seed(seed)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(
            batch["latent"],
            batch["label"],
            generator=self._step_generator(),
            label_dropout=self.settings.cfg_dropout,
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["latent"].shape[0])
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimiser step, then the EMA update: here rather than in ``on_train_batch_end``, which runs
        after the callbacks' hook, i.e. after a step-triggered ``last.ckpt`` was already written."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_ema(self.global_step + 1)  # global_step counts this step only once the hook returns

    # ------------------------------------------------------------------------------------------ EMA
    def ema_decay(self, step: int) -> float:
        """Decay after optimiser step ``step``: 0 (a copy) up to ``start_step``, then ``decay``, warmed up as
        ``min(decay, (1 + n) / (10 + n))`` over the n steps since the start (as diffusers' ``EMAModel``)."""
        ema = self.settings.ema
        start = ema.start_step
        if step <= start:
            return 0.0
        decay = ema.decay
        if ema.warmup:
            n = step - start
            decay = min(decay, (1 + n) / (10 + n))
        return decay

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        weight = 1.0 - self.ema_decay(step)
        ema, raw = list(self.ema.unet.parameters()), list(self.denoiser.unet.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in raw], weight)
        for ema_buf, raw_buf in zip(self.ema.unet.buffers(), self.denoiser.unet.buffers()):
            ema_buf.copy_(raw_buf)

    # ------------------------------------------------------------------------------------------ optim
    def configure_optimizers(self):
        cfg = self.settings.optim
        optimizer = torch.optim.AdamW(
            self.denoiser.parameters(),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
            eps=cfg.eps,
        )
        kind = cfg.scheduler
        total = int(self.trainer.estimated_stepping_batches) if kind == "cosine" else None
        factor = lr_lambda(cfg.warmup_steps, total, kind, cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """MSE of the EMA (``val/loss``) and raw (``val/loss_raw``) weights at the fixed timesteps, one batch of
        B x K forward passes; per-timestep EMA losses as ``val/loss_t<t>``."""
        timesteps = [int(t) for t in self.settings.val_timesteps]
        noise = batch["noise"].to(self.device, torch.float32)
        batch_size, k = noise.shape[:2]
        if k != len(timesteps):
            raise RuntimeError(f"validation noise has {k} timesteps, the module expects {len(timesteps)}")
        x0 = (batch["latent"].to(self.device, torch.float32) * self.scale_factor).repeat(k, 1, 1, 1, 1)
        noise = noise.transpose(0, 1).reshape(x0.shape)  # timestep-major, like x0 and t
        t = torch.tensor(timesteps, device=self.device).repeat_interleave(batch_size)
        labels = batch["label"].to(self.device).long().repeat(k)
        x_t = self.schedule.add_noise(x0, noise, t)
        target = self.schedule.training_target(x0, noise, t).float()
        for suffix, model in (("", self.ema), ("_raw", self.denoiser)):
            errors = ((model(x_t, t, labels).float() - target) ** 2).flatten(1).mean(1).view(k, batch_size)
            self.log(
                f"val/loss{suffix}", errors.mean(), sync_dist=True, batch_size=batch_size, prog_bar=not suffix
            )
            if not suffix:
                for i, step in enumerate(timesteps):
                    self.log(f"val/loss_t{step}", errors[i].mean(), sync_dist=True, batch_size=batch_size)

    def on_validation_epoch_end(self) -> None:
        every = self.settings.sample_every_n_epochs
        if every <= 0 or self.trainer.sanity_checking or (self.current_epoch + 1) % every:
            return
        if self.trainer.is_global_zero:  # rank 0 only: no collective calls below
            self.log_samples()

    def _vqgan(self):
        if "vqgan" not in self._frozen:
            path = self.hparams.vqgan_ckpt
            try:
                self._frozen["vqgan"] = load_vqgan(path, self.device) if path else None
            except (ManifestError, OSError) as exc:
                rank_zero_warn(f"cannot load the VQGAN {path} for sample figures ({exc}); skipping them")
                self._frozen["vqgan"] = None
        return self._frozen["vqgan"]

    @torch.no_grad()
    def log_samples(self) -> Path | None:
        """DDIM samples of the EMA model, ``val_samples_per_class`` per class, decoded, as a mid-slice figure.

        The initial noise is seeded identically every time, so successive figures show the same samples
        improving.
        """
        vqgan = self._vqgan()
        if vqgan is None:
            return None
        hp, settings = self.hparams, self.settings
        per_class, names = settings.val_samples_per_class, list(hp.class_names)
        labels = torch.arange(len(names)).repeat_interleave(per_class)
        volumes = generate_volumes(
            self.ema,
            vqgan,
            float(self.scale_factor),
            labels,
            hp.latent_shape,
            num_steps=settings.val_sampling_steps,
            sampler="ddim",
            eta=0.0,
            batch_size=settings.sample_batch_size,
            generator=torch.Generator().manual_seed(int(hp.seed)),
            guidance_scale=settings.guidance_scale,
            quantize=settings.decode_quantize,
        )
        rows = {name: [volumes[c * per_class + i] for i in range(per_class)] for c, name in enumerate(names)}
        figure = slices_figure(rows, title=f"diffusion EMA samples, step {self.global_step}")
        return log_figure(
            figure,
            "val/samples",
            self.global_step,
            self.trainer.default_root_dir,
            self.loggers,
            axes=step_axes(self.trainer),
        )

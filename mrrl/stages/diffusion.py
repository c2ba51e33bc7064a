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

import copy
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mrrl.checkpoints import safe_load
from mrrl.diffusion import SAMPLERS, DenoiserModel, latent_moments, randn, scale_factor_from_moments
from mrrl.diffusion.generate import (
    denoiser_from_hparams,
    export_ema,
    generate_volumes,
    schedule_from_config,
)
from mrrl.errors import ConfigError, ManifestError
from mrrl.latents import LATENT_FILE, ensure_latents, load_latents, load_vqgan
from mrrl.manifest import read_manifest, write_manifest
from mrrl.nets.speed import SpeedOptions, enable_activation_checkpointing, maybe_compile, to_channels_last_3d
from mrrl.runtime import build_datamodule
from mrrl.stages.common import already_finished, build_trainer, checkpoint_dir, checkpoint_outputs, fit
from mrrl.viz import log_figure, slices_figure

log = logging.getLogger(__name__)

EMA_FILE = "ema.pt"

# ---------------------------------------------------------------------------------------------- data


class LatentDataset(Dataset):
    """Cached latents as ``{latent: [C,d,h,w], label: long}``, plus fixed ``noise: [K,C,d,h,w]`` for validation."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None):
        self.latents, self.labels, self.noise = latents, labels, noise

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"latent": self.latents[index], "label": self.labels[index]}
        if self.noise is not None:
            item["noise"] = self.noise[index]
        return item


class TrainSampler(DistributedSampler):
    """Shuffled (or class-balanced, with replacement) training order, sharded over DDP ranks.

    Every rank draws the same epoch-long order from ``seed + epoch`` and keeps every ``num_replicas``-th
    index from its rank on, so the ranks see disjoint parts of one order. Subclassing
    ``DistributedSampler`` tells Lightning to leave it alone (no second sharding); it calls ``set_epoch``.
    """

    def __init__(
        self, labels: torch.Tensor, num_replicas: int = 1, rank: int = 0, seed: int = 0, balanced: bool = True
    ):
        super().__init__(labels, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.labels = labels.long()
        self.balanced = balanced

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = self.labels.numel()
        if self.balanced:
            weights = 1.0 / torch.bincount(self.labels)[self.labels].double()
            order = torch.multinomial(weights, self.total_size, replacement=True, generator=generator)
        else:
            order = torch.randperm(n, generator=generator).repeat(math.ceil(self.total_size / n))[
                : self.total_size
            ]
        return iter(order[self.rank :: self.num_replicas].tolist())


class ShardSampler(DistributedSampler):
    """Validation order: rank r gets r, r + W, ...; every sample exactly once, no padding duplicates."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]


class LatentDataModule(L.LightningDataModule):
    """The latent cache of the VQGAN stage: train split to train on, val split to validate on.

    ``batch_size`` is per process (per GPU under DDP). Each rank holds the whole (small) cache in memory
    and reads its own shard through the samplers above. Validation noise is drawn once from
    ``val_seed`` (``[N_val, K, C, d, h, w]``, K = number of validation timesteps), so ``val/loss`` is
    comparable across epochs and identical however the run is distributed.
    """

    def __init__(
        self,
        latent_path: str | Path,
        batch_size: int,
        eval_batch_size: int | None = None,
        balanced: bool = True,
        num_val_timesteps: int = 4,
        val_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        self.latent_path = Path(latent_path)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.balanced = bool(balanced)
        self.num_val_timesteps = int(num_val_timesteps)
        self.val_seed = int(val_seed)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.cache: Mapping[str, Any] | None = None
        self.datasets: dict[str, LatentDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.cache = load_latents(self.latent_path)
        splits = list(self.cache["splits"])
        for split in ("train", "val"):
            index = torch.tensor([i for i, s in enumerate(splits) if s == split], dtype=torch.long)
            if index.numel() == 0:
                raise ConfigError(
                    f"the latent cache {self.latent_path} has no '{split}' subjects"
                    + (": set data.val_fraction > 0 and rerun the vqgan stage" if split == "val" else "")
                )
            latents = self.cache["latents"][index].float().contiguous()
            labels = self.cache["labels"][index].long()
            noise = None
            if split == "val":
                generator = torch.Generator().manual_seed(self.val_seed)
                noise = torch.randn(
                    (len(index), self.num_val_timesteps, *latents.shape[1:]), generator=generator
                )
            self.datasets[split] = LatentDataset(latents, labels, noise)

    # ----------------------------------------------------------------------------------------- shapes
    @property
    def class_names(self) -> list[str]:
        assert self.cache is not None, "call setup() first"
        return list(self.cache["class_names"])

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return tuple(self.datasets["train"].latents.shape[1:])  # type: ignore[return-value]

    @property
    def train_latents(self) -> torch.Tensor:
        return self.datasets["train"].latents

    def train_moments(self, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """``latent_moments`` of this rank's shard (every ``world_size``-th training latent from ``rank``).

        The shards are disjoint and cover the training set once, so their all-reduced sum equals the
        moments of the whole training set, whatever the number of ranks.
        """
        return latent_moments(self.train_latents[rank::world_size])

    # ----------------------------------------------------------------------------------------- loaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: DistributedSampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        train = self.datasets["train"]
        sampler = TrainSampler(train.labels, world, rank, seed=self.seed, balanced=self.balanced)
        return self._loader(train, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        val = self.datasets["val"]
        return self._loader(val, self.eval_batch_size, ShardSampler(val, world, rank))


# ---------------------------------------------------------------------------------------------- module


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


class DiffusionModule(L.LightningModule):
    """The class-conditional latent denoiser, its EMA copy and the latent scale factor."""

    def __init__(
        self,
        latent_shape: Sequence[int],
        class_names: Sequence[str],
        unet: Mapping[str, Any],
        schedule: Mapping[str, Any],
        ema: Mapping[str, Any],
        optim: Mapping[str, Any],
        cfg_dropout: float = 0.0,
        guidance_scale: float = 1.0,
        val_timesteps: Sequence[int] = (100, 400, 700, 950),
        val_sampling_steps: int = 50,
        val_samples_per_class: int = 2,
        sample_every_n_epochs: int = 0,
        sampling: Mapping[str, Any] | None = None,
        vqgan_ckpt: str | None = None,
        seed: int = 0,
        speed: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.denoiser: DenoiserModel = denoiser_from_hparams(self.hparams)
        self.ema = DenoiserModel(
            copy.deepcopy(self.denoiser.unet), self.denoiser.schedule, self.denoiser.null_label
        )
        self.ema.requires_grad_(False)
        # 1 / std of the (unscaled) training latents; 0 until fit start sets it (or a checkpoint restores it).
        self.register_buffer("scale_factor", torch.zeros((), dtype=torch.float32))
        self.ema_cfg = dict(ema)
        self.optim_cfg = dict(optim)
        self._noise_generator: torch.Generator | None = None
        self._frozen: dict[str, Any] = {}  # the VQGAN for sample figures: kept out of state_dict and DDP
        self.speed = SpeedOptions.from_config(speed)
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
            label_dropout=float(self.hparams.cfg_dropout),
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
        start = int(self.ema_cfg.get("start_step", 0))
        if step <= start:
            return 0.0
        decay = float(self.ema_cfg.get("decay", 0.9999))
        if self.ema_cfg.get("warmup", True):
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
        cfg = self.optim_cfg
        optimizer = torch.optim.AdamW(
            self.denoiser.parameters(),
            lr=float(cfg.get("lr", 1e-4)),
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            weight_decay=float(cfg.get("weight_decay", 0.0)),
            eps=float(cfg.get("eps", 1e-8)),
        )
        kind = str(cfg.get("scheduler", "constant"))
        total = int(self.trainer.estimated_stepping_batches) if kind == "cosine" else None
        factor = lr_lambda(int(cfg.get("warmup_steps", 0)), total, kind, float(cfg.get("min_lr_ratio", 0.0)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """MSE of the EMA (``val/loss``) and raw (``val/loss_raw``) weights at the fixed timesteps, one batch of
        B x K forward passes; per-timestep EMA losses as ``val/loss_t<t>``."""
        timesteps = [int(t) for t in self.hparams.val_timesteps]
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
        every = int(self.hparams.sample_every_n_epochs or 0)
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
        hp = self.hparams
        per_class, names = int(hp.val_samples_per_class), list(hp.class_names)
        labels = torch.arange(len(names)).repeat_interleave(per_class)
        sampling = dict(hp.sampling or {})
        volumes = generate_volumes(
            self.ema,
            vqgan,
            float(self.scale_factor),
            labels,
            hp.latent_shape,
            num_steps=int(hp.val_sampling_steps),
            sampler="ddim",
            eta=0.0,
            batch_size=int(sampling.get("batch_size", 16)),
            generator=torch.Generator().manual_seed(int(hp.seed)),
            guidance_scale=float(hp.guidance_scale),
            quantize=bool(sampling.get("decode_quantize", True)),
        )
        rows = {name: [volumes[c * per_class + i] for i in range(per_class)] for c, name in enumerate(names)}
        figure = slices_figure(rows, title=f"diffusion EMA samples, step {self.global_step}")
        return log_figure(
            figure, "val/samples", self.global_step, self.trainer.default_root_dir, self.loggers
        )


# ---------------------------------------------------------------------------------------------- runner


def _build_latent_cache(cfg: DictConfig, vqgan_ckpt: str | Path, run_dir: Path) -> Path:
    """Encode the dataset with ``vqgan_ckpt`` into ``<run_dir>/latents.pt`` (reused while still valid)."""
    datamodule = build_datamodule(cfg).prepare()
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    batch = int(cfg.stage.get("latent_batch_size", 8))
    return ensure_latents(vqgan_ckpt, datamodule, run_dir / LATENT_FILE, batch, device)


def resolve_inputs(cfg: DictConfig, run_dir: Path) -> tuple[str, Path]:
    """(VQGAN checkpoint, latent cache): ``stage.vqgan_ckpt`` if given, else the vqgan stage's manifest."""
    override = cfg.stage.get("vqgan_ckpt")
    if override:
        ckpt = Path(str(override))
        if not ckpt.is_file():
            raise ManifestError(
                f"stage.vqgan_ckpt={override} does not exist: pass the path of a `mrrl stage=vqgan` "
                "checkpoint (e.g. <run>/vqgan/checkpoints/best.ckpt)"
            )
        ckpt = ckpt.resolve()
        return str(ckpt), _build_latent_cache(cfg, ckpt, run_dir)
    hint = (
        "run `mrrl stage=vqgan` with the same experiment first, or pass stage.vqgan_ckpt=<path to a VQGAN "
        "checkpoint>"
    )
    outputs = read_manifest(cfg.paths.experiment_dir, "vqgan", hint=hint)["outputs"]
    ckpt = outputs.get("best_ckpt") or outputs.get("last_ckpt")
    if not ckpt or not Path(ckpt).is_file():
        raise ManifestError(f"the vqgan manifest names the checkpoint {ckpt}, which does not exist: {hint}")
    latents = outputs.get("latents")
    if latents and Path(latents).is_file():
        return str(ckpt), Path(latents)
    return str(ckpt), _build_latent_cache(cfg, ckpt, run_dir)


def _stage_dict(cfg: DictConfig) -> dict[str, Any]:
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    assert isinstance(stage, dict)
    return stage


def build_latent_datamodule(cfg: DictConfig, latent_path: Path) -> LatentDataModule:
    stage = _stage_dict(cfg)
    return LatentDataModule(
        latent_path,
        batch_size=int(stage.get("batch_size") or cfg.data.batch_size),
        eval_batch_size=stage.get("eval_batch_size") or cfg.data.get("eval_batch_size"),
        balanced=bool(stage.get("balanced", True)),
        num_val_timesteps=len(stage["val_timesteps"]),
        val_seed=int(stage.get("val_seed", 0)),
        seed=int(cfg.seed),
        num_workers=int(stage.get("num_workers", 0)),
    )


def check_config(cfg: DictConfig, latent_shape: Sequence[int]) -> None:
    """Config mistakes as one clear error before any training."""
    stage = _stage_dict(cfg)
    levels = len(stage["unet"]["channels"])
    factor = 2 ** (levels - 1)
    if any(s % factor for s in latent_shape[1:]):
        raise ConfigError(
            f"latents of spatial size {list(latent_shape[1:])} cannot go through a {levels}-level UNet "
            f"(needs multiples of {factor}): shorten stage.unet.channels"
        )
    dropout, guidance = float(stage.get("cfg_dropout", 0.0)), float(stage.get("guidance_scale", 1.0))
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"stage.cfg_dropout must be in [0, 1), got {dropout}")
    if guidance != 1.0 and dropout == 0.0:
        raise ConfigError(
            "stage.guidance_scale != 1 needs a model trained with classifier-free guidance: "
            "set stage.cfg_dropout > 0 (e.g. 0.1)"
        )
    try:
        schedule = schedule_from_config(stage["schedule"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"stage.schedule: {exc}") from exc
    if stage.get("sampler", "ddim") not in SAMPLERS:
        raise ConfigError(f"stage.sampler must be one of {SAMPLERS}, got {stage.get('sampler')!r}")
    for key in ("inference_steps", "val_sampling_steps"):
        try:
            schedule.timesteps(int(stage[key]))
        except ValueError as exc:
            raise ConfigError(f"stage.{key}={stage[key]} with this stage.schedule: {exc}") from exc
    bad = [t for t in stage["val_timesteps"] if not 0 <= int(t) < schedule.num_train_timesteps]
    if bad:
        raise ConfigError(f"stage.val_timesteps {bad} are outside [0, {schedule.num_train_timesteps})")
    SpeedOptions.from_config(stage.get("speed"))


def build_module(cfg: DictConfig, datamodule: LatentDataModule, vqgan_ckpt: str | None) -> DiffusionModule:
    stage = _stage_dict(cfg)
    return DiffusionModule(
        latent_shape=datamodule.latent_shape,
        class_names=datamodule.class_names,
        unet=stage["unet"],
        schedule=stage["schedule"],
        ema=stage["ema"],
        optim=stage["optim"],
        cfg_dropout=float(stage.get("cfg_dropout", 0.0)),
        guidance_scale=float(stage.get("guidance_scale", 1.0)),
        val_timesteps=[int(t) for t in stage["val_timesteps"]],
        val_sampling_steps=int(stage["val_sampling_steps"]),
        val_samples_per_class=int(stage.get("val_samples_per_class", 2)),
        sample_every_n_epochs=int(stage.get("sample_every_n_epochs") or 0),
        sampling=sampling_config(stage),
        vqgan_ckpt=vqgan_ckpt,
        seed=int(cfg.seed),
        speed=stage.get("speed"),
    )


def sampling_config(stage: Mapping[str, Any]) -> dict[str, Any]:
    """The generation defaults later stages read (manifest and checkpoint)."""
    return {
        "sampler": str(stage.get("sampler", "ddim")),
        "num_steps": int(stage["inference_steps"]),
        "eta": float(stage.get("eta", 0.0)),
        "guidance_scale": float(stage.get("guidance_scale", 1.0)),
        "batch_size": int(stage.get("sample_batch_size", 32)),
        "decode_quantize": bool(stage.get("decode_quantize", True)),
    }


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
    fit(trainer, module, datamodule, run_dir, fresh=bool(cfg.stage.get("force", False)))
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
            "sampling": sampling_config(_stage_dict(cfg)),
            "val_loss": outputs.get("best_score"),
            "global_step": _global_step(outputs["last_ckpt"]),
        }
    )
    write_manifest(run_dir, "diffusion", outputs, cfg)
    print(
        f"diffusion: {trainer.global_step} steps, best val/loss (EMA) {outputs.get('best_score') or math.nan:.4f}, "
        f"latent scale factor {outputs['scale_factor']:.4g}, EMA weights {ema_path}"
    )
    return outputs

"""The VQGAN LightningModule (paper §3.1): the generator and its two patch discriminators, trained with manual
optimisation. The discriminator step reuses the generator pass's reconstruction (detached) instead of decoding twice."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from mrrl.settings import given_or_rebuilt
from mrrl.tracking.wandb_run import step_axes
from mrrl.training.speed import SpeedOptions, maybe_compile, to_channels_last_3d
from mrrl.utils.viz import log_figure, slices_figure
from mrrl.vqgan.discriminators import SliceDiscriminator, VolumeDiscriminator, axial_slices
from mrrl.vqgan.gan_losses import (
    adaptive_adversarial_weight,
    adversarial_factor,
    build_perceptual_loss,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
)
from mrrl.vqgan.networks import VQGAN

# ---------------------------------------------------------------------------------------------- settings
# One frozen dataclass per group of conf/stage/vqgan.yaml (``stage.net``, ``stage.discriminator``, ...); the
# YAML holds every default. A checkpoint stores them as plain dicts (its ``hyper_parameters``).


@dataclass(frozen=True)
class NetSettings:
    """``stage.net``: the generator, as ``mrrl.vqgan.networks.VQGAN`` takes it (``load_vqgan`` reads it back)."""

    channels: list[int]
    num_res_blocks: int
    num_res_channels: list[int] | None
    downsample_factor: int
    codebook_size: int
    codebook_dim: int
    ema_decay: float
    commitment_cost: float
    dead_code_threshold: float
    quantize_chunk_size: int
    gradient_checkpointing: bool


@dataclass(frozen=True)
class DiscriminatorSettings:
    """``stage.discriminator``: both patch discriminators (3D on volumes, 2D on random axial slices)."""

    channels: int
    num_layers: int
    norm: str
    slices_per_volume: int


@dataclass(frozen=True)
class PerceptualSettings:
    """``stage.loss.perceptual``: the MedicalNet network of the perceptual loss and its weights on disk."""

    network: str
    weights_path: str | None


@dataclass(frozen=True)
class LossSettings:
    """``stage.loss``: reconstruction, adversarial (with warm-up) and optional perceptual terms."""

    l1_weight: float
    gan_loss: str
    adv_start_step: int
    adv_ramp_steps: int
    adaptive_weight: bool
    adv_weight: float
    max_adv_weight: float
    weight_3d: float
    weight_2d: float
    feature_matching_weight: float
    perceptual_weight: float
    perceptual: PerceptualSettings


@dataclass(frozen=True)
class OptimSettings:
    """``stage.optim``: AdamW for the generator and for the discriminators."""

    lr_g: float
    lr_d: float
    betas: list[float]
    weight_decay: float
    grad_clip: float | None


@dataclass(frozen=True)
class VQGANSettings:
    """What conf/stage/vqgan.yaml says about the model: ``from_config(VQGANSettings, cfg.stage, "stage")``."""

    net: NetSettings
    discriminator: DiscriminatorSettings
    loss: LossSettings
    optim: OptimSettings
    num_figure_volumes: int


class VQGANModule(L.LightningModule):
    """The VQGAN and its two discriminators, trained with manual optimisation."""

    def __init__(
        self,
        image_shape: tuple[int, int, int, int],
        settings: VQGANSettings | None = None,
        speed: SpeedOptions | Mapping[str, Any] | None = None,
        **hyper_parameters: Any,
    ):
        """``settings`` from the stage; ``load_from_checkpoint`` passes its fields instead, as the plain dicts of
        the checkpoint's hyper-parameters. ``speed``: ``stage.speed`` (None: every option off)."""
        super().__init__()
        self.settings = settings = given_or_rebuilt(VQGANSettings, settings, hyper_parameters)
        self.speed = SpeedOptions.from_config(speed)
        self.save_hyperparameters(
            {"image_shape": list(image_shape), **dataclasses.asdict(settings), "speed": self.speed.to_dict()}
        )
        self.automatic_optimization = False
        channels = int(image_shape[0])
        # stage.speed.gradient_checkpointing and the older stage.net.gradient_checkpointing both switch it on.
        net = dataclasses.replace(
            settings.net,
            gradient_checkpointing=settings.net.gradient_checkpointing or self.speed.gradient_checkpointing,
        )
        self.vqgan = VQGAN(**dataclasses.asdict(net), in_channels=channels)
        disc = settings.discriminator
        self.slices_per_volume = disc.slices_per_volume
        disc_args = {"channels": disc.channels, "num_layers": disc.num_layers, "norm": disc.norm}
        self.disc3d = VolumeDiscriminator(in_channels=channels, **disc_args)
        self.disc2d = SliceDiscriminator(in_channels=channels, **disc_args)
        loss = settings.loss
        self.perceptual = build_perceptual_loss(loss.perceptual_weight, **dataclasses.asdict(loss.perceptual))
        # Generator steps taken; drives the adversarial warm-up and survives checkpoint/resume.
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.long))
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self._val_counts: torch.Tensor | None = None
        self._figure_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.speed.channels_last:  # the 2D slice discriminator keeps its layout
            to_channels_last_3d(self.vqgan)
            to_channels_last_3d(self.disc3d)
        self._compile()

    # ------------------------------------------------------------------------------------------ speed
    def _compile(self) -> None:
        """``stage.speed.compile``: the generator's encoder and decoder (checkpointed blocks included) and both
        discriminators; the EMA quantiser (DDP all-reduce, data-dependent code restarts) stays eager. In place,
        state_dict keys unchanged; again in ``setup`` (a spawned DDP process gets an uncompiled copy)."""
        options = self.speed.compile
        if options.enabled and options.backend != "eager":
            # The adaptive adversarial weight differentiates through the decoder and the discriminators with
            # retain_graph=True, which AOTAutograd's donated buffers (a backward memory saving) forbid.
            import torch._functorch.config

            torch._functorch.config.donated_buffer = False
        for part in (self.vqgan.encoder, self.vqgan.decoder, self.disc3d, self.disc2d):
            maybe_compile(part, options)

    def setup(self, stage: str) -> None:
        self._compile()

    # ------------------------------------------------------------------------------------------ optim
    def configure_optimizers(self):
        optim = self.settings.optim
        betas, wd = tuple(optim.betas), optim.weight_decay
        gen_params = [p for p in self.vqgan.parameters() if p.requires_grad]
        if self.perceptual is not None:
            self.perceptual.requires_grad_(False)
        opt_g = torch.optim.AdamW(gen_params, lr=optim.lr_g, betas=betas, weight_decay=wd)
        disc_params = list(self.disc3d.parameters()) + list(self.disc2d.parameters())
        opt_d = torch.optim.AdamW(disc_params, lr=optim.lr_d, betas=betas, weight_decay=wd)
        return [opt_g, opt_d]

    def _slice_indices(self, x: torch.Tensor) -> torch.Tensor:
        k = min(self.slices_per_volume, x.shape[-1])
        return torch.stack([torch.randperm(x.shape[-1], device=x.device)[:k] for _ in range(x.shape[0])])

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        opt_g, opt_d = self.optimizers()
        cfg = self.settings.loss
        factor = adversarial_factor(int(self.generator_steps), cfg.adv_start_step, cfg.adv_ramp_steps)
        w3d, w2d = cfg.weight_3d, cfg.weight_2d
        kind = cfg.gan_loss

        out = self.vqgan(x)
        recon = out.reconstruction
        rec_loss = cfg.l1_weight * F.l1_loss(recon, x)
        if self.perceptual is not None:
            rec_loss = rec_loss + cfg.perceptual_weight * self.perceptual(recon.float(), x.float())
        gen_loss = rec_loss + out.vq_loss
        logs = {
            "train/l1": F.l1_loss(recon.detach(), x),
            "train/rec_loss": rec_loss.detach(),
            "train/vq_loss": out.vq_loss.detach(),
            "train/perplexity": out.stats["perplexity"],
            "train/code_usage": out.stats["usage"],
            "train/adv_factor": factor,
        }
        idx = None
        if factor > 0:
            idx = self._slice_indices(x)
            fake3, fake2 = self.disc3d(recon), self.disc2d(axial_slices(recon, idx))
            g_adv = w3d * generator_loss(fake3.logits, kind) + w2d * generator_loss(fake2.logits, kind)
            adv_weight = cfg.adv_weight
            if cfg.adaptive_weight:
                last_layer = self.vqgan.last_layer_weight
                max_weight = cfg.max_adv_weight
                weight = adv_weight * adaptive_adversarial_weight(rec_loss, g_adv, last_layer, max_weight)
            else:
                weight = torch.tensor(adv_weight, device=x.device)
            gen_loss = gen_loss + factor * weight * g_adv
            logs.update({"train/g_adv": g_adv.detach(), "train/adv_weight": weight})
            fm_weight = cfg.feature_matching_weight
            if fm_weight > 0:
                real3, real2 = self.disc3d(x), self.disc2d(axial_slices(x, idx))
                fm = feature_matching_loss([real3.features, real2.features], [fake3.features, fake2.features])
                gen_loss = gen_loss + factor * fm_weight * fm
                logs["train/feature_matching"] = fm.detach()
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(gen_loss)
        self._clip(opt_g)
        opt_g.step()

        if factor > 0 and idx is not None:
            fake = recon.detach()
            real3, fake3 = self.disc3d(x), self.disc3d(fake)
            real2, fake2 = self.disc2d(axial_slices(x, idx)), self.disc2d(axial_slices(fake, idx))
            d_loss = factor * (
                w3d * discriminator_loss(real3.logits, fake3.logits, kind)
                + w2d * discriminator_loss(real2.logits, fake2.logits, kind)
            )
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_d)
            opt_d.step()
            logs["train/d_loss"] = d_loss.detach()
        self.generator_steps += 1
        logs["train/loss"] = gen_loss.detach()
        self.log_dict(logs, prog_bar=False, batch_size=x.shape[0])
        self.log("train/l1_step", logs["train/l1"], prog_bar=True, logger=False, batch_size=x.shape[0])

    def _clip(self, optimizer) -> None:
        clip = self.settings.optim.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # ------------------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_counts = torch.zeros(
            self.vqgan.config.codebook_size, device=self.device, dtype=torch.float64
        )
        self._figure_batch = None

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        out = self.vqgan(x)  # eval mode: no codebook update
        recon = out.reconstruction.float().clamp(-1, 1)
        self.log("val/l1", F.l1_loss(recon, x), sync_dist=True, batch_size=x.shape[0], prog_bar=True)
        self.val_psnr.update(recon, x)
        self.val_ssim.update(recon, x)
        self.log("val/psnr", self.val_psnr, batch_size=x.shape[0])
        self.log("val/ssim", self.val_ssim, batch_size=x.shape[0])
        self._val_counts += torch.bincount(out.indices.flatten(), minlength=self._val_counts.numel()).double()
        if self._figure_batch is None:
            n = self.settings.num_figure_volumes
            self._figure_batch = (x[:n].detach().cpu(), recon[:n].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        counts = self._val_counts
        if counts is None:
            return
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        probs = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
        self.log("val/codebook_usage", (counts > 0).float().mean(), rank_zero_only=True)
        self.log("val/perplexity", perplexity.float(), rank_zero_only=True)
        if (
            self.trainer.is_global_zero
            and self._figure_batch is not None
            and not self.trainer.sanity_checking
        ):
            real, recon = self._figure_batch
            rows = {}
            for i in range(real.shape[0]):
                rows[f"input {i}"], rows[f"recon {i}"] = real[i], recon[i]
            figure = slices_figure(rows, title=f"VQGAN step {int(self.generator_steps)}")
            log_figure(
                figure,
                "val/reconstruction",
                int(self.generator_steps),
                self.trainer.default_root_dir,
                self.loggers,
                axes=step_axes(self.trainer),
            )

"""The class-conditional 3D denoiser: MONAI's ``DiffusionModelUNet`` behind a small wrapper.

``DenoiserModel`` is what the samplers, the diffusion LightningModule and PPO call. It hides
MONAI's call signature (``class_labels=``), carries the noise schedule (and so the prediction type),
knows the classifier-free-guidance null label, and runs the network in its own dtype while the
sampler keeps the latent chain in float32 or wider.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from mrrl.diffusion.schedules import DiffusionSchedule


def build_unet(
    latent_channels: int,
    num_classes: int,
    channels: Sequence[int] = (64, 128, 256),
    attention_levels: Sequence[bool] = (False, True, True),
    num_res_blocks: int | Sequence[int] = 2,
    num_head_channels: int | Sequence[int] = 32,
    norm_num_groups: int = 32,
    classifier_free_guidance: bool = False,
    use_flash_attention: bool = True,
    **kwargs: Any,
) -> DiffusionModelUNet:
    """MONAI 3D ``DiffusionModelUNet`` conditioned on a class index.

    With ``classifier_free_guidance`` the class embedding gets one extra row, the null class, at
    index ``num_classes``. ``use_flash_attention`` selects PyTorch's fused attention (same weights and
    maths as MONAI's default path, less memory). Extra keyword arguments go to MONAI unchanged.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=latent_channels,
        out_channels=latent_channels,
        channels=tuple(channels),
        attention_levels=tuple(attention_levels),
        num_res_blocks=num_res_blocks,
        num_head_channels=num_head_channels,
        norm_num_groups=norm_num_groups,
        num_class_embeds=num_classes + int(classifier_free_guidance),
        use_flash_attention=use_flash_attention,
        **kwargs,
    )


class DenoiserModel(nn.Module):
    """``forward(x_t, timesteps, labels) -> model output`` around a MONAI-style class-conditional UNet.

    Args:
        unet: a module called as ``unet(x, timesteps=..., class_labels=...)``.
        schedule: the noise schedule the network is trained with; its ``prediction_type`` says what the
            output means. A plain attribute (not a buffer): ``.to(dtype)`` must never round it.
        null_label: class index used as "no class" for classifier-free guidance, or None without CFG.
    """

    def __init__(self, unet: nn.Module, schedule: DiffusionSchedule, null_label: int | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.null_label = null_label

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def supports_guidance(self) -> bool:
        return self.null_label is not None

    def _param(self) -> torch.Tensor:
        return next(self.unet.parameters())

    @property
    def device(self) -> torch.device:
        return self._param().device

    @property
    def latent_dtype(self) -> torch.dtype:
        """dtype of the sampler's latent chain: the network's dtype, but never below float32."""
        return torch.promote_types(self._param().dtype, torch.float32)

    def forward(self, x_t: torch.Tensor, timesteps: int | torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Conditional model output, returned in ``x_t``'s dtype; ``timesteps`` is a scalar or ``[B]``."""
        batch = x_t.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x_t.device).long().expand(batch)
        labels = labels.to(x_t.device).long()
        out = self.unet(x_t.to(self._param().dtype), timesteps=timesteps, class_labels=labels)
        return out.to(x_t.dtype)

    def predict(
        self,
        x_t: torch.Tensor,
        timesteps: int | torch.Tensor,
        labels: torch.Tensor,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Model output with classifier-free guidance: ``uncond + s * (cond - uncond)``.

        ``guidance_scale == 1`` is a plain conditional forward; otherwise conditional and unconditional
        halves run as one batch of 2B.
        """
        if guidance_scale == 1.0:
            return self(x_t, timesteps, labels)
        if self.null_label is None:
            raise ValueError("guidance_scale != 1 needs a model built with classifier_free_guidance=True")
        batch = x_t.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x_t.device).long().expand(batch)
        labels = labels.to(x_t.device).long()
        both = self(
            torch.cat([x_t, x_t]),
            torch.cat([timesteps, timesteps]),
            torch.cat([labels, torch.full_like(labels, self.null_label)]),
        )
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def drop_labels(
        self, labels: torch.Tensor, p: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training-time label dropout for CFG: each label becomes the null label with probability p."""
        if p <= 0.0:
            return labels
        if self.null_label is None:
            raise ValueError("label dropout needs a model built with classifier_free_guidance=True")
        gen_device = generator.device if generator is not None else labels.device
        drop = torch.rand(labels.shape, generator=generator, device=gen_device).to(labels.device) < p
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)


def build_denoiser(
    latent_channels: int,
    num_classes: int,
    schedule: DiffusionSchedule | None = None,
    classifier_free_guidance: bool = False,
    **unet_kwargs: Any,
) -> DenoiserModel:
    """``build_unet`` + ``DenoiserModel`` with the null label at ``num_classes`` when CFG is on."""
    unet = build_unet(
        latent_channels, num_classes, classifier_free_guidance=classifier_free_guidance, **unet_kwargs
    )
    null_label = num_classes if classifier_free_guidance else None
    return DenoiserModel(unet, schedule if schedule is not None else DiffusionSchedule(), null_label)

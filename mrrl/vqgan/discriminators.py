"""Patch discriminators (MONAI ``PatchDiscriminator``) on whole volumes (3D) and on axial slices (2D).

Slice convention: volumes are ``[B, C, D, H, W]`` in RAS+ orientation (MONAI ``Orientation("RAS")``), so the
last spatial axis runs inferior -> superior and a fixed index along it is an **axial** slice ``[C, D, H]``
(D: left -> right, H: posterior -> anterior).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from monai.networks.nets import PatchDiscriminator as MonaiPatchDiscriminator
from torch import nn


class DiscriminatorOutput(NamedTuple):
    """Raw patch ``logits`` (no activation) and the intermediate ``features`` (for feature matching)."""

    logits: torch.Tensor
    features: list[torch.Tensor]


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (MONAI) that returns ``DiscriminatorOutput(logits, features)``.

    Args:
        spatial_dims: 3 for volumes, 2 for slices.
        in_channels: image channels (MRI modalities).
        channels: filters of the first layer, doubled at every further layer.
        num_layers: layers after the first convolution (MONAI ``num_layers_d``); inputs of at least
            ``2 ** (num_layers + 2)`` voxels per axis always fit (16 for 2 layers, 32 for 3).
        kernel_size: convolution kernel size (padding is ``(kernel_size - 1) // 2``).
        norm: MONAI norm name for the inner layers. ``"BATCH"`` (MONAI/taming default; use Lightning's
            ``sync_batchnorm`` under DDP) or ``"INSTANCE"``, which is independent of the (tiny) 3D batch size.
        dropout: dropout probability.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: int = 64,
        num_layers: int = 3,
        kernel_size: int = 4,
        norm: str | tuple = "BATCH",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.num_layers = num_layers
        self.kernel_size = kernel_size
        self.padding = (kernel_size - 1) // 2
        self.net = MonaiPatchDiscriminator(
            spatial_dims=spatial_dims,
            channels=channels,
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=num_layers,
            kernel_size=kernel_size,
            norm=norm,
            padding=self.padding,
            dropout=dropout,
        )

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Spatial size of the patch-logit map for an input of spatial size ``input_size``."""
        k, p = self.kernel_size, self.padding
        # initial conv and num_layers - 1 inner layers stride 2; the last inner layer and final conv stride 1
        strides = [2] * self.num_layers + [1, 1]
        sizes = []
        for n in input_size:
            for s in strides:
                n = (n + 2 * p - k) // s + 1
            sizes.append(n)
        return tuple(sizes)

    def forward(self, x: torch.Tensor) -> DiscriminatorOutput:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"{self.spatial_dims}D discriminator got a tensor of shape {tuple(x.shape)}")
        if min(self.output_size(x.shape[2:])) < 1:
            raise ValueError(
                f"input of spatial size {tuple(x.shape[2:])} is too small for a patch discriminator with "
                f"num_layers={self.num_layers}; use fewer layers or larger inputs"
            )
        outs = self.net(x)
        return DiscriminatorOutput(logits=outs[-1], features=list(outs[:-1]))


class VolumeDiscriminator(PatchDiscriminator):
    """3D patch discriminator on whole volumes ``[B, C, D, H, W]``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(spatial_dims=3, **kwargs)


class SliceDiscriminator(PatchDiscriminator):
    """2D patch discriminator on axial slices ``[N, C, D, H]`` (see :func:`random_axial_slices`)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(spatial_dims=2, **kwargs)


def axial_slices(volumes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Take axial slices ``indices`` ``[B, k]`` (along the last axis) of ``[B, C, D, H, W]`` -> ``[B*k, C, D, H]``.

    Slices of volume ``b`` come out at rows ``b*k .. b*k + k - 1``, in the order of ``indices[b]``; taking the
    same ``indices`` from real volumes and reconstructions gives paired slices (for feature matching).
    """
    if volumes.ndim != 5:
        raise ValueError(f"expected [B, C, D, H, W] volumes, got {tuple(volumes.shape)}")
    b, c, d, h, _ = volumes.shape
    k = indices.shape[1]
    gather_idx = indices.to(volumes.device).view(b, 1, 1, 1, k).expand(b, c, d, h, k)
    picked = torch.gather(volumes, 4, gather_idx)  # [B, C, D, H, k]
    return picked.permute(0, 4, 1, 2, 3).reshape(b * k, c, d, h)


def random_axial_slices(
    volumes: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    margin: float = 0.0,
    return_indices: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``k`` distinct random axial slices per volume: ``[B, C, D, H, W]`` -> ``[B*k, C, D, H]``.

    Args:
        volumes: RAS-oriented volumes; the last axis is inferior -> superior.
        k: slices per volume (distinct within a volume, independent across volumes).
        generator: torch generator for reproducible choices (its device is used to draw, then moved).
        margin: fraction of slices excluded at each end of the axis (e.g. 0.15 skips empty skull-cap slices).
        return_indices: also return the ``[B, k]`` slice indices (to take the same slices from another batch
            with :func:`axial_slices`).
    """
    b, n = volumes.shape[0], volumes.shape[-1]
    lo = int(round(margin * n))
    hi = n - lo
    if not 0 < k <= hi - lo:
        raise ValueError(f"cannot take {k} distinct slices from {hi - lo} allowed axial positions (of {n})")
    device = generator.device if generator is not None else volumes.device
    order = torch.rand(b, hi - lo, generator=generator, device=device).argsort(dim=1)
    indices = (order[:, :k] + lo).to(volumes.device)
    slices = axial_slices(volumes, indices)
    return (slices, indices) if return_indices else slices

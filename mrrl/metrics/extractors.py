"""Feature extractors for FID-style metrics on 3D volumes, chosen by name.

An extractor maps volumes ``[B, C, D, H, W]`` (intensities in [-1, 1]) to feature rows ``[N, F]``:
one row per volume for 3D networks, one row per slice taken for 2D networks (so a 2D FID is a
FID over slices). Rows are volume-major: the rows of volume 0 come first.

FID values are only comparable when computed with the same extractor ``identity`` (name, options,
seed and a fingerprint of the actual weights); the randomly initialised extractors give a different
feature space for every seed, so never compare numbers across seeds or extractors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks import nets
from torch import Tensor, nn

RESNET_ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50")
EXTRACTORS: dict[str, type[VolumeFeatureExtractor]] = {}


def register_extractor(name: str) -> Callable[[type[VolumeFeatureExtractor]], type[VolumeFeatureExtractor]]:
    def deco(cls: type[VolumeFeatureExtractor]) -> type[VolumeFeatureExtractor]:
        cls.name = name
        EXTRACTORS[name] = cls
        return cls

    return deco


def build_extractor(name: str, **options: Any) -> VolumeFeatureExtractor:
    """Build a registered extractor: ``random3d``, ``random2d``, ``medicalnet`` or ``inception2d``."""
    from mrrl.metrics import pretrained  # noqa: F401  (registers the pretrained extractors)

    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](**options)


def weights_fingerprint(module: nn.Module) -> str:
    """Short hash of every parameter and buffer, so an identity changes whenever the weights do."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def seeded_resnet(arch: str, seed: int, **kwargs: Any) -> nn.Module:
    """MONAI ResNet initialised from ``seed`` alone; the caller's global RNG state is left untouched."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {RESNET_ARCHS}")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))  # CPU only: leaves CUDA generators alone
        return getattr(nets, arch)(feed_forward=False, **kwargs)


class VolumeFeatureExtractor(nn.Module):
    """Base class: frozen, always in eval mode, runs in float32 with autocast off.

    Subclasses set ``feature_dim``, keep their network in submodules and implement ``extract``.
    """

    name: str = "base"
    min_size = 16

    def __init__(self, in_channels: int, options: dict[str, Any]) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.options = {"in_channels": self.in_channels, **options}
        self.feature_dim = 0
        self._fingerprint = ""

    def _finalize(self) -> None:
        self.requires_grad_(False)
        self.eval()
        self._fingerprint = weights_fingerprint(self)

    @property
    def identity(self) -> str:
        """Stable string of name + options (seed included) + weights hash; use it in cache keys."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.name}({opts})#{self._fingerprint}"

    def rows_per_volume(self) -> int:
        return 1

    def train(self, mode: bool = True) -> VolumeFeatureExtractor:
        return super().train(False)

    def extract(self, volumes: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, volumes: Tensor) -> Tensor:
        if volumes.ndim != 5 or volumes.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.name}: expected volumes [B, {self.in_channels}, D, H, W], got {tuple(volumes.shape)} "
                "(set in_channels in the extractor options to the number of modalities)"
            )
        if min(volumes.shape[2:]) < self.min_size:
            raise ValueError(
                f"{self.name}: volumes must be at least {self.min_size}³, got {tuple(volumes.shape[2:])}"
            )
        if not torch.isfinite(volumes).all():
            raise ValueError(f"{self.name}: volumes contain NaN or Inf")
        with torch.no_grad(), torch.autocast(device_type=volumes.device.type, enabled=False):
            features = self.extract(volumes.float())
        return features.float().reshape(features.shape[0], -1)

    def extra_repr(self) -> str:
        return self.identity


def central_indices(size: int, n: int, fraction: float) -> list[int]:
    """``n`` evenly spaced indices spanning the central ``fraction`` of an axis of length ``size``."""
    centre = (size - 1) / 2
    half = fraction * size / 2 if n > 1 else 0.0
    idx = np.floor(np.linspace(centre - half, centre + half, n) + 0.5).astype(int)
    return np.clip(idx, 0, size - 1).tolist()


class SliceExtractor(VolumeFeatureExtractor):
    """Shared slicing for 2D extractors: ``n_slices`` central slices along each of ``axes``.

    ``axes`` index the spatial dims (0, 1, 2) = (D, H, W); which of them is axial depends on how the
    data were oriented (with MONAI's RAS loading, axis 2 is axial). Rows are ordered
    (volume, axis, slice).
    """

    def __init__(
        self, in_channels: int, axes: Sequence[int], n_slices: int, central_fraction: float, options: dict
    ) -> None:
        axes = tuple(int(a) for a in axes)
        if not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"axes must be distinct values from (0, 1, 2), got {axes}")
        if n_slices < 1 or not 0.0 <= central_fraction <= 1.0:
            raise ValueError("need n_slices >= 1 and 0 <= central_fraction <= 1")
        options = {"axes": list(axes), "n_slices": n_slices, "central_fraction": central_fraction, **options}
        super().__init__(in_channels, options)
        self.axes, self.n_slices, self.central_fraction = axes, int(n_slices), float(central_fraction)

    def rows_per_volume(self) -> int:
        return len(self.axes) * self.n_slices

    def slices(self, volumes: Tensor) -> list[Tensor]:
        """Per axis, a ``[B * n_slices, C, h, w]`` stack (volume-major)."""
        out = []
        for axis in self.axes:
            dim = 2 + axis
            idx = torch.tensor(central_indices(volumes.shape[dim], self.n_slices, self.central_fraction))
            s = volumes.index_select(dim, idx.to(volumes.device)).movedim(dim, 1)  # [B, S, C, h, w]
            out.append(s.reshape(-1, *s.shape[2:]))
        return out

    def embed_slices(self, slices: Tensor) -> Tensor:
        raise NotImplementedError

    def extract(self, volumes: Tensor) -> Tensor:
        b = volumes.shape[0]
        per_axis = [self.embed_slices(s).reshape(b, self.n_slices, -1) for s in self.slices(volumes)]
        return torch.cat(per_axis, dim=1).reshape(b * self.rows_per_volume(), -1)


def resize_slices(slices: Tensor, size: int) -> Tensor:
    if tuple(slices.shape[-2:]) == (size, size):
        return slices
    antialias = min(slices.shape[-2:]) > size
    return F.interpolate(slices, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


@register_extractor("random3d")
class Random3DExtractor(VolumeFeatureExtractor):
    """Randomly initialised (fixed ``seed``) MONAI 3D ResNet with global average pooling.

    Needs no download; sensitive to texture, noise and blur, but its scale is arbitrary, so only
    compare values with the same seed (same ``identity``).
    """

    def __init__(self, in_channels: int = 1, arch: str = "resnet10", seed: int = 0) -> None:
        super().__init__(in_channels, {"arch": arch, "seed": int(seed)})
        self.net = seeded_resnet(
            arch, seed, spatial_dims=3, n_input_channels=self.in_channels, conv1_t_stride=2
        )
        self.feature_dim = 512 * (4 if arch == "resnet50" else 1)
        self._finalize()

    def extract(self, volumes: Tensor) -> Tensor:
        return self.net(volumes)


@register_extractor("random2d")
class Random2DExtractor(SliceExtractor):
    """Randomly initialised (fixed ``seed``) MONAI 2D ResNet applied to central slices.

    Slices keep their C channels (modalities) as input channels and are resized to ``slice_size``².
    """

    def __init__(
        self,
        in_channels: int = 1,
        arch: str = "resnet10",
        seed: int = 0,
        axes: Sequence[int] = (0, 1, 2),
        n_slices: int = 3,
        central_fraction: float = 0.5,
        slice_size: int = 64,
    ) -> None:
        options = {"arch": arch, "seed": int(seed), "slice_size": int(slice_size)}
        super().__init__(in_channels, axes, n_slices, central_fraction, options)
        self.slice_size = int(slice_size)
        self.net = seeded_resnet(
            arch, seed, spatial_dims=2, n_input_channels=self.in_channels, conv1_t_stride=2
        )
        self.feature_dim = 512 * (4 if arch == "resnet50" else 1)
        self._finalize()

    def embed_slices(self, slices: Tensor) -> Tensor:
        return self.net(resize_slices(slices, self.slice_size))

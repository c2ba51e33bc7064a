"""Extractors with pretrained weights: MedicalNet (3D) and InceptionV3 (2D, slice-wise).

Neither downloads anything by itself except InceptionV3 when no ``weights_path`` is given (then
torch-fidelity fetches its own weights, which needs internet).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args
from torch import Tensor, nn

from mrrl.metrics.extractors import (
    RESNET_ARCHS,
    SliceExtractor,
    VolumeFeatureExtractor,
    register_extractor,
    seeded_resnet,
)

MEDICALNET_GITHUB = "https://github.com/Tencent/MedicalNet"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_KEY = "metrics.extractor_options.weights_path"


def medicalnet_filename(arch: str) -> str:
    """Tencent's file name of a MedicalNet ResNet (``resnet10`` → ``resnet_10_23dataset.pth``)."""
    return f"resnet_{arch.removeprefix('resnet')}_23dataset.pth"


def medicalnet_hf_repo(arch: str) -> str:
    """The Hugging Face repository of a MedicalNet ResNet (what MONAI's ``resnetN(pretrained=True)`` reads)."""
    return f"TencentMedicalNet/MedicalNet-Resnet{arch.removeprefix('resnet')}"


def medicalnet_cache_candidates(arch: str, hub_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where MedicalNet weights already downloaded by other tools lie, in order (existing or not):

    1. ``<hub_dir or torch.hub.get_dir()>/checkpoints/<file>`` (torch hub's checkpoint folder);
    2. the Hugging Face cache MONAI's ``resnetN(pretrained=True)`` fills (``$HF_HUB_CACHE`` or
       ``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``).
    """
    filename = medicalnet_filename(arch)
    hub = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    out = [hub / "checkpoints" / filename]
    hf_cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    repo_dir = Path(hf_cache) / ("models--" + medicalnet_hf_repo(arch).replace("/", "--"))
    out += [Path(p) for p in sorted(glob.glob(str(repo_dir / "snapshots" / "*" / filename)))]
    return out


def medicalnet_download_hint(arch: str) -> str:
    """What to download from where (mrrl never downloads weights at run time)."""
    return (
        f"Download '{medicalnet_filename(arch)}' from https://huggingface.co/{medicalnet_hf_repo(arch)} (files "
        f"tab) or from the Tencent MedicalNet release linked in {MEDICALNET_GITHUB}"
    )


def find_medicalnet_weights(
    arch: str, weights_path: str | os.PathLike | None, hub_dir: str | os.PathLike | None = None
) -> Path | None:
    """The weights file of a MedicalNet ResNet, or None: ``weights_path`` (a file or a folder holding it) when
    given, else the first existing :func:`medicalnet_cache_candidates` entry."""
    if weights_path:
        path = Path(weights_path).expanduser()
        path = path / medicalnet_filename(arch) if path.is_dir() else path
        return path if path.is_file() else None
    return next((p for p in medicalnet_cache_candidates(arch, hub_dir) if p.is_file()), None)


def resolve_medicalnet_weights(arch: str, weights_path: str | Path | None) -> Path:
    """:func:`find_medicalnet_weights`, or a FileNotFoundError that says what to download from where and
    which config key to set."""
    found = find_medicalnet_weights(arch, weights_path)
    if found is not None:
        return found
    filename = medicalnet_filename(arch)
    where = (
        f"not found at '{Path(weights_path).expanduser()}'"
        if weights_path
        else "not configured (no weights_path given, none in the torch hub or Hugging Face caches)"
    )
    raise FileNotFoundError(
        f"MedicalNet {arch} weights {where}. {medicalnet_download_hint(arch)}, "
        f"then set {WEIGHTS_KEY}=/path/to/{filename}"
    )


def plain_state_dict(checkpoint: Any) -> dict[str, Tensor]:
    """A state dict from a weights file's content: ``{"state_dict": ...}`` unwrapped, ``module.`` (DataParallel)
    prefixes stripped (MedicalNet's files have both)."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_medicalnet_state(net: nn.Module, path: Path) -> None:
    """Load a MedicalNet checkpoint: unwrap ``state_dict``, strip ``module.``, drop the ``conv_seg`` head."""
    state = plain_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    state = {k: v for k, v in state.items() if not k.startswith(("conv_seg.", "fc."))}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a MedicalNet checkpoint for this architecture: "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )


def dilate_like_medicalnet(net: nn.Module) -> None:
    """Turn MONAI's strided layer3/layer4 into MedicalNet's dilated ones (stride 1, dilation 2 and 4).

    The weights have the same shapes either way; this makes the network the one they were trained in.
    """
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for block in layer:
            for conv in block.modules():
                if isinstance(conv, nn.Conv3d):
                    conv.stride = (1, 1, 1)
                    if conv.kernel_size == (3, 3, 3):
                        conv.dilation = conv.padding = (dilation,) * 3
            if isinstance(block.downsample, partial):  # shortcut "A": parameter-free pooling + zero pad
                block.downsample = partial(
                    block.downsample.func, **{**block.downsample.keywords, "stride": 1}
                )


@register_extractor("medicalnet")
class MedicalNetExtractor(VolumeFeatureExtractor):
    """MedicalNet / Med3D (Chen et al. 2019) 3D ResNet encoder, globally average-pooled.

    Each volume is z-scored inside (MedicalNet's preprocessing): ``normalization="foreground"`` uses
    voxels above ``foreground_threshold`` (background of [-1, 1] data is -1) and sets the background
    to 0 (MedicalNet filled it with random noise; 0 keeps features deterministic); ``"volume"`` uses
    all voxels. MedicalNet is single-channel: each of the C channels is embedded separately and the
    features concatenated (``feature_dim = C * 512``, ×4 for resnet50). ``dilated=True`` reproduces
    MedicalNet's dilated layer3/layer4; ``False`` keeps MONAI's strided ones.
    """

    def __init__(
        self,
        in_channels: int = 1,
        arch: str = "resnet10",
        weights_path: str | Path | None = None,
        dilated: bool = True,
        normalization: str = "foreground",
        foreground_threshold: float = -0.95,
    ) -> None:
        if arch not in RESNET_ARCHS:
            raise ValueError(f"unknown MedicalNet arch {arch!r}; choose one of {RESNET_ARCHS}")
        if normalization not in ("foreground", "volume"):
            raise ValueError(f"normalization must be 'foreground' or 'volume', got {normalization!r}")
        options: dict[str, Any] = {"arch": arch, "dilated": bool(dilated), "normalization": normalization}
        if normalization == "foreground":
            options["foreground_threshold"] = float(foreground_threshold)
        # weights_path stays out of the identity (paths differ per machine); the weights fingerprint covers it
        super().__init__(in_channels, options)
        path = resolve_medicalnet_weights(arch, weights_path)
        bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(
            int(arch.removeprefix("resnet"))
        )
        self.net = seeded_resnet(
            arch,
            0,
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_stride=2,
            shortcut_type=shortcut_type,
            bias_downsample=bias_downsample,
        )
        load_medicalnet_state(self.net, path)
        if dilated:
            dilate_like_medicalnet(self.net)
        self.normalization, self.foreground_threshold = normalization, float(foreground_threshold)
        self.feature_dim = self.in_channels * 512 * (4 if arch == "resnet50" else 1)
        self._finalize()

    def normalize(self, x: Tensor) -> Tensor:
        """Z-score each ``[1, D, H, W]`` volume of ``x`` (foreground-only or whole-volume)."""
        flat = x.flatten(1)
        if self.normalization == "foreground":
            mask = flat > self.foreground_threshold
            mask |= mask.sum(1, keepdim=True) < max(2, 0.01 * flat.shape[1])  # (almost) empty: use all voxels
        else:
            mask = torch.ones_like(flat, dtype=torch.bool)
        count = mask.sum(1, keepdim=True)
        mean = (flat * mask).sum(1, keepdim=True) / count
        std = (((flat - mean) * mask).square().sum(1, keepdim=True) / count).sqrt().clamp_min(1e-6)
        return torch.where(mask, (flat - mean) / std, torch.zeros_like(flat)).reshape(x.shape)

    def extract(self, volumes: Tensor) -> Tensor:
        b, c = volumes.shape[:2]
        x = self.normalize(volumes.reshape(b * c, 1, *volumes.shape[2:]))
        return self.net(x).reshape(b, -1)


@register_extractor("inception2d")
class InceptionSliceExtractor(SliceExtractor):
    """InceptionV3 pool features (2048-d, torch-fidelity's FID network via torchmetrics) on central slices.

    Slices map [-1, 1] → uint8 and are replicated to 3 channels; each channel (modality) is its own
    image, so a volume gives ``len(axes) * n_slices * C`` rows. Needs ``pip install torch-fidelity``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        axes: Sequence[int] = (0, 1, 2),
        n_slices: int = 3,
        central_fraction: float = 0.5,
        weights_path: str | Path | None = None,
    ) -> None:
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ImportError(
                "the inception2d extractor needs torch-fidelity: pip install torch-fidelity "
                "(or install mrrl with the extra: pip install 'mrrl[inception]')"
            )
        super().__init__(in_channels, axes, n_slices, central_fraction, {})
        if weights_path is not None and not Path(weights_path).expanduser().is_file():
            raise FileNotFoundError(
                f"InceptionV3 weights not found at '{weights_path}'. Download {INCEPTION_URL} and set "
                f"{WEIGHTS_KEY}=/path/to/{INCEPTION_URL.rsplit('/', 1)[-1]} (or leave it unset to let "
                "torch-fidelity download them)"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = str(Path(weights_path).expanduser()) if weights_path is not None else None
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path
        )
        self.feature_dim = 2048
        self._finalize()

    def rows_per_volume(self) -> int:
        return super().rows_per_volume() * self.in_channels

    def embed_slices(self, slices: Tensor) -> Tensor:
        gray = slices.reshape(-1, 1, *slices.shape[-2:])
        images = ((gray.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
        return self.net(images.contiguous())

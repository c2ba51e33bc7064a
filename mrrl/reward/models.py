"""The two reward regressors (paper §3.4): R3D scores whole volumes, R2D scores axial slices and averages.

Both are MONAI ResNets with one output and carry the reward-target normalisation as buffers, so a
checkpoint reloads alone (:func:`load_reward_model`) and :meth:`RewardNet.score_volumes` returns rewards on
the dataset's scale. PPO calls ``score_volumes`` on decoded volumes, without Lightning, with or without
gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mrrl.errors import ConfigError, ManifestError
from mrrl.utils.checkpoints import safe_load

log = logging.getLogger(__name__)

ARCHS: dict[str, tuple[str, list[int]]] = {
    "resnet10": ("basic", [1, 1, 1, 1]),
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}
BACKBONE_KEYS = ("arch", "width", "norm", "conv1_kernel", "conv1_stride", "no_max_pool", "weights_path")
SLICE_KEYS = ("slices_per_volume", "central_fraction", "eval_slices", "slice_chunk")
KINDS = ("r3d", "r2d")


def _norm_arg(norm: Any) -> Any:
    """``"batch"`` / ``"instance"`` or ``["group", {"num_groups": 8}]`` (Hydra lists) → MONAI's norm argument."""
    if isinstance(norm, (list, tuple)):
        return (str(norm[0]), dict(norm[1]) if len(norm) > 1 else {})
    return str(norm)


def build_resnet(
    spatial_dims: int,
    in_channels: int,
    arch: str = "resnet18",
    width: int = 64,
    norm: Any = "batch",
    conv1_kernel: int = 7,
    conv1_stride: int = 2,
    no_max_pool: bool = False,
    weights_path: str | None = None,
) -> nn.Module:
    """A MONAI ResNet with one output; ``width`` is the first stage's channels (64 = the standard ResNet)."""
    from monai.networks.nets.resnet import ResNet

    if arch not in ARCHS:
        raise ConfigError(f"unknown reward model arch {arch!r}: use one of {', '.join(ARCHS)}")
    block, layers = ARCHS[arch]
    net = ResNet(
        block=block,
        layers=layers,
        block_inplanes=[int(width) * 2**i for i in range(4)],
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=int(conv1_kernel),
        conv1_t_stride=int(conv1_stride),
        no_max_pool=bool(no_max_pool),
        num_classes=1,
        norm=_norm_arg(norm),
    )
    if weights_path:
        _load_backbone_weights(net, Path(weights_path))
    return net


def _load_backbone_weights(net: nn.Module, path: Path) -> None:
    """Initialise from a state dict on disk (e.g. MedicalNet); layers whose shapes differ (the head) are skipped."""
    if not path.is_file():
        raise ConfigError(
            f"reward model weights_path {path} does not exist: put the state dict there "
            "(nothing is downloaded) or set weights_path=null to start from random weights"
        )
    from mrrl.metrics.pretrained import plain_state_dict

    state = plain_state_dict(safe_load(path))
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(usable, strict=False)
    log.info("loaded %d/%d tensors of %s into the reward backbone", len(usable), len(own), path)
    if not usable:
        raise ConfigError(f"no tensor of {path} fits the reward backbone: check arch/width/in_channels")


class RewardNet(nn.Module):
    """Base of R3D and R2D: ``forward`` predicts normalised targets; ``score_volumes`` returns rewards."""

    kind = ""

    def __init__(self, image_shape: tuple[int, ...], target_mean: float = 0.0, target_std: float = 1.0):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))

    def denormalise(self, predictions: torch.Tensor) -> torch.Tensor:
        return predictions * self.target_std + self.target_mean

    def normalise(self, rewards: torch.Tensor) -> torch.Tensor:
        return (rewards - self.target_mean) / self.target_std

    def score_volumes(
        self, volumes: torch.Tensor, grad: bool = False, batch_size: int | None = None
    ) -> torch.Tensor:
        """Rewards ``[B]`` of volumes ``[B, C, D, H, W]`` in [-1, 1], in chunks of ``batch_size``.

        Without ``grad`` this runs under ``no_grad``; with it, gradients reach the volumes (and the
        weights, if they require grad). R2D uses its evaluation slices unless the module is in training mode.
        """
        if volumes.ndim != 5 or volumes.shape[1] != self.image_shape[0]:
            raise ValueError(
                f"{self.kind} scores [B, {self.image_shape[0]}, D, H, W] volumes, got {list(volumes.shape)}"
            )
        dtype = self.target_mean.dtype
        with torch.set_grad_enabled(grad):
            chunks = volumes.split(batch_size) if batch_size else (volumes,)
            out = [self.denormalise(self(c.to(self.target_mean.device, dtype))) for c in chunks]
            return torch.cat(out)


class VolumeRewardNet(RewardNet):
    """R3D: a 3D ResNet on whole volumes — global anatomy and structural coherence."""

    kind = "r3d"

    def __init__(
        self, image_shape: tuple[int, ...], target_mean: float = 0.0, target_std: float = 1.0, **backbone: Any
    ):
        super().__init__(image_shape, target_mean, target_std)
        self.backbone = build_resnet(3, self.image_shape[0], **backbone)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.backbone(volumes).squeeze(1)


class SliceRewardNet(RewardNet):
    """R2D: a 2D ResNet on axial slices (last axis of RAS ``[C, D, H, W]``); a volume's score is the slice mean.

    Training mode scores ``slices_per_volume`` random slices per volume from the central
    ``central_fraction`` of the axial extent (where the brain is); evaluation mode scores every slice
    (``eval_slices="all"``) or every central one (``"central"``).
    """

    kind = "r2d"

    def __init__(
        self,
        image_shape: tuple[int, ...],
        target_mean: float = 0.0,
        target_std: float = 1.0,
        slices_per_volume: int = 8,
        central_fraction: float = 0.7,
        eval_slices: str = "all",
        slice_chunk: int = 256,
        **backbone: Any,
    ):
        super().__init__(image_shape, target_mean, target_std)
        if not 0 < central_fraction <= 1:
            raise ConfigError(f"r2d.central_fraction must be in (0, 1], got {central_fraction}")
        if eval_slices not in ("all", "central"):
            raise ConfigError(f"r2d.eval_slices must be 'all' or 'central', got {eval_slices!r}")
        self.slices_per_volume = int(slices_per_volume)
        self.central_fraction = float(central_fraction)
        self.eval_slices = eval_slices
        self.slice_chunk = int(slice_chunk)
        self.backbone = build_resnet(2, self.image_shape[0], **backbone)

    def central_range(self, depth: int) -> tuple[int, int]:
        n = max(1, round(depth * self.central_fraction))
        lo = (depth - n) // 2
        return lo, lo + n

    def slice_indices(self, batch: int, depth: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[B, k]`` axial indices: random central ones in training mode, the evaluation set otherwise."""
        lo, hi = self.central_range(depth)
        if self.training:
            k = min(self.slices_per_volume, hi - lo)
            return torch.rand(batch, hi - lo, device=device).argsort(dim=1)[:, :k] + lo
        if self.eval_slices == "all":
            lo, hi = 0, depth
        return torch.arange(lo, hi, device=device).expand(batch, hi - lo)

    def slice_scores(self, volumes: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised scores ``[B, k]`` of the slices ``indices`` (default: :meth:`slice_indices`)."""
        from mrrl.vqgan.discriminators import axial_slices

        if indices is None:
            indices = self.slice_indices(volumes.shape[0], volumes.shape[-1], volumes.device)
        slices = axial_slices(volumes, indices)  # [B*k, C, D, H], volume-major
        scores = torch.cat([self.backbone(s) for s in slices.split(self.slice_chunk)]).squeeze(1)
        return scores.view(volumes.shape[0], indices.shape[1])

    def forward(self, volumes: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.slice_scores(volumes, indices).mean(dim=1)


def build_reward_net(
    kind: str,
    image_shape: tuple[int, ...],
    net: Mapping[str, Any],
    target_mean: float = 0.0,
    target_std: float = 1.0,
    load_pretrained: bool = True,
) -> RewardNet:
    """R3D or R2D from its config section (training keys such as ``batch_size`` are ignored)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown reward model kind {kind!r}: use one of {KINDS}")
    allowed = BACKBONE_KEYS + (SLICE_KEYS if kind == "r2d" else ())
    kwargs = {k: v for k, v in dict(net).items() if k in allowed}
    if not load_pretrained:
        kwargs.pop("weights_path", None)
    cls = VolumeRewardNet if kind == "r3d" else SliceRewardNet
    return cls(tuple(image_shape), target_mean, target_std, **kwargs)


def load_reward_model(ckpt_path: str | Path, device: str | torch.device = "cpu") -> RewardNet:
    """The frozen regressor (eval mode, no grad on weights) from a ``stage=reward`` checkpoint, without Lightning."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ManifestError(f"reward model checkpoint {path} does not exist: run `mrrl stage=reward` first")
    ckpt = safe_load(path)
    hp = ckpt.get("hyper_parameters", {})
    if hp.get("kind") not in KINDS or "net" not in hp:
        raise ManifestError(f"{path} is not a reward model checkpoint (no reward hyper-parameters)")
    net = build_reward_net(hp["kind"], hp["image_shape"], hp["net"], load_pretrained=False)
    prefix = "net."
    net.load_state_dict({k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    return net.eval().requires_grad_(False).to(device)

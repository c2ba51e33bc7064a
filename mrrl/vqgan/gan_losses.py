"""GAN and perceptual losses for the VQGAN stage.

Adversarial losses work on raw patch logits (taming-transformers definitions). MONAI's ``PatchAdversarialLoss``
is not used: its hinge squashes the logits with tanh first and its BCE applies a sigmoid before ``BCELoss``,
which is not the standard objective and is fragile in bf16.

Every function accepts a tensor or a sequence of tensors (e.g. 3D and 2D discriminators, several scales);
sequences are averaged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses.perceptual import normalize_tensor
from monai.networks.nets.resnet import ResNetFeatures
from torch import nn

from mrrl.metrics.pretrained import medicalnet_cache_candidates, medicalnet_filename, medicalnet_hf_repo

GAN_LOSSES = ("hinge", "non_saturating", "least_squares")
Logits = torch.Tensor | Sequence[torch.Tensor]


def _as_list(x: Logits) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _check_kind(kind: str) -> str:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; choose one of {GAN_LOSSES}")
    return kind


def _d_single(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    return 0.5 * ((real - 1.0).pow(2).mean() + fake.pow(2).mean())


def _g_single(fake: torch.Tensor, kind: str) -> torch.Tensor:
    fake = fake.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    return (fake - 1.0).pow(2).mean()


def discriminator_loss(real_logits: Logits, fake_logits: Logits, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss ``0.5 * (L_real + L_fake)``.

    hinge: ``relu(1 - D(x)) + relu(1 + D(x̂))`` (0 once real > 1 and fake < -1);
    non_saturating: ``softplus(-D(x)) + softplus(D(x̂))`` (binary cross-entropy on logits);
    least_squares: ``(D(x) - 1)^2 + D(x̂)^2``.
    """
    kind = _check_kind(kind)
    reals, fakes = _as_list(real_logits), _as_list(fake_logits)
    if len(reals) != len(fakes):
        raise ValueError("real and fake logits must come from the same discriminators")
    return torch.stack([_d_single(r, f, kind) for r, f in zip(reals, fakes)]).mean()


def generator_loss(fake_logits: Logits, kind: str = "hinge") -> torch.Tensor:
    """Generator loss: hinge ``-D(x̂)``; non_saturating ``softplus(-D(x̂))``; least_squares ``(D(x̂) - 1)^2``."""
    kind = _check_kind(kind)
    return torch.stack([_g_single(f, kind) for f in _as_list(fake_logits)]).mean()


def feature_matching_loss(
    real_features: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
    fake_features: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
) -> torch.Tensor:
    """Mean over layers of ``L1(D_l(x), D_l(x̂))``; real features are detached (the target).

    Real and fake inputs must be paired (same volumes / same slices). Nested lists (several discriminators)
    are flattened.
    """

    def flat(feats):
        out = []
        for f in feats:
            out.extend(flat(f) if not isinstance(f, torch.Tensor) else [f])
        return out

    reals, fakes = flat(real_features), flat(fake_features)
    if len(reals) != len(fakes) or not reals:
        raise ValueError("real and fake feature lists must be non-empty and of equal length")
    return torch.stack([F.l1_loss(f.float(), r.detach().float()) for r, f in zip(reals, fakes)]).mean()


def adaptive_adversarial_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    fixed_weight: float | None = None,
) -> torch.Tensor:
    """Adaptive GAN weight of Esser et al. (2021): ``||grad_last L_rec|| / (||grad_last L_gan|| + 1e-4)``.

    Clamped to ``[0, max_weight]`` and detached. Uses ``autograd.grad`` (no ``.grad`` is written), retaining the
    graph for the real backward pass. With ``fixed_weight`` the gradients are skipped and that value returned.
    If the GAN loss does not reach ``last_layer`` (e.g. discriminator off) the weight is 0.
    """
    if fixed_weight is not None:
        return torch.tensor(float(fixed_weight), device=rec_loss.device)
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, allow_unused=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True, allow_unused=True)
    if rec_grad is None or gan_grad is None:
        return torch.zeros((), device=rec_loss.device)
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def adversarial_factor(step: int, start_step: int, ramp_steps: int = 0) -> float:
    """Warm-up gate for the adversarial terms: 0 before ``start_step``, then 1 (linearly over ``ramp_steps``)."""
    if step < start_step:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - start_step + 1) / ramp_steps)


# ------------------------------------------------------------------------------------------------ perceptual

# MONAI network name -> MONAI ResNetFeatures name; the weights are Tencent's MedicalNet files, looked up like the
# MedicalNet FID extractor's (mrrl.metrics.pretrained: the torch hub folder, then the Hugging Face cache).
MEDICALNET_WEIGHTS = {
    "medicalnet_resnet10_23datasets": "resnet10",
    "medicalnet_resnet18_23datasets": "resnet18",
    "medicalnet_resnet34_23datasets": "resnet34",
    "medicalnet_resnet50_23datasets": "resnet50",
}


class PerceptualWeightsMissingError(FileNotFoundError):
    """The pretrained network of the perceptual loss is not on disk (mrrl never downloads it at run time)."""


def _arch(network: str) -> str:
    if network not in MEDICALNET_WEIGHTS:
        raise ValueError(
            f"unknown perceptual network {network!r}; choose one of {sorted(MEDICALNET_WEIGHTS)}"
        )
    return MEDICALNET_WEIGHTS[network]


def perceptual_weights_candidates(network: str, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the weights of ``network`` are looked for, in order (existing or not): see
    :func:`mrrl.metrics.pretrained.medicalnet_cache_candidates`."""
    return medicalnet_cache_candidates(_arch(network), cache_dir)


def find_perceptual_weights(
    network: str = "medicalnet_resnet10_23datasets",
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Path of the weights file, or :class:`PerceptualWeightsMissingError` saying where to put it."""
    arch = _arch(network)
    filename = medicalnet_filename(arch)
    url = f"https://huggingface.co/{medicalnet_hf_repo(arch)}/resolve/main/{filename}"
    disable = "or disable the perceptual loss with `stage.perceptual_weight=0`."
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if path.is_file():
            return path
        raise PerceptualWeightsMissingError(
            f"Perceptual loss ({network}): weights_path {path} does not exist. Download {url} to that path, "
            + disable
        )
    candidates = perceptual_weights_candidates(network, cache_dir)
    for path in candidates:
        if path.is_file():
            return path
    target = candidates[0]
    raise PerceptualWeightsMissingError(
        f"Perceptual loss ({network}) is enabled but its pretrained weights are not on disk, and mrrl does not "
        f"download at run time. Put the file {filename} at {target} (e.g. `mkdir -p {target.parent} && "
        f"curl -L -o {target} {url}`), or pass weights_path=/path/to/{filename}, " + disable
    )


class PerceptualLoss(nn.Module):
    """3D perceptual (LPIPS-style) distance with MedicalNet features, from weights already on disk.

    The network is MONAI's ``ResNetFeatures`` (the MedicalNet architecture MONAI's ``resnetN(pretrained=True)``
    builds) created with ``pretrained=False`` and filled from a local file, so nothing is ever downloaded: the
    file is located (``weights_path``, the torch hub checkpoint folder, or the Hugging Face cache) before
    anything is built, and a missing file is a :class:`PerceptualWeightsMissingError` naming where to put it.

    Each channel (modality) of ``[B, C, D, H, W]`` is z-scored per volume (MedicalNet's preprocessing) and fed
    separately; for every feature level the channel-normalised features are compared as in LPIPS
    (squared difference summed over channels, averaged over space), summed over levels and averaged over
    channels. The network is frozen and stays in eval mode. Disabled by default in the stage config.
    """

    def __init__(
        self,
        network: str = "medicalnet_resnet10_23datasets",
        weights_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        path = find_perceptual_weights(network, weights_path, cache_dir)  # before building anything
        self.network = network
        self.weights_path = str(path)
        self.net = ResNetFeatures(
            MEDICALNET_WEIGHTS[network], pretrained=False, spatial_dims=3, in_channels=1
        )
        self._load(path)
        self.levels = tuple(levels) if levels is not None else None
        self.net.eval()
        self.net.requires_grad_(False)

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        own = self.net.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.startswith(("conv_seg", "fc"))}
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise RuntimeError(f"{path} does not hold {self.network} weights: {err}") from err

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.net.eval()  # frozen feature extractor: BatchNorm statistics must never move
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        dims = tuple(range(1, x.ndim))
        x = (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-6)
        feats = self.net(x)
        return [feats[i] for i in self.levels] if self.levels is not None else feats

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape or input.ndim != 5:
            raise ValueError(
                f"expected two [B, C, D, H, W] tensors of equal shape, got {input.shape}, {target.shape}"
            )
        per_channel = []
        for c in range(input.shape[1]):
            f_in = self._features(input[:, c : c + 1].float())
            f_tg = self._features(target[:, c : c + 1].float())
            dist = [
                (normalize_tensor(a) - normalize_tensor(b)).pow(2).sum(1).mean() for a, b in zip(f_in, f_tg)
            ]
            per_channel.append(torch.stack(dist).sum())
        return torch.stack(per_channel).mean()


def build_perceptual_loss(weight: float, **kwargs) -> PerceptualLoss | None:
    """``None`` when ``weight <= 0`` (the default: no weights needed); else a :class:`PerceptualLoss`."""
    return PerceptualLoss(**kwargs) if weight > 0 else None

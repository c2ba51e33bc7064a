"""Training augmentation of the reward regressors: random flips and a small intensity gain/bias jitter.

Applied to a training batch on its device (per-volume random draws from torch's global RNG, which Lightning
seeds), never to validation or scoring. Each transform leaves the reward label as it is: a left-right flip
of an RAS brain and a few-percent global gain or offset do not change what makes a volume realistic, so a
reward model that changes its score under them is keying on something PPO could exploit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mrrl.errors import ConfigError


class RewardAugment:
    def __init__(
        self, flip_prob: float, flip_axes: Sequence[int], intensity_scale: float, intensity_shift: float
    ):
        if not 0 <= flip_prob <= 1 or intensity_scale < 0 or intensity_shift < 0:
            raise ConfigError(
                f"stage.augment: flip_prob must be in [0, 1] and the jitters ≥ 0, got flip_prob={flip_prob}, "
                f"intensity_scale={intensity_scale}, intensity_shift={intensity_shift}"
            )
        if any(int(a) not in (0, 1, 2) for a in flip_axes):
            raise ConfigError(
                f"stage.augment.flip_axes are spatial axes 0, 1, 2 of [C, D, H, W], got {list(flip_axes)}"
            )
        self.flip_prob = float(flip_prob)
        self.flip_axes = [int(a) for a in flip_axes]
        self.intensity_scale = float(intensity_scale)
        self.intensity_shift = float(intensity_shift)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> RewardAugment | None:
        """The augmentation of ``stage.augment``, or None when it is disabled."""
        if not cfg or not cfg["enabled"]:
            return None
        return cls(float(cfg["flip_prob"]), list(cfg["flip_axes"]), float(cfg["intensity_scale"]),
                   float(cfg["intensity_shift"]))  # fmt: skip

    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        """Augmented copies of ``volumes [B, C, D, H, W]`` in [-1, 1] (the input is not modified)."""
        out = volumes.clone()
        batch = out.shape[0]
        for axis in self.flip_axes:
            flip = torch.rand(batch) < self.flip_prob
            if flip.any():
                out[flip] = out[flip].flip(axis + 2)
        shape = (batch,) + (1,) * (out.ndim - 1)
        gain = 1 + self.intensity_scale * (2 * torch.rand(shape) - 1)
        bias = self.intensity_shift * (2 * torch.rand(shape) - 1)
        return (out * gain.to(out) + bias.to(out)).clamp(-1, 1)  # the data range the reward models score

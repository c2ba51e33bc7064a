"""The multi-scale reward of paper §3.4: the learned 3D volume model R3D and the 2D slice model R2D, combined per class."""

from __future__ import annotations

import torch

from mrrl.errors import ConfigError
from mrrl.reward.ensemble import RewardEnsemble


class MultiScaleReward:
    """``w3d·R3D(x) + w2d·R2D(x)`` on decoded volumes; returns the total and each component.

    Each scale is one reward model or a :class:`~mrrl.reward.ensemble.RewardEnsemble`; an ensemble scores
    ``mean − uncertainty_penalty·std`` over its members (``<scale>_std`` is returned beside the score).
    """

    def __init__(
        self,
        r3d: torch.nn.Module | RewardEnsemble | None,
        r2d: torch.nn.Module | RewardEnsemble | None,
        w3d: float,
        w2d: float,
        uncertainty_penalty: float = 0.0,
    ):
        if (w3d and r3d is None) or (w2d and r2d is None):
            raise ConfigError("a reward model with a non-zero weight is missing")
        if uncertainty_penalty < 0:
            raise ConfigError(f"stage.reward.uncertainty_penalty must be ≥ 0, got {uncertainty_penalty}")
        as_ensemble = lambda m: m if m is None or isinstance(m, RewardEnsemble) else RewardEnsemble([m])  # noqa: E731
        self.models = {"r3d": (as_ensemble(r3d), float(w3d)), "r2d": (as_ensemble(r2d), float(w2d))}
        self.uncertainty_penalty = float(uncertainty_penalty)

    def to(self, device: torch.device) -> MultiScaleReward:
        for model, _ in self.models.values():
            if model is not None:
                model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(volumes.shape[0], device=volumes.device)
        for name, (model, weight) in self.models.items():
            if model is None or weight == 0:
                continue
            scored = model.score(volumes, self.uncertainty_penalty)
            out[name] = scored["score"]
            if len(model.members) > 1:
                out[f"{name}_std"] = scored["std"]
            total = total + weight * scored["score"]
        out["total"] = total
        return out

"""An ensemble of reward models of one scale (R3D or R2D) and its uncertainty-penalised score.

Members are trained on the same data and split with different seeds (``stage=reward`` with
``ensemble_size > 1``). Where they disagree the learned reward is least trustworthy - the places PPO can
exploit (reward over-optimisation); scoring ``mean − λ·std`` over the members makes such samples less
attractive (ensemble approaches to over-optimisation, e.g. Coste et al. 2024, GARDO 2025).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RewardEnsemble:
    def __init__(self, members: Sequence[torch.nn.Module]):
        if not members:
            raise ValueError("a reward ensemble needs at least one member")
        self.members = list(members)

    def to(self, device: torch.device | str) -> RewardEnsemble:
        for member in self.members:
            member.to(device)
        return self

    @torch.no_grad()
    def member_scores(self, volumes: torch.Tensor) -> torch.Tensor:
        """``[K, B]``: every member's reward of every volume."""
        return torch.stack([m.score_volumes(volumes).float().to(volumes.device) for m in self.members])

    def score(self, volumes: torch.Tensor, uncertainty_penalty: float) -> dict[str, torch.Tensor]:
        """``{"score": mean − λ·std, "mean", "std"}`` over the members (std 0 for a single member)."""
        scores = self.member_scores(volumes)
        mean = scores.mean(dim=0)
        std = scores.std(dim=0, unbiased=False) if len(self.members) > 1 else torch.zeros_like(mean)
        return {"score": mean - float(uncertainty_penalty) * std, "mean": mean, "std": std}

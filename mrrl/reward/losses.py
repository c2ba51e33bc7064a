"""Pairwise ranking loss and ranking accuracy between volumes of different quality groups.

Only pairs from *different* groups with *different* rewards count: within a group every volume has the
same target, so their order carries no information.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

RANKING_LOSSES = ("logistic", "margin")


def _pair_mask(
    rewards_a: torch.Tensor, groups_a: torch.Tensor, rewards_b: torch.Tensor, groups_b: torch.Tensor
) -> torch.Tensor:
    """``[n, m]`` mask of pairs (i of a, j of b) from different groups where i's reward is higher."""
    return (groups_a[:, None] != groups_b[None, :]) & (rewards_a[:, None] > rewards_b[None, :])


def pairwise_ranking_loss(
    scores: torch.Tensor,
    rewards: torch.Tensor,
    groups: torch.Tensor,
    kind: str = "logistic",
    margin: float = 0.1,
    scale: float = 1.0,
) -> torch.Tensor:
    """Mean over ordered pairs (reward_i > reward_j) of ``softplus(-(s_i - s_j) / scale)`` (RankNet) or
    ``relu(margin - (s_i - s_j))``; 0 (with a graph) when the batch holds no such pair."""
    if kind not in RANKING_LOSSES:
        raise ValueError(f"ranking loss must be one of {RANKING_LOSSES}, got {kind!r}")
    mask = _pair_mask(rewards, groups, rewards, groups)
    if not bool(mask.any()):
        return scores.sum() * 0.0
    diff = (scores[:, None] - scores[None, :])[mask]
    if kind == "logistic":
        return F.softplus(-diff / scale).mean()
    return F.relu(margin - diff).mean()


@torch.no_grad()
def pairwise_ranking_accuracy(
    scores: torch.Tensor, rewards: torch.Tensor, groups: torch.Tensor, chunk: int = 2048
) -> torch.Tensor:
    """Fraction of ordered pairs from different groups that the scores order like the rewards (ties: ½).

    NaN when there is no such pair. Chunked over rows, so ten thousand volumes need no 10⁸-entry matrix.
    """
    scores, rewards, groups = scores.flatten().double(), rewards.flatten().double(), groups.flatten()
    correct = torch.zeros((), dtype=torch.float64, device=scores.device)
    total = torch.zeros((), dtype=torch.float64, device=scores.device)
    for start in range(0, scores.numel(), chunk):
        sl = slice(start, start + chunk)
        mask = _pair_mask(rewards[sl], groups[sl], rewards, groups)
        diff = scores[sl, None] - scores[None, :]
        correct += ((diff > 0).double() + 0.5 * (diff == 0).double())[mask].sum()
        total += mask.sum()
    return (correct / total).float() if total > 0 else torch.tensor(float("nan"))


class PairwiseRankingAccuracy(Metric):
    """:func:`pairwise_ranking_accuracy` over everything seen (gathered across ranks in DDP)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> None:
        self.preds.append(preds.detach().flatten().float())
        self.target.append(target.detach().flatten().float())
        self.groups.append(groups.detach().flatten().long())

    def compute(self) -> torch.Tensor:
        if not self.preds:
            return torch.tensor(float("nan"))
        return pairwise_ranking_accuracy(
            dim_zero_cat(self.preds), dim_zero_cat(self.target), dim_zero_cat(self.groups)
        )

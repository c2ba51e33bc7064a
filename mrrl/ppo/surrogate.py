"""The clipped PPO surrogate on per-step log-probabilities and its diagnostics."""

from __future__ import annotations

import torch


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """``mean(max(-A·r, -A·clip(r, 1-ε, 1+ε)))`` with ``r = exp(log_prob - old_log_prob)`` (Schulman et al.)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


@torch.no_grad()
def ppo_step_stats(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float
) -> dict[str, torch.Tensor]:
    """Approximate KL of the update (``0.5·E[(Δ log p)²]``) and the fraction of clipped ratios."""
    delta = log_prob - old_log_prob
    return {
        "approx_kl": 0.5 * (delta**2).mean(),
        "clip_fraction": ((torch.exp(delta) - 1.0).abs() > clip_range).float().mean(),
    }

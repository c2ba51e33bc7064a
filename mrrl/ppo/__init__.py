"""PPO for diffusion models (DDPO-style): advantages, the clipped objective, the per-step KL penalty."""

from mrrl.ppo.advantages import PerClassRewardNormalizer
from mrrl.ppo.objective import clipped_surrogate, ppo_step_stats

__all__ = ["PerClassRewardNormalizer", "clipped_surrogate", "ppo_step_stats"]

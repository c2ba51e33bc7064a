"""PPO for diffusion models (paper §3.5, DDPO-style): the LightningModule (`module`), the multi-scale reward
(`multiscale_reward`), advantages, the clipped surrogate, the KL controller, the validation probe and the
best-checkpoint tracker."""

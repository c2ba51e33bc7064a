"""Reward learning (paper §3.2–3.4): the reward dataset format and writer, FID→reward maps, the R3D/R2D
regressors, their LightningModule, ranking metrics and ensembles."""

"""Latent diffusion (paper §3.2): noise schedules, the class-conditional denoiser (`unet`), samplers with
log-probabilities (`sampling`), the LightningModule (`module`), its latent data (`latent_data`) and
checkpoint loading/generation (`generate`)."""

"""The 3D VQGAN (paper §3.1): networks (generator, EMA quantiser, discriminators, GAN losses), the
LightningModule (`module`) and loading a trained one / encoding a cohort into latents (`loading`)."""

"""mrrl: 3D latent diffusion for brain MRI, fine-tuned with PPO from multi-scale reward models."""

__version__ = "0.1.0"

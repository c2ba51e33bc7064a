"""Latent diffusion: noise schedules, the class-conditional denoiser, samplers with log-probabilities."""

from mrrl.diffusion.sampling import (
    SAMPLERS,
    StepLogProb,
    Trajectory,
    gaussian_kl,
    gaussian_log_prob,
    latent_moments,
    noised_reconstruction,
    randn,
    sample,
    scale_factor_from_moments,
    std_from_moments,
    step_log_prob,
    step_mean_std,
    step_std,
)
from mrrl.diffusion.schedules import (
    PREDICTION_TYPES,
    DiffusionSchedule,
    build_scheduler,
    expand_like,
    inference_timesteps,
)
from mrrl.diffusion.unet import DenoiserModel, build_denoiser, build_unet

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "DenoiserModel",
    "DiffusionSchedule",
    "StepLogProb",
    "Trajectory",
    "build_denoiser",
    "build_scheduler",
    "build_unet",
    "expand_like",
    "gaussian_kl",
    "gaussian_log_prob",
    "inference_timesteps",
    "latent_moments",
    "noised_reconstruction",
    "randn",
    "sample",
    "scale_factor_from_moments",
    "std_from_moments",
    "step_log_prob",
    "step_mean_std",
    "step_std",
]

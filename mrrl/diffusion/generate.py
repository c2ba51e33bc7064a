"""Use a trained diffusion stage without Lightning: load it, sample volumes, decode, write NIfTI.

``load_diffusion`` reads a ``stage=diffusion`` checkpoint (``best.ckpt``/``last.ckpt``, or the small
``ema.pt`` the stage exports) and returns a ready :class:`DenoiserModel` plus what is needed to use it:
the latent scale factor, the class names, the latent shape and the path of the VQGAN whose latents it
was trained on. Later stages (reward data, PPO, evaluation) call this, never the LightningModule.

Latent convention: the denoiser works on *scaled* latents ``z * scale_factor`` (unit variance, like the
sampler's noise); ``decode_latents`` divides by the scale factor before ``vqgan.decode``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import torch

from mrrl.diffusion.sampling import randn, sample
from mrrl.diffusion.schedules import DiffusionSchedule
from mrrl.diffusion.unet import DenoiserModel, build_denoiser
from mrrl.errors import ManifestError
from mrrl.utils.checkpoints import safe_load
from mrrl.utils.io import atomic_path

EMA_PREFIX = "ema.unet."
RAW_PREFIX = "denoiser.unet."
SCALE_KEY = "scale_factor"
EMA_FILE_FORMAT = "mrrl.diffusion.ema/1"


class LoadedDiffusion(NamedTuple):
    """What ``load_diffusion`` returns; ``denoiser`` operates on scaled latents of ``latent_shape``."""

    denoiser: DenoiserModel
    scale_factor: float
    class_names: list[str]
    vqgan_ckpt: str | None
    latent_shape: tuple[int, int, int, int]
    hparams: dict[str, Any]


# ------------------------------------------------------------------------------------------ building


def schedule_from_config(schedule: Mapping[str, Any]) -> DiffusionSchedule:
    """``DiffusionSchedule`` from the stage's ``schedule`` config; ``args`` holds extra MONAI schedule args."""
    cfg = dict(schedule)
    extra = dict(cfg.pop("args", None) or {})
    return DiffusionSchedule(**cfg, **extra)


def denoiser_from_hparams(hparams: Mapping[str, Any]) -> DenoiserModel:
    """An untrained denoiser shaped as the checkpoint's hyper-parameters say (shared with the LightningModule)."""
    return build_denoiser(
        latent_channels=int(hparams["latent_shape"][0]),
        num_classes=len(hparams["class_names"]),
        schedule=schedule_from_config(hparams["schedule"]),
        classifier_free_guidance=float(hparams.get("cfg_dropout", 0.0)) > 0,
        **dict(hparams["unet"]),
    )


def _weights(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_diffusion(
    ckpt_path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"
) -> LoadedDiffusion:
    """A trained diffusion model (eval mode, no gradients) from a diffusion-stage checkpoint.

    Args:
        ckpt_path: ``best.ckpt`` / ``last.ckpt`` of ``stage=diffusion`` or the exported ``ema.pt``.
        use_ema: the EMA weights (what the stage samples with) or the raw training weights
            (not in ``ema.pt``).
        device: where the denoiser goes.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ManifestError(f"diffusion checkpoint {path} does not exist")
    ckpt = safe_load(path)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    state = ckpt.get("state_dict") or {}
    if "schedule" not in hparams or SCALE_KEY not in state:
        raise ManifestError(f"{path} is not a diffusion-stage checkpoint (no schedule / scale factor)")
    prefix = EMA_PREFIX if use_ema else RAW_PREFIX
    weights = _weights(state, prefix)
    if not weights:
        which = "EMA" if use_ema else "raw (non-EMA)"
        raise ManifestError(f"{path} holds no {which} weights; use the stage's best.ckpt or last.ckpt")
    denoiser = denoiser_from_hparams(hparams)
    denoiser.unet.load_state_dict(weights)
    scale = float(state[SCALE_KEY])
    if not scale > 0:
        raise ManifestError(f"{path} has no latent scale factor (saved before training started?)")
    denoiser = denoiser.to(device).eval().requires_grad_(False)
    return LoadedDiffusion(
        denoiser=denoiser,
        scale_factor=scale,
        class_names=list(hparams["class_names"]),
        vqgan_ckpt=hparams.get("vqgan_ckpt"),
        latent_shape=tuple(int(s) for s in hparams["latent_shape"]),  # type: ignore[arg-type]
        hparams=hparams,
    )


def export_ema(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """Write the EMA weights, scale factor and hyper-parameters of a Lightning checkpoint to a small file.

    No optimiser state and no raw weights: about a quarter of ``best.ckpt``; ``load_diffusion`` reads it.
    """
    ckpt = safe_load(ckpt_path)
    state = ckpt["state_dict"]
    kept = {k: v for k, v in state.items() if k.startswith(EMA_PREFIX) or k == SCALE_KEY}
    payload = {
        "format": EMA_FILE_FORMAT,
        "source": str(Path(ckpt_path).resolve()),
        "global_step": ckpt.get("global_step"),
        "hyper_parameters": dict(ckpt["hyper_parameters"]),
        "state_dict": kept,
    }
    with atomic_path(out_path) as tmp:
        torch.save(payload, tmp)
    return Path(out_path)


# ------------------------------------------------------------------------------------------ sampling


@torch.no_grad()
def decode_latents(
    vqgan: torch.nn.Module, latents: torch.Tensor, scale_factor: float, quantize: bool = True
) -> torch.Tensor:
    """Scaled diffusion latents -> volumes: divide by the scale factor, then ``vqgan.decode``.

    ``quantize`` snaps the (continuous) samples to the nearest codebook vectors first, as the decoder
    only ever saw quantised codes in training (medicaldiffusion does the same).
    """
    param = next(vqgan.parameters())
    z = latents.to(param.device, param.dtype) / scale_factor
    return vqgan.decode(z, quantize=quantize)


@torch.no_grad()
def generate_volumes(
    denoiser: DenoiserModel,
    vqgan: torch.nn.Module,
    scale_factor: float,
    labels: torch.Tensor | Sequence[int],
    latent_shape: Sequence[int],
    num_steps: int = 100,
    sampler: str = "ddim",
    eta: float = 0.0,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
    quantize: bool = True,
    clamp: tuple[float, float] | None = (-1.0, 1.0),
    indices: Sequence[int] | None = None,
    step_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one volume per label and decode it: ``[N, C, D, H, W]`` float32 on the CPU.

    Sampling runs in chunks of ``batch_size`` (its own setting, independent of the training batch: make
    it large on GPUs, where small networks are launch-bound). All initial noise is drawn from
    ``generator`` up front, so deterministic samplers (DDIM, eta = 0) give the same volumes whatever the
    batch size; stochastic steps draw their noise chunk by chunk. ``clamp`` clips to the data's
    intensity range (None keeps the decoder's raw output).

    ``indices`` makes only those items of the N (a DDP rank's share): the initial noise of all N is still
    drawn, so with a deterministic sampler every item is the one a single process would make.
    ``step_generator`` (default ``generator``) draws the stochastic steps' noise; give each rank its own.
    """
    labels = torch.as_tensor(labels).long().cpu()
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D tensor of class indices, got shape {tuple(labels.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = denoiser.device
    noise_device = generator.device if generator is not None else device
    noise = randn((labels.numel(), *latent_shape), generator, noise_device, denoiser.latent_dtype)
    if indices is not None:
        picked = torch.as_tensor(list(indices), dtype=torch.long)
        if picked.numel() == 0:
            return torch.empty((0,))
        labels, noise = labels[picked], noise[picked.to(noise.device)]
    step_generator = generator if step_generator is None else step_generator
    volumes = []
    for start in range(0, labels.numel(), batch_size):
        chunk = slice(start, start + batch_size)
        latents = sample(
            denoiser,
            labels[chunk],
            num_steps,
            sampler=sampler,
            eta=eta,
            generator=step_generator,
            guidance_scale=guidance_scale,
            noise=noise[chunk],
        )
        volume = decode_latents(vqgan, latents, scale_factor, quantize=quantize).float()
        if clamp is not None:
            volume = volume.clamp(*clamp)
        volumes.append(volume.cpu())
    return torch.cat(volumes)


# ------------------------------------------------------------------------------------------ NIfTI


def nifti_affine(shape: Sequence[int], spacing_mm: float | Sequence[float]) -> np.ndarray:
    """RAS+ voxel-to-mm affine with the given spacing and the volume's centre at (0, 0, 0) mm.

    The preprocessed volumes are oriented RAS (axis 0 left->right, 1 posterior->anterior,
    2 inferior->superior), so the affine is diagonal with positive spacings.
    """
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    if np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be positive, got {spacing.tolist()}")
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape[:3], dtype=np.float64) - 1) / 2 * spacing
    return affine


def save_nifti(
    volume: torch.Tensor | np.ndarray,
    path: str | Path,
    spacing_mm: float | Sequence[float] = 1.0,
    intensity_range: tuple[float, float] | None = (-1.0, 1.0),
) -> Path:
    """Write a ``[C, D, H, W]`` or ``[D, H, W]`` volume as float32 NIfTI-1 for ITK-SNAP / 3D Slicer.

    * Orientation: RAS+ diagonal affine (``nifti_affine``), stored as both qform and sform with code 1
      (scanner anatomical), so every viewer places it identically; units mm.
    * Spacing: the preprocessing resizes each subject with its own (aspect-preserving) factor, so
      there is no single true spacing: pass the one you want displayed (isotropic ``1.0`` by default).
    * Intensity: with ``intensity_range`` (the data range, default [-1, 1]) values are mapped linearly
      onto [0, 1] and clipped; ``None`` keeps the values as they are. ``cal_min/cal_max`` are set to the
      written range so viewers open it with a sensible window.
    * Channels: one channel is written as a 3D image, several as 4D with channels last.
    """
    array = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    array = array.astype(np.float32, copy=False)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    elif array.ndim == 4:
        array = np.moveaxis(array, 0, -1)
    elif array.ndim != 3:
        raise ValueError(f"expected a [C, D, H, W] or [D, H, W] volume, got shape {array.shape}")
    if intensity_range is not None:
        lo, hi = (float(v) for v in intensity_range)
        array = np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    affine = nifti_affine(array.shape, spacing_mm)
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    header = image.header
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units(xyz="mm")
    header.set_data_dtype(np.float32)
    header["cal_min"], header["cal_max"] = (
        (0.0, 1.0) if intensity_range is not None else (float(array.min()), float(array.max()))
    )
    header["descrip"] = b"mrrl synthetic volume"
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix=suffix) as tmp:  # nibabel picks gzip from the suffix
        nib.save(image, str(tmp))
    return path

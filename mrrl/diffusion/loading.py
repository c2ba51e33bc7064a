"""A diffusion (or PPO) checkpoint together with the VQGAN that decodes its latents, loaded once.

The VQGAN that goes with a diffusion checkpoint is the one whose latents it was trained on: the checkpoint
records its path (``hyper_parameters.vqgan_ckpt``). Later stages take it from there unless the user names
another (``stage.vqgan_ckpt`` in reward_data / ppo), and fall back to the experiment's VQGAN only when the
recorded file is gone (with a warning: a different VQGAN decodes the latents into other volumes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from mrrl.diffusion.generate import LoadedDiffusion, load_diffusion
from mrrl.errors import ManifestError
from mrrl.vqgan.loading import load_vqgan
from mrrl.vqgan.networks import VQGAN

log = logging.getLogger(__name__)


class DiffusionWithVQGAN(NamedTuple):
    """What :func:`load_diffusion_with_vqgan` returns."""

    diffusion: LoadedDiffusion
    vqgan: VQGAN
    vqgan_ckpt: str  # the VQGAN checkpoint that was loaded


def load_diffusion_with_vqgan(
    ckpt: str | Path,
    *,
    vqgan_ckpt: str | Path | None = None,
    fallback_vqgan: str | Path | Callable[[], str | Path] | None = None,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
) -> DiffusionWithVQGAN:
    """Load ``ckpt`` (``load_diffusion``) and its VQGAN, both in eval mode on ``device``, each file read once.

    The VQGAN, in order: ``vqgan_ckpt`` (an explicit choice, must exist); the one ``ckpt`` records, if the file
    exists; ``fallback_vqgan`` (a path, or a function returning one, called only when needed, e.g. a manifest
    lookup through :func:`mrrl.manifest.resolve_checkpoint`), with a warning when ``ckpt`` recorded a file that
    is gone. ``ManifestError`` (one line) when none of these gives a VQGAN.
    """
    loaded = load_diffusion(ckpt, use_ema=use_ema, device=device)
    recorded = loaded.vqgan_ckpt
    if vqgan_ckpt:
        chosen = Path(str(vqgan_ckpt))
        if not chosen.is_file():
            raise ManifestError(f"VQGAN checkpoint {chosen} does not exist")
    elif recorded and Path(recorded).is_file():
        chosen = Path(recorded)
    elif fallback_vqgan is not None:
        chosen = Path(str(fallback_vqgan() if callable(fallback_vqgan) else fallback_vqgan))
        if recorded:
            log.warning(
                "%s names the VQGAN %s, which does not exist: decoding with %s", ckpt, recorded, chosen
            )
        if not chosen.is_file():
            raise ManifestError(f"VQGAN checkpoint {chosen} does not exist")
    else:
        raise ManifestError(
            f"{ckpt} names the VQGAN {recorded}, which does not exist, and no other was given: "
            "run `mrrl stage=vqgan` or pass stage.vqgan_ckpt=<path>"
        )
    return DiffusionWithVQGAN(loaded, load_vqgan(chosen, device), str(chosen))

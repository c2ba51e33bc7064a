"""Exported model weights that load without pickle: safetensors tensors + a JSON config per network.

``<model_dir>/diffusion.safetensors`` holds the denoiser UNet's weights (EMA or raw, as sampled),
``diffusion.json`` its hyper-parameters and latent scale factor; ``vqgan.safetensors`` / ``vqgan.json``
the decoder's. :func:`load_exported_model` rebuilds both networks from the JSON and reads the tensors
with ``safetensors.torch.load_file``; ``torch.load`` (pickle) is never called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mrrl.diffusion.generate import LoadedDiffusion, denoiser_from_hparams
from mrrl.errors import ManifestError
from mrrl.utils.io import atomic_path, atomic_write_json

FORMAT = "mrrl.export.weights/1"
DIFFUSION_FILE = "diffusion"
VQGAN_FILE = "vqgan"


class ExportedModel(NamedTuple):
    diffusion: LoadedDiffusion
    vqgan: torch.nn.Module
    config: dict[str, Any]


def _save_tensors(module: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    return path


def save_exported_model(
    model_dir: str | Path,
    loaded: LoadedDiffusion,
    vqgan: torch.nn.Module,
    vqgan_config: dict[str, Any],
    provenance: dict[str, Any],
) -> dict[str, str]:
    """Write ``diffusion.{safetensors,json}`` and ``vqgan.{safetensors,json}``; return their paths."""
    model_dir = Path(model_dir)
    files = {
        "diffusion_weights": _save_tensors(loaded.denoiser.unet, model_dir / f"{DIFFUSION_FILE}.safetensors"),
        "vqgan_weights": _save_tensors(vqgan, model_dir / f"{VQGAN_FILE}.safetensors"),
    }
    diffusion_cfg = {
        "format": FORMAT,
        "hyper_parameters": loaded.hparams,
        "scale_factor": loaded.scale_factor,
        "class_names": loaded.class_names,
        "latent_shape": list(loaded.latent_shape),
        "provenance": provenance,
    }
    files["diffusion_config"] = atomic_write_json(model_dir / f"{DIFFUSION_FILE}.json", diffusion_cfg)
    files["vqgan_config"] = atomic_write_json(
        model_dir / f"{VQGAN_FILE}.json", {"format": FORMAT, **vqgan_config}
    )
    return {k: str(Path(v).resolve()) for k, v in files.items()}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ManifestError(f"{path} does not exist: not an exported mrrl model folder")
    payload = json.loads(path.read_text())
    if payload.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an mrrl export config (format {payload.get('format')!r})")
    return payload


def load_exported_model(model_dir: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    """The denoiser (as :class:`LoadedDiffusion`) and VQGAN of an exported model folder, without pickle."""
    from safetensors.torch import load_file

    from mrrl.vqgan.networks import VQGAN

    model_dir = Path(model_dir)
    diffusion_cfg = _read_json(model_dir / f"{DIFFUSION_FILE}.json")
    vqgan_cfg = _read_json(model_dir / f"{VQGAN_FILE}.json")
    hparams = diffusion_cfg["hyper_parameters"]
    denoiser = denoiser_from_hparams(hparams)
    denoiser.unet.load_state_dict(load_file(str(model_dir / f"{DIFFUSION_FILE}.safetensors")))
    vqgan = VQGAN(**vqgan_cfg["net"], in_channels=int(vqgan_cfg["in_channels"]))
    vqgan.load_state_dict(load_file(str(model_dir / f"{VQGAN_FILE}.safetensors")))
    loaded = LoadedDiffusion(
        denoiser=denoiser.to(device).eval().requires_grad_(False),
        scale_factor=float(diffusion_cfg["scale_factor"]),
        class_names=list(diffusion_cfg["class_names"]),
        vqgan_ckpt=None,
        latent_shape=tuple(int(s) for s in diffusion_cfg["latent_shape"]),  # type: ignore[arg-type]
        hparams=hparams,
    )
    return ExportedModel(loaded, vqgan.eval().requires_grad_(False).to(device), diffusion_cfg)

"""Load a trained VQGAN without Lightning, and the dataset's latent cache that the diffusion stage reads.

The whole dataset is encoded once with the frozen VQGAN into ``latents.pt``; the file records which
checkpoint and which preprocessed data/split produced it, and is rebuilt only when one of those changes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mrrl.errors import ManifestError
from mrrl.utils.checkpoints import safe_load
from mrrl.utils.io import atomic_path, file_identity

log = logging.getLogger(__name__)

LATENT_FILE = "latents.pt"


def load_vqgan(ckpt_path: str | Path, device: str | torch.device = "cpu"):
    """The frozen generator (``mrrl.vqgan.networks.VQGAN``, eval mode) from a ``stage=vqgan`` Lightning checkpoint."""
    from mrrl.vqgan.networks import VQGAN

    ckpt = safe_load(ckpt_path)
    hparams = ckpt.get("hyper_parameters", {})
    if "net" not in hparams:
        raise ManifestError(f"{ckpt_path} is not a VQGAN checkpoint (no 'net' hyper-parameters)")
    net = VQGAN(**dict(hparams["net"]), in_channels=int(hparams["image_shape"][0]))
    prefix = "vqgan."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    return net.eval().requires_grad_(False).to(device)


def latent_cache_key(ckpt_path: str | Path, datamodule) -> dict[str, Any]:
    split_file = Path(datamodule.split_file or datamodule.split_path)
    return {
        "checkpoint": file_identity(ckpt_path),
        "data_cache": str(Path(datamodule.cache.dir).resolve()),
        "split_sha1": hashlib.sha1(split_file.read_bytes()).hexdigest(),
    }


@torch.no_grad()
def encode_dataset(
    vqgan, datamodule, batch_size: int = 8, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Encode every subject of every split: latents ``[N, C, d, h, w]`` (float32, CPU), ids, labels, splits."""
    latents, ids, labels, splits = [], [], [], []
    for split in ("train", "val", "test"):
        dataset = datamodule.dataset(split)
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
            z = vqgan.encode(batch["image"].to(device))
            latents.append(z.float().cpu())
            ids += list(batch["id"])
            labels.append(batch["label"])
            splits += [split] * len(batch["id"])
    return {
        "latents": torch.cat(latents),
        "labels": torch.cat(labels).long(),
        "ids": ids,
        "splits": splits,
        "class_names": datamodule.class_names,
    }


def ensure_latents(
    ckpt_path: str | Path,
    datamodule,
    out_path: str | Path,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> Path:
    """Return ``out_path``, (re)building it only when the checkpoint or the data/split changed."""
    out_path = Path(out_path)
    key = latent_cache_key(ckpt_path, datamodule)
    if out_path.is_file():
        try:
            cached_key = safe_load(out_path).get("key")
        except Exception:  # a damaged cache is rebuilt, never trusted
            cached_key = None
        if cached_key == key:
            return out_path
    log.info("encoding the dataset with %s into %s", ckpt_path, out_path)
    payload = encode_dataset(load_vqgan(ckpt_path, device), datamodule, batch_size, device)
    payload["key"] = key
    with atomic_path(out_path) as tmp:
        torch.save(payload, tmp)
    return out_path


def load_latents(path: str | Path) -> Mapping[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"latent cache {path} does not exist: run `mrrl stage=vqgan` first")
    return safe_load(path)

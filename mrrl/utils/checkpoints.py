"""Loading checkpoints without running code from them: ``safe_load``.

Every checkpoint mrrl reads (its own Lightning checkpoints, ``stage.*_ckpt`` paths, extra models and
generators, ``ema.pt``, ``latents.pt``, reward models) goes through :func:`safe_load`:
``torch.load(weights_only=True)``, which unpickles tensors, plain containers and numbers only; a pickle
that would call anything else (``os.system`` …) is refused before anything runs. Lightning's own loads
(``trainer.fit(ckpt_path=)``, ``load_from_checkpoint``) are called with ``weights_only=True`` too.

No allow-list of extra types is needed: mrrl saves hyper-parameters as plain dicts and lists
(``OmegaConf.to_container``; Lightning stores ``dict(hparams)``), and the resume state (``mrrl/resume.py``)
as tensors and numbers. Keep it so: an OmegaConf object in ``save_hyperparameters`` would make every
checkpoint unloadable here (the resume tests load each stage's ``last.ckpt`` with plain ``weights_only``).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from mrrl.errors import ManifestError


class CheckpointError(ManifestError):
    """A checkpoint that cannot be used: unsafe (would run code), damaged, or not a checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """The file's pickle names a type or function that a weights-only load does not allow."""


class DamagedCheckpointError(CheckpointError):
    """The file is truncated, empty or not a PyTorch checkpoint."""


def safe_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file.

    ``mmap``: map the tensors instead of reading them (a cheap check that the file opens and unpickles).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:
        raise classify_load_error(path, exc) from exc


def classify_load_error(path: Path, exc: BaseException) -> CheckpointError:
    """The one-line error for a failed weights-only load of ``path``."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text) if isinstance(exc, pickle.UnpicklingError) else None
    if found:  # the weights-only unpickler met a callable or class it does not allow
        what = f"`{found.group(1)}`"
        return UnsafeCheckpointError(
            f"refusing to load {path}: its pickle calls {what}, which could run code; mrrl loads only "
            "tensors and plain values (if you trust the file, re-save just its state_dict with torch.save)"
        )
    reason = text.splitlines()[0] if text else type(exc).__name__
    return DamagedCheckpointError(
        f"checkpoint {path} is damaged (truncated?) or not a PyTorch checkpoint: {type(exc).__name__}: {reason}"
    )

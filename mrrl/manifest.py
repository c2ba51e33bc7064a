"""Stage manifests: the small JSON each stage writes last, and the next stage reads to find its inputs.

A manifest is written atomically and only when the stage has finished, so its presence with
``status == "complete"`` means every file it names is complete. :func:`resolve_checkpoint` is how a stage
finds the checkpoint it reads: the path given in its config, else the upstream stage's manifest.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mrrl.errors import ManifestError, MissingPathError
from mrrl.utils.io import atomic_write_json

MANIFEST_NAME = "manifest.json"
# The stages whose manifests make an experiment, in pipeline order (the registry in mrrl/stages maps each
# name to its script; the report reads the manifests in this order). Export runs on demand only.
PIPELINE_STAGES = ("check_data", "vqgan", "diffusion", "reward_data", "reward", "ppo", "evaluate", "classify")
ON_DEMAND_STAGES = ("export",)

# The checkpoints a stage's manifest offers to the next stages, preferred first (ema.pt holds EMA weights only).
CHECKPOINT_KEYS: dict[str, tuple[str, ...]] = {
    "vqgan": ("best_ckpt", "last_ckpt"),
    "diffusion": ("ema_ckpt", "best_ckpt", "last_ckpt"),
    "ppo": ("final_ckpt", "last_ckpt"),
}


def write_manifest(run_dir: str | Path, stage: str, outputs: Mapping[str, Any], config: Any = None) -> Path:
    import torch

    import mrrl

    payload = {
        "stage": stage,
        "status": "complete",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_dir": str(Path(run_dir).resolve()),
        "versions": {
            "mrrl": mrrl.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "outputs": dict(outputs),
    }
    if config is not None:
        from omegaconf import OmegaConf

        payload["config"] = (
            OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config
        )
    return atomic_write_json(Path(run_dir) / MANIFEST_NAME, payload)


def manifest_path(experiment_dir: str | Path, stage: str) -> Path:
    return Path(experiment_dir) / stage / MANIFEST_NAME


def is_complete(run_dir: str | Path) -> bool:
    path = Path(run_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text()).get("status") == "complete"
    except (OSError, json.JSONDecodeError):
        return False


def read_manifest(experiment_dir: str | Path, stage: str, hint: str | None = None) -> dict[str, Any]:
    """Read ``<experiment_dir>/<stage>/manifest.json``; a missing/incomplete one says how to produce it."""
    path = manifest_path(experiment_dir, stage)
    how = hint or f"run `mrrl stage={stage}` with the same experiment first"
    if not path.is_file():
        raise ManifestError(f"no {stage} manifest at {path}: {how}")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}): rerun the {stage} stage") from exc
    if payload.get("status") != "complete":
        raise ManifestError(f"{path} says the {stage} stage did not finish: {how}")
    return payload


def try_read_manifest(experiment_dir: str | Path, stage: str) -> tuple[dict[str, Any] | None, str]:
    """``(manifest, "")`` when the stage finished, else ``(None, why)`` — ``why`` completes "the stage …"
    (``has not run``, ``did not finish``, ``has an unreadable manifest (…)``). For readers that show what
    exists instead of failing (the report)."""
    path = manifest_path(experiment_dir, stage)
    if not path.is_file():
        return None, "has not run"
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"has an unreadable manifest ({exc})"
    if not isinstance(payload, dict):
        return None, f"has an unreadable manifest (a JSON {type(payload).__name__}, not an object)"
    if payload.get("status") != "complete":
        return None, "did not finish"
    return payload, ""


def resolve_checkpoint(
    value: str | Path | None,
    experiment_dir: str | Path,
    stage: str,
    option: str,
    keys: Sequence[str] | None = None,
) -> str:
    """The checkpoint a stage reads: ``value`` (a path from the config, e.g. ``stage.vqgan_ckpt``) if given,
    else the first of ``keys`` (default ``CHECKPOINT_KEYS[stage]``) that ``stage``'s manifest names.

    ``option`` is the config key of ``value``; every error is one line naming it and the command to run:
    :class:`~mrrl.errors.MissingPathError` for a given path that does not exist, ``ManifestError`` for a
    missing or unfinished manifest and for a manifest whose checkpoint is gone.
    """
    keys = CHECKPOINT_KEYS[stage] if keys is None else keys
    if value:
        path = Path(str(value)).expanduser()
        if not path.is_file():
            raise MissingPathError(
                f"{option}={value} does not exist: pass the path of a `mrrl stage={stage}` checkpoint "
                f"(e.g. <run>/{stage}/checkpoints/best.ckpt)"
            )
        return str(path)
    how = f"run `mrrl stage={stage}` with the same experiment first, or pass {option}=<path>"
    outputs = read_manifest(experiment_dir, stage, hint=how)["outputs"]
    where = manifest_path(experiment_dir, stage)
    for key in keys:
        if outputs.get(key):
            path = Path(outputs[key])
            if not path.is_file():
                raise ManifestError(
                    f"{where} names {key}={path}, which does not exist: rerun `mrrl stage={stage}` "
                    f"or pass {option}=<path>"
                )
            return str(path)
    raise ManifestError(
        f"{where} names no checkpoint (looked for {', '.join(keys)}): rerun `mrrl stage={stage}` "
        f"or pass {option}=<path>"
    )

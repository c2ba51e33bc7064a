"""Atomic file writes: a crash never leaves a half-written file that a later stage would trust."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it is renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(
                tmp_path, 0o666 & ~_UMASK
            )  # mkstemp makes 0600 files; others on a cluster must read them
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    return atomic_write_text(
        path, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    # np.save appends ".npy" to names without it, so keep the suffix on the temp file.
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


def read_metrics_csv(log_dir: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a stage's CSV log, earlier segments (kept when a run resumed) first."""
    import csv

    log_dir = Path(log_dir)
    parts = sorted(log_dir.glob("metrics.part*.csv"), key=lambda p: int(p.stem.split("part")[-1]))
    rows: list[dict[str, str]] = []
    for path in [*parts, log_dir / "metrics.csv"]:
        if path.is_file():
            with path.open(newline="") as handle:
                rows += list(csv.DictReader(handle))
    return rows


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN/Inf float (nested in mappings and sequences) replaced by None: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_normalise(obj: Any) -> Any:
    """``obj`` as it reads back from sorted-key JSON (tuples → lists, paths → str): comparable with a stored key."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What tells a file apart from a replaced one (resolved path, size, mtime): part of cache keys."""
    path = Path(path)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

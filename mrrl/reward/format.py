"""The reward dataset format: file names, columns, the error type and small helpers (see ``dataset.py``)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrrl.errors import MrrlError

FORMAT_VERSION = 1
VOLUMES_FILE = "volumes.npy"
MANIFEST_FILE = "manifest.csv"
GROUPS_FILE = "groups.csv"
META_FILE = "reward_data.json"
STATE_FILE = "writer_state.json"
TRAJECTORIES = ("synthetic", "reconstruction", "fade")
DTYPES = ("float16", "float32")
MANIFEST_COLUMNS = (
    "index",
    "id",
    "class",
    "label",
    "trajectory",
    "steps",
    "group",
    "group_fid",
    "reward",
    "source_id",
)
GROUP_COLUMNS = ("group", "trajectory", "steps", "class", "label", "count", "fid", "reward")
HINT = "produce it with `mrrl stage=reward_data` (or point stage.dataset_dir at a finished reward dataset)"


class RewardDataError(MrrlError, ValueError):
    """The reward dataset on disk (or being written) is missing, incomplete or inconsistent."""


def group_name(trajectory: str, steps: int, class_name: str) -> str:
    """The canonical group name, e.g. ``synthetic-50-HGG``."""
    return f"{trajectory}-{int(steps)}-{class_name}"


# ---------------------------------------------------------------------------------------------- npy helpers


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int, int]:
    """(shape, dtype, header start, data offset) of a ``.npy`` file."""
    with path.open("rb") as fh:
        version = np.lib.format.read_magic(fh)
        start = fh.tell() + (2 if version == (1, 0) else 4)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        if fortran:
            raise RewardDataError(f"{path} is Fortran-ordered; expected a C-ordered array")
        return tuple(shape), dtype, start, fh.tell()


def resize_npy(path: Path, rows: int) -> None:
    """Change the first dimension of a ``.npy`` in place (header rewrite + truncate/extend), no copy.

    numpy pads headers with room for the shape to grow, so the new header fits in the old one.
    """
    shape, dtype, start, offset = npy_header(path)
    if shape[0] == rows:
        return
    header = repr(
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, *shape[1:])}
    )
    space = offset - start
    if len(header) + 1 > space:
        raise RewardDataError(f"cannot resize {path} in place to {rows} rows (header too small)")
    with path.open("r+b") as fh:
        fh.seek(start)
        fh.write((header.ljust(space - 1) + "\n").encode("latin1"))
    os.truncate(path, offset + rows * int(np.prod(shape[1:])) * dtype.itemsize)


def as_numpy(volumes: Any) -> np.ndarray:
    if isinstance(volumes, torch.Tensor):
        return volumes.detach().to("cpu", torch.float32).numpy()
    return np.asarray(volumes, dtype=np.float32)


def csv_text(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return buffer.getvalue()

"""The reward dataset on disk: written by ``stage=reward_data``, read by ``stage=reward``.

A directory holding

- ``volumes.npy``: ``[N, C, D, H, W]`` float16 (or float32) in [-1, 1], a plain ``.npy`` (no pickles) read
  memory-mapped, so a dataset larger than RAM trains fine and DataLoader workers share the page cache;
- ``manifest.csv``: one row per volume (:data:`MANIFEST_COLUMNS`); ``index`` is its row in ``volumes.npy``;
- ``groups.csv``: one row per (trajectory, steps, class) group with its size, FID and reward;
- ``reward_data.json``: metadata (format version, image shape, dtype, class names, counts, and whatever
  the producer adds: FID extractor, reward map, ...). Written last: its presence means the rest is complete;
- ``writer_state.json``: the writer's journal (what is written, which groups are complete), used to resume.

:class:`RewardDatasetWriter` appends volumes durably (the array is flushed before the journal names the
rows), so an interrupted producer reopens the directory and continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mrrl.reward.format import (
    FORMAT_VERSION,
    GROUP_COLUMNS,
    GROUPS_FILE,
    HINT,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    META_FILE,
    STATE_FILE,
    VOLUMES_FILE,
    RewardDataError,
    group_name,
    npy_header,
)
from mrrl.reward.writer import RewardDatasetWriter

__all__ = ["RewardDataError", "RewardDataset", "RewardDatasetWriter", "group_name", "load_reward_dataset"]

# ---------------------------------------------------------------------------------------------- reader


class RewardDataset(Dataset):
    """Volumes of a reward dataset with their rewards; items are dicts (``image``, ``reward``, ``group``, ...).

    ``volumes.npy`` is opened memory-mapped on first access (also in each DataLoader worker: the map is
    not pickled). ``group`` is the index of the volume's group in :attr:`group_names`, shared by subsets.
    """

    def __init__(
        self, root: Path, meta: dict[str, Any], rows: list[dict[str, Any]], groups: list[dict[str, Any]]
    ):
        self.root = Path(root)
        self.meta = meta
        self.rows = rows
        self.groups = groups
        self.group_names = [g["group"] for g in groups]
        self._group_of = {name: i for i, name in enumerate(self.group_names)}
        self._volumes: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------ access
    @property
    def volumes(self) -> np.ndarray:
        """The whole ``[N, C, D, H, W]`` array, memory-mapped read-only (rows of other subsets included)."""
        if self._volumes is None:
            self._volumes = np.load(self.root / VOLUMES_FILE, mmap_mode="r", allow_pickle=False)
        return self._volumes

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["image_shape"])

    @property
    def rewards(self) -> np.ndarray:
        return np.array([r["reward"] for r in self.rows], dtype=np.float32)

    @property
    def group_ids(self) -> np.ndarray:
        return np.array([self._group_of[r["group"]] for r in self.rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        image = torch.from_numpy(np.array(self.volumes[row["index"]], dtype=np.float32))
        return {
            "image": image,
            "reward": torch.tensor(row["reward"], dtype=torch.float32),
            "label": torch.tensor(row["label"]),
            "group": torch.tensor(self._group_of[row["group"]]),
            "index": torch.tensor(row["index"]),
        }

    def subset(self, ids: Sequence[str]) -> RewardDataset:
        """The volumes with these ids (in this order); shares the memory map's file, not its pages."""
        by_id = {r["id"]: r for r in self.rows}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise RewardDataError(
                f"{len(unknown)} id(s) not in the reward dataset at {self.root}, e.g. {unknown[:3]}"
            )
        return RewardDataset(self.root, self.meta, [by_id[i] for i in ids], self.groups)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_volumes"] = None  # reopen the map in the worker instead of pickling its contents
        return state


def load_reward_dataset(root: str | Path) -> RewardDataset:
    """Open and validate a finished reward dataset; every problem is a :class:`RewardDataError` saying what to do."""
    root = Path(root)
    if not root.is_dir():
        raise RewardDataError(f"reward dataset directory {root} does not exist: {HINT}")
    missing = [n for n in (VOLUMES_FILE, MANIFEST_FILE, GROUPS_FILE, META_FILE) if not (root / n).is_file()]
    if missing:
        unfinished = (
            " (writing was not finished: rerun reward_data to resume it)"
            if (root / STATE_FILE).is_file()
            else ""
        )
        raise RewardDataError(f"reward dataset {root} lacks {', '.join(missing)}{unfinished}: {HINT}")
    try:
        meta = json.loads((root / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise RewardDataError(f"{root / META_FILE} is not valid JSON ({exc}): {HINT}") from exc
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise RewardDataError(
            f"{root} uses reward dataset format {meta['format_version']}; this mrrl reads "
            f"≤ {FORMAT_VERSION}: upgrade mrrl"
        )
    image_shape = tuple(int(s) for s in meta.get("image_shape", ()))
    try:
        shape, dtype, _, _ = npy_header(root / VOLUMES_FILE)
    except (ValueError, OSError) as exc:
        raise RewardDataError(f"{root / VOLUMES_FILE} is not a readable .npy array ({exc}): {HINT}") from exc
    if len(shape) != 5 or tuple(shape[1:]) != image_shape or dtype.kind != "f":
        raise RewardDataError(
            f"{root / VOLUMES_FILE} has shape {list(shape)} ({dtype}) but {META_FILE} says "
            f"[N, {', '.join(map(str, image_shape))}] floats: the files do not belong together"
        )
    expected_size = 0 if not shape else int(np.prod(shape)) * dtype.itemsize
    if (root / VOLUMES_FILE).stat().st_size < expected_size:
        raise RewardDataError(f"{root / VOLUMES_FILE} is truncated: rerun reward_data")
    rows = _read_manifest_rows(root / MANIFEST_FILE, n_volumes=shape[0])
    groups = _read_groups(root / GROUPS_FILE)
    names = {g["group"] for g in groups}
    unknown = sorted({r["group"] for r in rows} - names)
    if unknown:
        raise RewardDataError(
            f"{root / MANIFEST_FILE} names group(s) {unknown} that {GROUPS_FILE} does not list"
        )
    used = [g for g in groups if any(r["group"] == g["group"] for r in rows)]
    if len(used) < 2:
        raise RewardDataError(
            f"reward dataset {root} has {len(used)} group(s); reward models need at least 2 "
            "groups of different quality: generate more steps/trajectories in reward_data"
        )
    if len({r["reward"] for r in rows}) < 2:
        raise RewardDataError(f"every volume in {root} has the same reward: nothing to learn from")
    return RewardDataset(root, meta, rows, used)


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        absent = [c for c in columns if c not in (reader.fieldnames or [])]
        if absent:
            raise RewardDataError(f"{path} lacks column(s) {absent}")
        return list(reader)


def _read_manifest_rows(path: Path, n_volumes: int) -> list[dict[str, Any]]:
    rows = []
    for line, raw in enumerate(_read_csv(path, MANIFEST_COLUMNS), start=2):
        try:
            row = {
                "index": int(raw["index"]),
                "id": raw["id"],
                "class": raw["class"],
                "label": int(raw["label"]),
                "trajectory": raw["trajectory"],
                "steps": int(raw["steps"]),
                "group": raw["group"],
                "group_fid": float(raw["group_fid"]) if raw["group_fid"] else None,
                "reward": float(raw["reward"]),
                "source_id": raw["source_id"] or "",
            }
        except ValueError as exc:
            raise RewardDataError(f"{path} line {line}: {exc}") from exc
        if not math.isfinite(row["reward"]):
            raise RewardDataError(
                f"{path} line {line}: reward of {row['id']} is {raw['reward']}; every volume needs "
                "a finite reward (was a group's FID NaN?)"
            )
        if not 0 <= row["index"] < n_volumes:
            raise RewardDataError(
                f"{path} line {line}: index {row['index']} outside volumes.npy (N={n_volumes})"
            )
        rows.append(row)
    if not rows:
        raise RewardDataError(f"{path} lists no volumes")
    for key in ("index", "id"):
        if len({r[key] for r in rows}) != len(rows):
            raise RewardDataError(f"{path}: column {key!r} has duplicates")
    return rows


def _read_groups(path: Path) -> list[dict[str, Any]]:
    groups = []
    for line, raw in enumerate(_read_csv(path, GROUP_COLUMNS), start=2):
        try:
            groups.append(
                {
                    "group": raw["group"],
                    "trajectory": raw["trajectory"],
                    "steps": int(raw["steps"]),
                    "class": raw["class"],
                    "label": int(raw["label"]),
                    "count": int(raw["count"]),
                    "fid": float(raw["fid"]) if raw["fid"] else None,
                    "reward": float(raw["reward"]),
                }
            )
        except ValueError as exc:
            raise RewardDataError(f"{path} line {line}: {exc}") from exc
    return groups

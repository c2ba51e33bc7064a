"""Writing a reward dataset: :class:`RewardDatasetWriter` (durable appends, resumable, atomic finalisation)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrrl.reward.format import (
    DTYPES,
    FORMAT_VERSION,
    GROUP_COLUMNS,
    GROUPS_FILE,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    META_FILE,
    STATE_FILE,
    TRAJECTORIES,
    VOLUMES_FILE,
    RewardDataError,
    as_numpy,
    csv_text,
    group_name,
    npy_header,
    resize_npy,
)
from mrrl.utils.io import atomic_write_json, atomic_write_text


class RewardDatasetWriter:
    """Append volumes and their rows to a reward dataset directory; resumable; :meth:`finalize` at the end.

    ``add(volumes, rows)`` commits one batch (any groups); ``mark_complete(group)`` declares a group done.
    ``add_group(group, volumes, rows)`` does both for a whole group at once, and skips a group that an
    earlier (interrupted) run already completed. Reopening a directory resumes from its journal: rows
    written before are kept (``count(group)`` says how many), completed groups are known.
    Volumes are clipped to [-1, 1] (decoders overshoot slightly); NaN/Inf voxels are an error.
    """

    def __init__(
        self,
        root: str | Path,
        image_shape: Sequence[int],
        capacity: int,
        dtype: str = "float16",
        overwrite: bool = False,
    ):
        if str(dtype) not in DTYPES:
            raise RewardDataError(f"reward dataset dtype must be one of {DTYPES}, got {dtype!r}")
        if len(image_shape) != 4:
            raise RewardDataError(f"image_shape must be [C, D, H, W], got {list(image_shape)}")
        self.root = Path(root)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.capacity = int(capacity)
        self.dtype = str(dtype)
        self.root.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in (META_FILE, STATE_FILE, MANIFEST_FILE, GROUPS_FILE, VOLUMES_FILE):
                (self.root / name).unlink(missing_ok=True)
        self._rows: list[dict[str, Any]] = []
        self._completed: list[str] = []
        self._load_state()
        if self.capacity < len(self._rows):
            raise RewardDataError(
                f"capacity {self.capacity} < {len(self._rows)} volumes already in {self.root}"
            )
        self._mm: np.memmap | None = None
        self._open()

    # -------------------------------------------------------------------------------------- state
    @property
    def _state_path(self) -> Path:
        return self.root / STATE_FILE

    def _load_state(self) -> None:
        if not self._state_path.is_file():
            return
        try:
            state = json.loads(self._state_path.read_text())
        except json.JSONDecodeError as exc:
            raise RewardDataError(
                f"{self._state_path} is corrupt ({exc}): pass overwrite=True to start over"
            ) from exc
        if tuple(state["image_shape"]) != self.image_shape or state["dtype"] != self.dtype:
            raise RewardDataError(
                f"{self.root} holds a reward dataset of shape {state['image_shape']} ({state['dtype']}), not "
                f"{list(self.image_shape)} ({self.dtype}): use another directory or overwrite=True"
            )
        self._rows = list(state["rows"])
        self._completed = list(state["completed"])

    def _save_state(self) -> None:
        atomic_write_json(
            self._state_path,
            {
                "format_version": FORMAT_VERSION,
                "image_shape": list(self.image_shape),
                "dtype": self.dtype,
                "completed": self._completed,
                "rows": self._rows,
            },
        )

    def _open(self) -> None:
        path = self.root / VOLUMES_FILE
        shape = (self.capacity, *self.image_shape)
        if path.is_file():
            old_shape, old_dtype, _, _ = npy_header(path)
            if tuple(old_shape[1:]) != self.image_shape or old_dtype != np.dtype(self.dtype):
                raise RewardDataError(
                    f"{path} has shape {old_shape} ({old_dtype}), expected {shape} ({self.dtype})"
                )
            resize_npy(path, self.capacity)  # finalize() shrank it, or capacity changed
            self._mm = np.lib.format.open_memmap(path, mode="r+")
        else:
            self._mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(self.dtype), shape=shape)

    # -------------------------------------------------------------------------------------- queries
    @property
    def num_written(self) -> int:
        return len(self._rows)

    @property
    def completed_groups(self) -> list[str]:
        return list(self._completed)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows]

    def count(self, group: str) -> int:
        return sum(1 for r in self._rows if r["group"] == group)

    def is_complete(self, group: str) -> bool:
        return group in self._completed

    # -------------------------------------------------------------------------------------- writing
    def _normalise_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        missing = [k for k in ("id", "class", "label", "trajectory", "steps") if k not in row]
        if missing:
            raise RewardDataError(f"reward dataset row {dict(row)} lacks {missing}")
        if row["trajectory"] not in TRAJECTORIES:
            raise RewardDataError(f"trajectory must be one of {TRAJECTORIES}, got {row['trajectory']!r}")
        out = {
            "id": str(row["id"]),
            "class": str(row["class"]),
            "label": int(row["label"]),
            "trajectory": str(row["trajectory"]),
            "steps": int(row["steps"]),
            "group": str(row.get("group") or group_name(row["trajectory"], row["steps"], row["class"])),
            "source_id": str(row.get("source_id") or ""),
        }
        return out

    def add(self, volumes: Any, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """Append a batch ``[B, C, D, H, W]`` with its ``B`` rows; returns their indices in ``volumes.npy``."""
        array = as_numpy(volumes)
        if array.ndim != 5 or tuple(array.shape[1:]) != self.image_shape:
            raise RewardDataError(
                f"expected volumes [B, {', '.join(map(str, self.image_shape))}], got {list(array.shape)}"
            )
        if len(rows) != array.shape[0]:
            raise RewardDataError(f"{array.shape[0]} volumes but {len(rows)} rows")
        if not np.isfinite(array).all():
            raise RewardDataError(
                "volumes contain NaN/Inf voxels: refusing to write them to the reward dataset"
            )
        new = [self._normalise_row(r) for r in rows]
        done = sorted({r["group"] for r in new} & set(self._completed))
        if done:
            raise RewardDataError(f"group(s) {done} are already complete in {self.root}")
        seen, dup = {r["id"] for r in self._rows}, []
        for r in new:
            if r["id"] in seen:
                dup.append(r["id"])
            seen.add(r["id"])
        if dup:
            raise RewardDataError(f"duplicate volume id(s) {dup[:5]}: ids must be unique in a reward dataset")
        start = len(self._rows)
        if start + len(new) > self.capacity:
            raise RewardDataError(
                f"reward dataset capacity {self.capacity} exceeded ({start} + {len(new)} volumes)"
            )
        if self._mm is None:
            self._open()
        assert self._mm is not None
        self._mm[start : start + len(new)] = np.clip(array, -1.0, 1.0).astype(self.dtype)
        self._mm.flush()  # data first, then the journal that names it
        for offset, row in enumerate(new):
            row["index"] = start + offset
        self._rows.extend(new)
        self._save_state()
        return [r["index"] for r in new]

    def mark_complete(self, *groups: str) -> None:
        for group in groups:
            if self.count(group) == 0:
                raise RewardDataError(f"group {group!r} has no volumes: cannot mark it complete")
            if group not in self._completed:
                self._completed.append(group)
        self._save_state()

    def add_group(self, group: str, volumes: Any, rows: Sequence[Mapping[str, Any]]) -> bool:
        """Write a whole group and mark it complete; ``False`` (nothing written) if it already was."""
        if self.is_complete(group):
            return False
        if self.count(group):
            raise RewardDataError(
                f"group {group!r} already has {self.count(group)} volumes from add(): "
                "finish it with add() and mark_complete()"
            )
        self.add(volumes, [{**r, "group": group} for r in rows])
        self.mark_complete(group)
        return True

    def finalize(
        self,
        groups_table: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``manifest.csv``, ``groups.csv`` and (last) ``reward_data.json``; shrink ``volumes.npy`` to N rows.

        ``groups_table`` gives each group's ``fid`` and ``reward`` (mapping group → fields, or rows with
        a ``group`` key). Every group with volumes must be complete and have a finite reward.
        """
        table = _group_table(groups_table)
        written = list(dict.fromkeys(r["group"] for r in self._rows))
        if not written:
            raise RewardDataError(f"nothing was written to {self.root}")
        pending = [g for g in written if g not in self._completed]
        if pending:
            raise RewardDataError(
                f"group(s) {pending} are not complete: mark_complete() them or finish writing"
            )
        missing = [g for g in written if g not in table]
        extra = [g for g in table if g not in written]
        if missing or extra:
            raise RewardDataError(
                f"groups table does not match the volumes written: missing {missing}, without volumes {extra}"
            )
        bad = [g for g in written if not _finite(table[g].get("reward"))]
        if bad:
            raise RewardDataError(f"reward is NaN/missing for group(s) {bad}")
        groups, manifest = [], []
        for g in written:
            rows = [r for r in self._rows if r["group"] == g]
            fid = table[g].get("fid")
            fid = float(fid) if _finite(fid) else None
            groups.append(
                {
                    "group": g,
                    "trajectory": rows[0]["trajectory"],
                    "steps": rows[0]["steps"],
                    "class": rows[0]["class"],
                    "label": rows[0]["label"],
                    "count": len(rows),
                    "fid": fid,
                    "reward": float(table[g]["reward"]),
                }
            )
        by_group = {g["group"]: g for g in groups}
        for r in self._rows:
            manifest.append(
                {**r, "group_fid": by_group[r["group"]]["fid"], "reward": by_group[r["group"]]["reward"]}
            )
        if self._mm is not None:
            self._mm.flush()
            self._mm = None  # close before resizing the file under it
        resize_npy(self.root / VOLUMES_FILE, len(self._rows))
        atomic_write_text(self.root / MANIFEST_FILE, csv_text(MANIFEST_COLUMNS, manifest))
        atomic_write_text(self.root / GROUPS_FILE, csv_text(GROUP_COLUMNS, groups))
        labels = {r["class"]: r["label"] for r in self._rows}
        user_meta = dict(meta or {})
        class_names = user_meta.pop("class_names", None) or [
            c for c, _ in sorted(labels.items(), key=lambda x: x[1])
        ]
        payload = {
            "format_version": FORMAT_VERSION,
            **user_meta,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "image_shape": list(self.image_shape),
            "dtype": self.dtype,
            "class_names": list(class_names),
            "num_volumes": len(self._rows),
            "num_groups": len(groups),
            "counts": {
                "per_group": {g["group"]: g["count"] for g in groups},
                "per_trajectory": _counts(r["trajectory"] for r in self._rows),
                "per_class": _counts(r["class"] for r in self._rows),
            },
            "files": {"volumes": VOLUMES_FILE, "manifest": MANIFEST_FILE, "groups": GROUPS_FILE},
        }
        return atomic_write_json(self.root / META_FILE, payload)


def _finite(value: Any) -> bool:
    try:
        return value is not None and value != "" and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _group_table(
    table: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    if isinstance(table, Mapping):
        return {str(g): dict(v) for g, v in table.items()}
    return {str(row["group"]): dict(row) for row in table}

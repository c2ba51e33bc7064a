"""Train/validation hold-out for the reward regressors, seeded and aware of where volumes come from.

``within_group`` (default) holds out about ``val_fraction`` of every group. Reconstructions of the same
real subject (same ``source_id``) are near-copies of one anatomy at different noise levels, so a subject
is held out as a whole, in every group at once: no anatomy is seen in training and scored in validation.
Synthetic volumes (no source) are held out per group. Both draws are stratified (per class for
subjects, per group for samples) with independent seeded streams.

``whole_groups`` holds out entire groups instead (never the best or the worst one, so validation asks
the models to interpolate the reward scale rather than extrapolate it): it measures whether the
regressors generalise to unseen noise levels.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mrrl.errors import ConfigError
from mrrl.utils.io import atomic_write_json

SPLIT_MODES = ("within_group", "whole_groups")
SPLIT_FILE = "split.json"


def _n_val(n: int, fraction: float) -> int:
    if n < 2:
        return 0
    return min(max(round(n * fraction), 1), n - 1)


def split_reward_rows(
    rows: Sequence[Mapping[str, Any]], mode: str = "within_group", val_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[str]]:
    """``{"train": ids, "val": ids}`` (ids in dataset order) for rows with ``id, group, class, source_id, reward``."""
    if mode not in SPLIT_MODES:
        raise ConfigError(f"stage.split must be one of {SPLIT_MODES}, got {mode!r}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"stage.val_fraction must be in (0, 1), got {val_fraction}")
    val = (
        _whole_groups(rows, val_fraction, seed)
        if mode == "whole_groups"
        else _within_group(rows, val_fraction, seed)
    )
    return {
        "train": [r["id"] for r in rows if r["id"] not in val],
        "val": [r["id"] for r in rows if r["id"] in val],
    }


def _within_group(rows: Sequence[Mapping[str, Any]], fraction: float, seed: int) -> set[str]:
    source_class: dict[str, str] = {}
    for r in rows:
        if r["source_id"]:
            source_class.setdefault(r["source_id"], r["class"])
    val_sources: set[str] = set()
    for cls in sorted(set(source_class.values())):
        sources = sorted(s for s, c in source_class.items() if c == cls)
        random.Random(f"{seed}:source:{cls}").shuffle(sources)
        val_sources.update(sources[: _n_val(len(sources), fraction)])
    val = {r["id"] for r in rows if r["source_id"] in val_sources}
    for group in sorted({r["group"] for r in rows if not r["source_id"]}):
        ids = sorted(r["id"] for r in rows if r["group"] == group and not r["source_id"])
        random.Random(f"{seed}:group:{group}").shuffle(ids)
        val.update(ids[: _n_val(len(ids), fraction)])
    return val


def _whole_groups(rows: Sequence[Mapping[str, Any]], fraction: float, seed: int) -> set[str]:
    reward = {r["group"]: float(r["reward"]) for r in rows}
    groups = sorted(reward, key=lambda g: (-reward[g], g))
    if len(groups) < 4:
        raise ConfigError(
            f"stage.split=whole_groups needs at least 4 groups (2 to train on, 2 to rank in validation); the "
            f"dataset has {len(groups)}: use stage.split=within_group"
        )
    n_val = min(max(round(len(groups) * fraction), 2), len(groups) - 2)
    interior = groups[1:-1]
    random.Random(f"{seed}:whole_groups").shuffle(interior)
    held = set(interior[:n_val])
    return {r["id"] for r in rows if r["group"] in held}


def ensure_split(
    run_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    mode: str,
    val_fraction: float,
    seed: int,
    dataset_dir: str | Path,
    write: bool = True,
    force: bool = False,
) -> dict[str, list[str]]:
    """The split of this run: computed, written to ``<run_dir>/split.json`` and checked against an earlier one.

    A resumed run must train on the split it started with; if the dataset or the split settings changed
    since, that is an error unless ``force`` (retraining from scratch) is set.
    """
    split = split_reward_rows(rows, mode, val_fraction, seed)
    path = Path(run_dir) / SPLIT_FILE
    if path.is_file() and not force:
        old = json.loads(path.read_text())
        if old.get("train") != split["train"] or old.get("val") != split["val"]:
            raise ConfigError(
                f"{path} holds a different split (dataset or stage.split/val_fraction/seed changed since these "
                "models were trained): use stage.force=true to retrain, or another experiment_name"
            )
    if write:
        groups_val = sorted({r["group"] for r in rows if r["id"] in set(split["val"])})
        atomic_write_json(
            path,
            {
                "mode": mode,
                "val_fraction": val_fraction,
                "seed": seed,
                "dataset_dir": str(Path(dataset_dir).resolve()),
                "num_train": len(split["train"]),
                "num_val": len(split["val"]),
                "val_groups": groups_val,
                **split,
            },
        )
    return split

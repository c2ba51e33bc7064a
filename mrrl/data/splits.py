"""Stratified, seeded train/val/test splits as in the paper's Table 1, written to disk and reused.

The paper holds out 30 test subjects per class and trains on the rest; a validation fraction is carved
from the training subjects of each class. The split file lives in the experiment directory so every
stage of an experiment sees the same subjects; a user-given file (JSON or CSV) overrides it.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from mrrl.data.layouts import Subject
from mrrl.errors import MrrlError
from mrrl.utils.io import atomic_write_json

SPLITS = ("train", "val", "test")


class SplitError(MrrlError, ValueError):
    """The split file or split settings do not fit the dataset."""


def make_splits(
    subjects: Sequence[Subject], test_per_class: int, val_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Per class: shuffle with ``seed``, take ``test_per_class`` for test, then ``val_fraction`` of the rest."""
    if not 0 <= val_fraction < 1:
        raise SplitError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[str, list[str]] = {}
    for subject in subjects:
        by_class.setdefault(subject.label, []).append(subject.id)
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for label in sorted(by_class):
        ids = sorted(by_class[label])
        if len(ids) <= test_per_class:
            raise SplitError(
                f"class {label} has {len(ids)} subjects but data.test_per_class={test_per_class}: "
                "nothing would be left to train on; lower data.test_per_class"
            )
        # Independent stream per class: adding subjects of one class never reshuffles another.
        random.Random(f"{seed}:{label}").shuffle(ids)
        test, rest = ids[:test_per_class], ids[test_per_class:]
        n_val = round(len(rest) * val_fraction)
        if val_fraction > 0:
            n_val = min(max(n_val, 1), len(rest) - 1)
        splits["test"] += test
        splits["val"] += rest[:n_val]
        splits["train"] += rest[n_val:]
    return {name: sorted(ids) for name, ids in splits.items()}


def read_split_file(path: str | Path) -> dict[str, list[str]]:
    """Read ``{"splits": {"train": [...], ...}}`` JSON (or a bare mapping) or a CSV with columns id,split."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"split file {path} does not exist")
    if path.suffix.lower() == ".csv":
        splits: dict[str, list[str]] = {name: [] for name in SPLITS}
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"id", "split"} <= set(reader.fieldnames):
                raise SplitError(f"{path}: CSV split file needs columns 'id' and 'split'")
            for row in reader:
                if row["split"] not in splits:
                    raise SplitError(f"{path}: unknown split {row['split']!r} for {row['id']} (use {SPLITS})")
                splits[row["split"]].append(row["id"])
        return splits
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SplitError(f"{path}: not valid JSON ({exc})") from exc
    raw = payload.get("splits", payload)
    if not isinstance(raw, Mapping) or not set(raw) <= set(SPLITS) or "train" not in raw:
        raise SplitError(f"{path}: expected keys among {SPLITS} (with at least 'train')")
    return {name: list(raw.get(name, [])) for name in SPLITS}


def check_splits(
    splits: Mapping[str, Sequence[str]], subjects: Sequence[Subject], source: Path | str
) -> None:
    ids = {s.id for s in subjects}
    seen: dict[str, str] = {}
    for name in SPLITS:
        for subject_id in splits.get(name, []):
            if subject_id in seen:
                raise SplitError(f"{source}: subject {subject_id} is in both {seen[subject_id]} and {name}")
            seen[subject_id] = name
    unknown = sorted(set(seen) - ids)
    if unknown:
        raise SplitError(
            f"{source}: {len(unknown)} subject(s) not in the dataset (first: {unknown[:3]}); the dataset changed "
            "since the split was written — delete the split file or pass data.split_file=<file>"
        )


def load_or_create_splits(
    subjects: Sequence[Subject],
    split_path: str | Path,
    test_per_class: int,
    val_fraction: float,
    seed: int,
    user_file: str | Path | None = None,
    dataset: str = "",
) -> dict[str, list[str]]:
    """Use ``user_file`` if given; else reuse ``split_path`` if present; else create and write it."""
    if user_file:
        splits = read_split_file(user_file)
        check_splits(splits, subjects, user_file)
        return splits
    split_path = Path(split_path)
    settings = {
        "dataset": dataset,
        "seed": seed,
        "test_per_class": test_per_class,
        "val_fraction": val_fraction,
    }
    if split_path.is_file():
        payload = json.loads(split_path.read_text())
        stored = {k: payload.get(k) for k in settings}
        if stored != settings:
            raise SplitError(
                f"{split_path} was written with {stored}, but the config asks for {settings}; every stage of an "
                "experiment must see the same split: delete the file, use another experiment name, or pass "
                "data.split_file=<file>"
            )
        splits = read_split_file(split_path)
        check_splits(splits, subjects, split_path)
        missing = sorted({s.id for s in subjects} - {i for ids in splits.values() for i in ids})
        if missing:
            raise SplitError(
                f"{split_path}: {len(missing)} subject(s) of the dataset are in no split (first: {missing[:3]}); "
                "the dataset changed since the split was written — delete the split file to re-split"
            )
        return splits
    splits = make_splits(subjects, test_per_class, val_fraction, seed)
    labels = {s.id: s.label for s in subjects}
    counts = {name: _count(ids, labels) for name, ids in splits.items()}
    atomic_write_json(split_path, {**settings, "counts": counts, "splits": splits})
    return splits


def _count(ids: Sequence[str], labels: Mapping[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for subject_id in ids:
        out[labels[subject_id]] = out.get(labels[subject_id], 0) + 1
    return dict(sorted(out.items()))

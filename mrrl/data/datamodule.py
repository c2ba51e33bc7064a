"""The one ``LightningDataModule`` every stage uses (selected by the ``data=`` config group)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mrrl.data.layouts import (
    BRATS_CLASSES,
    OASIS_CLASSES,
    DataProblem,
    DataValidationError,
    Subject,
    discover_brats,
    discover_oasis,
)
from mrrl.data.preprocess import PreprocessConfig, VolumeCache, VolumeError, load_volume
from mrrl.data.splits import SPLITS, load_or_create_splits, read_split_file
from mrrl.errors import ConfigError

FORMATS = {"brats": BRATS_CLASSES, "oasis": OASIS_CLASSES}


def _triple(size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(size, int):
        return (size, size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 3:
        raise ValueError(f"data.image_size must be an int or three ints, got {size}")
    return size  # type: ignore[return-value]


class VolumeDataset(Dataset):
    """Preprocessed volumes from the cache as ``{image: [C,D,H,W] float, label: long, id: str}``."""

    def __init__(
        self,
        subjects: Sequence[Subject],
        cache: VolumeCache,
        class_to_idx: Mapping[str, int],
        augment: Mapping[str, Any] | None = None,
    ):
        self.subjects = list(subjects)
        self.cache = cache
        self.class_to_idx = dict(class_to_idx)
        self.augment = build_augment(augment)

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def labels(self) -> list[int]:
        return [self.class_to_idx[s.label] for s in self.subjects]

    def __getitem__(self, index: int) -> dict[str, Any]:
        subject = self.subjects[index]
        image = torch.from_numpy(np.ascontiguousarray(self.cache.read(subject)))
        if self.augment is not None:
            image = torch.as_tensor(self.augment(image)).float()
        return {"image": image, "label": torch.tensor(self.class_to_idx[subject.label]), "id": subject.id}


def build_augment(augment: Mapping[str, Any] | None) -> TrainAugment | None:
    """The random flip + shifted crop of an ``augment`` block (``data.augment``, classify's
    ``stage.augment``: ``flip_prob``, ``flip_axes``, ``crop_margin``, all required); None when it is None or
    does nothing."""
    if augment is None:
        return None
    missing = [k for k in ("flip_prob", "flip_axes", "crop_margin") if k not in augment]
    if missing:
        raise ConfigError(f"augment block lacks {missing}: the defaults live in conf/ (data.augment)")
    aug = TrainAugment(
        flip_prob=float(augment["flip_prob"] or 0.0),
        flip_axes=tuple(int(a) for a in augment["flip_axes"]),
        crop_margin=int(augment["crop_margin"] or 0),
    )
    return aug if aug.active else None


class TrainAugment:
    """Random flips and random shifted crops (pad by a margin, crop back at a random offset).

    Uses the global torch RNG, which PyTorch seeds differently in every DataLoader worker (and Lightning's
    ``seed_everything(workers=True)`` makes reproducible), so workers do not repeat each other's draws.
    """

    def __init__(self, flip_prob: float = 0.0, flip_axes: Sequence[int] = (0,), crop_margin: int = 0):
        self.flip_prob = flip_prob
        self.flip_axes = tuple(flip_axes)
        self.crop_margin = crop_margin

    @property
    def active(self) -> bool:
        return (self.flip_prob > 0 and bool(self.flip_axes)) or self.crop_margin > 0

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.crop_margin > 0:
            m = self.crop_margin
            padded = torch.nn.functional.pad(image, (m, m, m, m, m, m), value=float(image.min()))
            o = torch.randint(0, 2 * m + 1, (3,)).tolist()
            d, h, w = image.shape[1:]
            image = padded[:, o[0] : o[0] + d, o[1] : o[1] + h, o[2] : o[2] + w]
        for axis in self.flip_axes:
            if self.flip_prob > 0 and torch.rand(()) < self.flip_prob:
                image = torch.flip(image, dims=(axis + 1,))
        return image.contiguous()


class MRIDataModule(L.LightningDataModule):
    """BraTS 2019, OASIS-1 or a phantom cohort, preprocessed once, cached, split as in the paper.

    ``prepare_data`` (one process per node) generates the phantom cohort if needed, discovers and validates
    every subject (all problems reported at once, before any training), fills the preprocessing cache and
    writes the split file. ``setup`` (every process) only reads what ``prepare_data`` wrote.
    ``batch_size`` is per process (per GPU under DDP); the global batch is ``batch_size × world size``.
    """

    def __init__(
        self,
        name: str,
        format: str,
        root: str | Path,
        classes: Sequence[str] | None = None,
        modalities: Sequence[str] = ("flair",),
        image_size: int | Sequence[int] = 64,
        intensity_range: Sequence[float] = (-1.0, 1.0),
        percentiles: Sequence[float] = (0.5, 99.5),
        cache_dir: str | Path = "runs/cache",
        split_path: str | Path | None = None,
        test_per_class: int = 30,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        split_file: str | Path | None = None,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        preprocess_workers: int = 0,
        augment: Mapping[str, Any] | None = None,
        csv_path: str | Path | None = None,
        cdr_threshold: float = 0.5,
        missing_cdr_as_cn: bool = False,
        require_all_csv_images: bool = False,
        phantom: Mapping[str, Any] | None = None,
        progress: bool = True,
        verify_checksums: bool = False,
    ):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"data.format must be one of {sorted(FORMATS)}, got {format!r}")
        self.name = name
        self.format = format
        self.root = Path(root)
        self.classes = tuple(classes or FORMATS[format])
        self.modalities = tuple(modalities)
        self.preprocess_cfg = PreprocessConfig(
            image_size=_triple(image_size),
            intensity_range=tuple(float(v) for v in intensity_range),  # type: ignore[arg-type]
            percentiles=tuple(float(v) for v in percentiles),  # type: ignore[arg-type]
        )
        self.cache = VolumeCache(cache_dir, name, self.preprocess_cfg, source_root=self.root)
        self.split_path = Path(split_path) if split_path else Path(cache_dir) / f"{name}-splits.json"
        self.test_per_class = int(test_per_class)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.split_file = split_file
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.preprocess_workers = int(preprocess_workers)
        self.augment = dict(augment) if augment is not None else None  # None: no augmentation
        self.oasis_options = {
            "csv_path": csv_path,
            "cdr_threshold": float(cdr_threshold),
            "missing_cdr_as_cn": bool(missing_cdr_as_cn),
            "require_all_csv_images": bool(require_all_csv_images),
        }
        self.phantom = dict(phantom) if phantom else None
        self.progress = progress
        self.verify_checksums = bool(verify_checksums)  # check_data: CRC32 of every cached volume
        self.left_out: list[tuple[str, str]] = []  # OASIS sessions the labelling rule leaves out
        self.splits: dict[str, list[str]] = {}
        self.subjects: dict[str, Subject] = {}
        self.datasets: dict[str, VolumeDataset] = {}

    # ----------------------------------------------------------------------------------- properties
    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        return (len(self.modalities) if self.format == "brats" else 1, *self.preprocess_cfg.image_size)

    # ----------------------------------------------------------------------------------- discovery
    def _make_phantom(self) -> None:
        if not self.phantom:
            return
        from mrrl.data.phantom import make_phantom_cohort

        options = {k: v for k, v in self.phantom.items() if k != "kind"}
        make_phantom_cohort(self.phantom["kind"], self.root, progress=self.progress, **options)

    def discover(self, incomplete: list[Subject] | None = None) -> tuple[list[Subject], list[DataProblem]]:
        """Subjects and naming problems; BraTS cases missing a modality go to ``incomplete``."""
        if self.format == "brats":
            subjects, problems = discover_brats(self.root, self.modalities, self.classes, incomplete)
        else:
            if self.modalities not in {("t1",), ("mprage",)}:
                problems = [
                    DataProblem(self.root, "OASIS-1 has one modality (T1 MPRAGE): use data.modalities=[t1]")
                ]
                return [], problems
            self.left_out = []
            subjects, problems = discover_oasis(self.root, **self.oasis_options, left_out=self.left_out)
        seen: set[str] = set()
        for subject in subjects:
            if subject.label not in self.classes:
                problems.append(DataProblem(subject.files[0], f"unknown label {subject.label!r}"))
            if subject.id in seen:
                problems.append(DataProblem(subject.files[0], f"duplicate subject id {subject.id}"))
            seen.add(subject.id)
        return subjects, problems

    def validate(self) -> list[Subject]:
        """Discover, check and cache every subject; raise one error listing every problem.

        One pass: naming problems (a missing modality) do not stop the voxel checks of every file that
        is there, so the user sees all problems of the dataset at once.
        """
        self._make_phantom()
        incomplete: list[Subject] = []
        subjects, problems = self.discover(incomplete)
        problems += self.cache.ensure(
            subjects,
            workers=self.preprocess_workers,
            progress=self.progress,
            verify_checksums=self.verify_checksums,
        )
        for subject in incomplete:
            for path in subject.files:
                try:
                    load_volume(path)
                except VolumeError as exc:
                    problems.append(DataProblem(path, str(exc)))
        if problems:
            raise DataValidationError(problems, dataset=f"{self.name} ({self.root})")
        return subjects

    # ----------------------------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        subjects = self.validate()
        load_or_create_splits(
            subjects,
            self.split_path,
            self.test_per_class,
            self.val_fraction,
            self.split_seed,
            user_file=self.split_file,
            dataset=self.name,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        subjects, problems = self.discover()
        if problems:
            raise DataValidationError(problems, dataset=f"{self.name} ({self.root})")
        stale = [s.id for s in subjects if not self.cache.is_fresh(s)]
        if stale:
            raise RuntimeError(
                f"{len(stale)} subject(s) are not preprocessed (first: {stale[:3]}); call prepare_data() first"
            )
        self.subjects = {s.id: s for s in subjects}
        self.splits = read_split_file(self.split_file or self.split_path)
        for split in SPLITS:
            members = [self.subjects[i] for i in self.splits.get(split, []) if i in self.subjects]
            augment = self.augment if split == "train" else None
            self.datasets[split] = VolumeDataset(members, self.cache, self.class_to_idx, augment)

    def prepare(self) -> MRIDataModule:
        """``prepare_data`` + ``setup`` for code that runs outside a Lightning ``Trainer``."""
        self.prepare_data()
        self.setup()
        return self

    # ----------------------------------------------------------------------------------- access
    def dataset(self, split: str, label: str | None = None, augment: bool = False) -> VolumeDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not self.datasets:
            raise RuntimeError("call setup() (or prepare()) before asking for datasets")
        base = self.datasets[split]
        members = [s for s in base.subjects if label is None or s.label == label]
        aug = self.augment if augment else None
        return VolumeDataset(members, self.cache, self.class_to_idx, aug)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], self.eval_batch_size, shuffle=False)

    def summary(self) -> dict[str, Any]:
        """Per-split, per-class counts and the preprocessed shape."""
        counts = {}
        for split in SPLITS:
            per_class = {c: 0 for c in self.classes}
            for subject in self.datasets[split].subjects:
                per_class[subject.label] += 1
            counts[split] = {**per_class, "All": sum(per_class.values())}
        totals = {c: sum(counts[s][c] for s in SPLITS) for c in self.classes}
        counts["total"] = {**totals, "All": sum(totals.values())}
        return {
            "dataset": self.name,
            "root": str(self.root),
            "classes": self.class_names,
            "modalities": list(self.modalities),
            "image_shape": list(self.image_shape),
            "counts": counts,
            "split_file": str(self.split_file or self.split_path),
            "cache_dir": str(self.cache.dir),
            "left_out": [{"id": i, "reason": why} for i, why in self.left_out],
            "cache_rebuilt": [{"file": str(p), "reason": why} for p, why in self.cache.rebuilt],
        }


def format_summary(summary: Mapping[str, Any]) -> str:
    """Table-1-style text: rows = splits, columns = classes + All."""
    classes = [*summary["classes"], "All"]
    header = f"{'split':<10}" + "".join(f"{c:>8}" for c in classes)
    rows = [header, "-" * len(header)]
    for split, counts in summary["counts"].items():
        rows.append(f"{split:<10}" + "".join(f"{counts[c]:>8}" for c in classes))
    shape = "×".join(str(s) for s in summary["image_shape"][1:])
    rows.append(f"preprocessed shape: {summary['image_shape'][0]} channel(s) × {shape}")
    return "\n".join(rows)

"""Datasets for the classifier: synthetic volumes held in memory, and a small DataModule over any pair."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mrrl.data.datamodule import TrainAugment


def build_augment(augment: Mapping[str, Any] | None) -> TrainAugment | None:
    """The DataModule's random flip + shifted crop, from ``stage.augment`` (None when nothing is on)."""
    augment = dict(augment or {})
    aug = TrainAugment(
        flip_prob=float(augment.get("flip_prob", 0.0) or 0.0),
        flip_axes=tuple(int(a) for a in augment.get("flip_axes", (0,))),
        crop_margin=int(augment.get("crop_margin", 0) or 0),
    )
    return aug if aug.active else None


class SyntheticDataset(Dataset):
    """``{class: [N, C, D, H, W]}`` as items ``{image, label, id}`` like the real ``VolumeDataset``."""

    def __init__(
        self,
        volumes: Mapping[str, torch.Tensor],
        class_to_idx: Mapping[str, int],
        augment: Mapping[str, Any] | None = None,
        prefix: str = "synthetic",
    ):
        self.items = [(c, i) for c, v in volumes.items() for i in range(len(v))]
        self.volumes = {c: v.float() for c, v in volumes.items()}
        self.class_to_idx = dict(class_to_idx)
        self.augment = build_augment(augment)
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [self.class_to_idx[c] for c, _ in self.items]

    def __getitem__(self, index: int) -> dict[str, Any]:
        c, i = self.items[index]
        image = self.volumes[c][i]
        if self.augment is not None:
            image = self.augment(image)
        return {
            "image": image,
            "label": torch.tensor(self.class_to_idx[c]),
            "id": f"{self.prefix}_{c}_{i:05d}",
        }


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """``n / (num_classes · n_c)`` per class (sklearn's "balanced"); absent classes get weight 1."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).float()
    total = float(counts.sum())
    return [total / (num_classes * float(c)) if c > 0 else 1.0 for c in counts]


class ClassifyDataModule(L.LightningDataModule):
    """Train (shuffled; last incomplete batch dropped) and optional validation datasets.

    The drop matters: with small volumes the ResNet's last stages are 1 voxel wide, and BatchNorm fails
    on a training batch of one such sample.
    """

    def __init__(
        self,
        train_set: Dataset,
        val_set: Dataset | None,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int = 0,
    ):
        super().__init__()
        self.train_set, self.val_set = train_set, val_set
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers = int(num_workers)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        # Drop a ragged last batch only when a rank gets more than one batch (Lightning's DDP sampler gives
        # each rank ceil(N / world) items): tiny sets must still train.
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            drop_last=train and -(-len(dataset) // world) > batch_size,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.eval_batch_size, train=False)

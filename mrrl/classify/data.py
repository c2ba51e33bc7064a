"""Datasets for the classifier: synthetic volumes held in memory, and a small DataModule over any pair."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from mrrl.data.datamodule import build_augment
from mrrl.data.train_val import TrainValDataModule


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


class ClassifyDataModule(TrainValDataModule):
    """Train (shuffled; last incomplete batch dropped) and optional validation datasets.

    The drop matters: with small volumes the ResNet's last stages are 1 voxel wide, and BatchNorm fails
    on a training batch of one such sample.
    """

"""A LightningDataModule over two ready-made datasets (train, optional validation), shared by the reward
and classify stages."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class TrainValDataModule(L.LightningDataModule):
    """Shuffled training batches with the ragged last batch dropped; validation in order.

    Dropping the last batch matters for BatchNorm networks (a batch of one 1-voxel-wide feature map fails)
    and loses nothing, since every epoch reshuffles. It is dropped only when a rank gets more than one batch
    (Lightning's DDP sampler gives each rank ceil(N / world) items), so tiny sets still train.
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
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        per_rank = -(-len(dataset) // world)  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            drop_last=train and per_rank > batch_size,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.eval_batch_size, train=False)

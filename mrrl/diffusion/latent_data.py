"""The VQGAN latents of the training cohort as a LightningDataModule, with class labels for guidance."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mrrl.diffusion.sampling import latent_moments
from mrrl.errors import ConfigError
from mrrl.vqgan.loading import load_latents


class LatentDataset(Dataset):
    """Cached latents as ``{latent: [C,d,h,w], label: long}``, plus fixed ``noise: [K,C,d,h,w]`` for validation."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None):
        self.latents, self.labels, self.noise = latents, labels, noise

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"latent": self.latents[index], "label": self.labels[index]}
        if self.noise is not None:
            item["noise"] = self.noise[index]
        return item


class TrainSampler(DistributedSampler):
    """Shuffled (or class-balanced, with replacement) training order, sharded over DDP ranks.

    Every rank draws the same epoch-long order from ``seed + epoch`` and keeps every ``num_replicas``-th
    index from its rank on, so the ranks see disjoint parts of one order. Subclassing
    ``DistributedSampler`` tells Lightning to leave it alone (no second sharding); it calls ``set_epoch``.
    """

    def __init__(
        self, labels: torch.Tensor, num_replicas: int = 1, rank: int = 0, seed: int = 0, balanced: bool = True
    ):
        super().__init__(labels, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.labels = labels.long()
        self.balanced = balanced

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = self.labels.numel()
        if self.balanced:
            weights = 1.0 / torch.bincount(self.labels)[self.labels].double()
            order = torch.multinomial(weights, self.total_size, replacement=True, generator=generator)
        else:
            order = torch.randperm(n, generator=generator).repeat(math.ceil(self.total_size / n))[
                : self.total_size
            ]
        return iter(order[self.rank :: self.num_replicas].tolist())


class ShardSampler(DistributedSampler):
    """Validation order: rank r gets r, r + W, ...; every sample exactly once, no padding duplicates."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]


@dataclass(frozen=True)
class LatentDataSettings:
    """The loader keys of conf/stage/diffusion.yaml (``stage.batch_size`` ...); null batch sizes: the data's."""

    batch_size: int | None
    eval_batch_size: int | None
    balanced: bool
    num_workers: int
    val_seed: int


class LatentDataModule(L.LightningDataModule):
    """The latent cache of the VQGAN stage: train split to train on, val split to validate on.

    ``batch_size`` is per process (per GPU under DDP). Each rank holds the whole (small) cache in memory
    and reads its own shard through the samplers above. Validation noise is drawn once from
    ``val_seed`` (``[N_val, K, C, d, h, w]``, K = number of validation timesteps), so ``val/loss`` is
    comparable across epochs and identical however the run is distributed.
    """

    def __init__(
        self,
        latent_path: str | Path,
        batch_size: int,
        eval_batch_size: int | None,
        balanced: bool,
        num_val_timesteps: int,
        val_seed: int,
        seed: int,
        num_workers: int,
    ):
        super().__init__()
        self.latent_path = Path(latent_path)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.balanced = bool(balanced)
        self.num_val_timesteps = int(num_val_timesteps)
        self.val_seed = int(val_seed)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.cache: Mapping[str, Any] | None = None
        self.datasets: dict[str, LatentDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.cache = load_latents(self.latent_path)
        splits = list(self.cache["splits"])
        for split in ("train", "val"):
            index = torch.tensor([i for i, s in enumerate(splits) if s == split], dtype=torch.long)
            if index.numel() == 0:
                raise ConfigError(
                    f"the latent cache {self.latent_path} has no '{split}' subjects"
                    + (": set data.val_fraction > 0 and rerun the vqgan stage" if split == "val" else "")
                )
            latents = self.cache["latents"][index].float().contiguous()
            labels = self.cache["labels"][index].long()
            noise = None
            if split == "val":
                generator = torch.Generator().manual_seed(self.val_seed)
                noise = torch.randn(
                    (len(index), self.num_val_timesteps, *latents.shape[1:]), generator=generator
                )
            self.datasets[split] = LatentDataset(latents, labels, noise)

    # ----------------------------------------------------------------------------------------- shapes
    @property
    def class_names(self) -> list[str]:
        assert self.cache is not None, "call setup() first"
        return list(self.cache["class_names"])

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return tuple(self.datasets["train"].latents.shape[1:])  # type: ignore[return-value]

    @property
    def train_latents(self) -> torch.Tensor:
        return self.datasets["train"].latents

    def train_moments(self, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """``latent_moments`` of this rank's shard (every ``world_size``-th training latent from ``rank``).

        The shards are disjoint and cover the training set once, so their all-reduced sum equals the
        moments of the whole training set, whatever the number of ranks.
        """
        return latent_moments(self.train_latents[rank::world_size])

    # ----------------------------------------------------------------------------------------- loaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: DistributedSampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        train = self.datasets["train"]
        sampler = TrainSampler(train.labels, world, rank, seed=self.seed, balanced=self.balanced)
        return self._loader(train, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        val = self.datasets["val"]
        return self._loader(val, self.eval_batch_size, ShardSampler(val, world, rank))

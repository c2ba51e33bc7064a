"""Exact resume: a fit stopped at any step and resumed ends with the weights of an uninterrupted fit.

Lightning saves weights, optimiser state and loop counters. Two more things decide what happens next:

- **The random number generators** (python, numpy, torch, CUDA): :class:`ResumeState` stores their states
  in every checkpoint and restores them when training starts again (after the sanity check).
- **The training order**: :func:`resumable_loader` swaps the training DataLoader's sampler for an
  :class:`EpochSampler`, whose order depends only on ``(seed, epoch)`` (Lightning's ``DistributedSampler``
  order, never the global RNG) and which skips the batches of the current epoch that the checkpoint has
  already trained on. The loader has ``state_dict``/``load_state_dict``, so Lightning saves and restores
  its position (it restores only loaders that have them). Worker seeds come from ``(seed, epoch)`` too.

Under DDP the global RNG states are rank 0's: every rank starts from one seed and draws alike. Streams
that differ per rank (diffusion noise, PPO rollouts) are seeded from ``(seed, rank, step)`` and need no
state. Not resumable mid-epoch (a warning says so): custom batch samplers, iterable datasets, samplers other
than random/sequential/``DistributedSampler``; with ``num_workers > 0``, random augmentations inside the
workers restart their stream in a resumed epoch.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """The global generators' states as tensors and plain values (``weights_only`` loads them)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- data order


class EpochSampler(DistributedSampler):
    """``DistributedSampler``'s ``(seed, epoch)`` order (or that of ``order``, a sampler that is already one),
    minus the first ``skip`` indices of the next iteration. Lightning leaves a ``DistributedSampler`` alone
    under DDP (no second sharding) and calls ``set_epoch`` on it."""

    def __init__(
        self,
        dataset: Any,
        shuffle: bool,
        num_replicas: int,
        rank: int,
        seed: int,
        order: DistributedSampler | None = None,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.order = order
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.order is not None:
            self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = iter(self.order) if self.order is not None else super().__iter__()
        skip, self.skip = self.skip, 0
        return itertools.islice(indices, skip, None)

    def __len__(self) -> int:
        return len(self.order) if self.order is not None else super().__len__()


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` that knows how many batches of its epoch it has served."""

    def __init__(self, dataset: Any, sampler: EpochSampler, seed: int, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, generator=torch.Generator(), **kwargs)
        self.seed = int(seed)
        self.batches_served = 0

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        assert isinstance(sampler, EpochSampler)
        assert self.batch_size is not None
        self.batches_served = sampler.skip // self.batch_size
        # Worker seeds from (seed, epoch), not from the global RNG the model draws from.
        self.generator.manual_seed(self.seed * 1_000_003 + sampler.epoch)
        for batch in super().__iter__():
            self.batches_served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        assert isinstance(self.sampler, EpochSampler)
        return {"epoch": int(self.sampler.epoch), "batches": int(self.batches_served)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        assert isinstance(sampler, EpochSampler) and self.batch_size is not None
        epoch, done = int(state["epoch"]), int(state["batches"])
        if done >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            epoch, done = epoch + 1, 0
        sampler.set_epoch(epoch)
        sampler.skip = done * self.batch_size


def resumable_loader(loader: Any, seed: int, rank: int, world_size: int) -> Any:
    """``loader`` with an :class:`EpochSampler`, or ``loader`` itself (and a warning) when that is not possible."""
    if isinstance(loader, ResumableDataLoader) or not isinstance(loader, DataLoader):
        return loader
    sampler, dataset = loader.sampler, loader.dataset
    order = sampler if isinstance(sampler, DistributedSampler) else None
    plain_random = isinstance(sampler, RandomSampler) and not sampler.replacement
    plain_random = plain_random and sampler.num_samples == len(dataset)  # type: ignore[arg-type]
    if (
        loader.batch_size is None
        or isinstance(dataset, IterableDataset)
        or not (order is not None or plain_random or isinstance(sampler, SequentialSampler))
    ):
        log.warning("the training loader (%s) cannot resume mid-epoch exactly", type(sampler).__name__)
        return loader
    epoch_sampler = EpochSampler(
        dataset, shuffle=plain_random, num_replicas=world_size, rank=rank, seed=seed, order=order
    )
    workers = loader.num_workers
    return ResumableDataLoader(
        dataset,
        epoch_sampler,
        seed,
        batch_size=loader.batch_size,
        drop_last=loader.drop_last,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers,
    )


# ---------------------------------------------------------------------------------------------- callback


class ResumeState(Callback):
    """RNG states in every checkpoint (restored at ``on_train_start``) and a resumable training loader."""

    def __init__(self, seed: int):
        self.seed = int(seed)  # used when seed_everything was not called
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        source = (
            datamodule
            if datamodule is not None and is_overridden("train_dataloader", datamodule)
            else pl_module
        )
        # The class's own method, also when an earlier fit of the same datamodule wrapped it already.
        original = getattr(source.train_dataloader, "_mrrl_original", source.train_dataloader)
        # The seed of this fit (seed_everything sets PL_GLOBAL_SEED; e.g. classify reseeds per run), and
        # sharding only where Lightning would shard (PPO sets use_distributed_sampler=false).
        seed = int(os.environ.get("PL_GLOBAL_SEED", self.seed))
        shard = getattr(trainer._accelerator_connector, "use_distributed_sampler", True)
        rank, world = (trainer.global_rank, trainer.world_size) if shard else (0, 1)

        def train_dataloader() -> Any:
            return resumable_loader(original(), seed, rank, world)

        train_dataloader._mrrl_original = original  # type: ignore[attr-defined]
        source.train_dataloader = train_dataloader

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None

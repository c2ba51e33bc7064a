"""Sharing sampling work across DDP ranks in stages that generate outside a Lightning fit.

``reward_data``, ``evaluate`` and ``classify`` sample thousands of volumes with a frozen model; under
``trainer=ddp`` every rank makes an interleaved share (rank ``r`` makes items ``r, r + W, r + 2W, ...``),
the shares are gathered in item order, and rank 0 scores and writes. Ranks are started with Lightning
Fabric, which re-executes the command line like ``strategy=ddp`` does (or joins ranks that torchrun /
SLURM started); a Lightning Trainer created later in the same processes finds them and starts nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from mrrl.training.distributed import local_processes, reexecutes_command_line


@dataclass
class RankShard:
    """This process's place among the ranks; ``fabric`` is None in a single process."""

    fabric: Any = None

    @property
    def rank(self) -> int:
        return 0 if self.fabric is None else int(self.fabric.global_rank)

    @property
    def world(self) -> int:
        return 1 if self.fabric is None else int(self.fabric.world_size)

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def indices(self, n: int) -> list[int]:
        """The items of ``range(n)`` this rank makes."""
        return list(range(self.rank, n, self.world))

    def gather(self, volumes: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's share (made for :meth:`indices`) in item order, on the CPU."""
        return gather_share(self.fabric, volumes, [""] * len(volumes), n)[0]

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (decisions all ranks must take the same way, e.g. cache hits)."""
        if self.fabric is None:
            return value
        return self.fabric.broadcast(value, src=0)


RANK_ENV = ("RANK", "LOCAL_RANK", "SLURM_PROCID")


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 when launched alone)."""
    for name in RANK_ENV:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def launch_ranks(cfg: DictConfig):
    """Start the ranks of a multi-device ``trainer`` (e.g. ``trainer=ddp``) with Lightning Fabric.

    Returns the Fabric, or None when the trainer runs one process per node, or when its strategy starts
    ranks by spawning a function (``ddp_spawn``, used for local sweeps): generation then stays in this
    process.
    """
    kwargs = {k: cfg.trainer.get(k) for k in ("accelerator", "devices", "num_nodes", "strategy")}
    processes = local_processes(kwargs) * int(kwargs["num_nodes"] or 1)
    if processes <= 1 or not reexecutes_command_line(kwargs["strategy"]):
        return None
    import lightning as L

    fabric = L.Fabric(**kwargs)
    fabric.launch()
    return fabric


def generation_device(cfg: DictConfig, fabric) -> torch.device:
    """The rank's device under Fabric; else the first GPU unless ``trainer.accelerator=cpu``."""
    if fabric is not None:
        return fabric.device
    if cfg.trainer.get("accelerator") != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def gather_share(fabric, volumes: torch.Tensor, sources: Sequence[str], n: int):
    """All ranks' shares in index order (rank r made indices r, r + world, ...); volumes end up on the CPU.

    Returns ``(volumes, sources)``; ``sources`` are per-item strings gathered alongside.
    """
    if fabric is None:
        return volumes.cpu(), list(sources)
    import torch.distributed as dist

    world = fabric.world_size
    chunk = -(-n // world)
    # A rank with no items (n < world) knows no item shape: take it from the others.
    shapes: list[Any] = [None] * world
    dist.all_gather_object(shapes, tuple(volumes.shape[1:]) if len(volumes) else None)
    shape = next(s for s in shapes if s is not None)
    padded = torch.zeros((chunk, *shape), dtype=torch.float32)
    if len(volumes):
        padded[: len(volumes)] = volumes.float().cpu()
    gathered = fabric.all_gather(padded.to(fabric.device)).cpu()  # [world, chunk, ...]
    names: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(names, list(sources))
    order = sorted((index, rank, k) for rank in range(world) for k, index in enumerate(range(rank, n, world)))
    return torch.stack([gathered[r, k] for _, r, k in order]), [names[r][k] for _, r, k in order]

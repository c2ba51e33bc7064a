"""Killed mid-training and resumed == uninterrupted, for every training stage (weights within float tolerance).

Each test trains one tiny model twice through the stage's real harness (``build_trainer`` + ``fit``): once
straight through, once stopped by SIGTERM in mid-epoch (``GracefulStop`` saves ``last.ckpt`` after the
running step) and rerun with the same command, which resumes. The two final ``last.ckpt`` must hold the
same step count and the same weights. ``resume_difference`` is also what docs/scaling.md's table measured.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_brats
from helpers import TINY_DATA, TINY_VQGAN, compose_cfg, tiny_checkpoints
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mrrl.training.runtime import seed_everything

TOLERANCE = 1e-6


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def max_weight_difference(a: dict, b: dict) -> float:
    assert a["global_step"] == b["global_step"], (a["global_step"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    diffs = [
        (x.double() - b["state_dict"][k].double()).abs().max().item()
        for k, x in a["state_dict"].items()
        if x.is_floating_point() and x.numel()
    ]
    return max(diffs)


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class Killed(Exception):
    """Stands for SIGKILL: the run ends at once, nothing is saved (the periodic last.ckpt stays)."""


def _kill() -> None:
    raise Killed


def interrupt_at_batch(cls: type, batch: int, action: Callable[[], None] = _sigterm) -> Callable[[], None]:
    """Make ``cls`` run ``action`` at the start of its ``batch``-th training batch (1-based) in this run;
    returns the undo."""
    count = {"n": 0}
    previous = cls.__dict__.get("on_train_batch_start")

    def hook(self, batch_data, batch_idx):
        count["n"] += 1
        if count["n"] == batch:
            action()

    cls.on_train_batch_start = hook

    def undo() -> None:
        if previous is None:
            del cls.on_train_batch_start
        else:
            cls.on_train_batch_start = previous

    return undo


def resume_difference(
    run: Callable[[Path], None], module_cls: type, stop_at: int, root: Path, kill: bool = False
) -> list[float]:
    """max |Δw| between an uninterrupted run and one stopped at batch ``stop_at`` (SIGTERM, or with ``kill``
    an abrupt end without a save) and rerun, per ``last.ckpt`` (``run(run_dir)`` trains; a stage with several
    models has one ``last.ckpt`` per model folder)."""
    straight, resumed = root / "straight", root / "resumed"
    seed_everything(0)
    run(straight)
    undo = interrupt_at_batch(module_cls, stop_at, _kill if kill else _sigterm)
    try:
        seed_everything(0)
        with pytest.raises(Killed if kill else SIGTERMException):
            run(resumed)
    finally:
        undo()
    seed_everything(0)
    run(resumed)
    folders = sorted(p.parent.parent for p in straight.rglob("checkpoints/last.ckpt"))
    assert folders
    return [max_weight_difference(_last(f), _last(resumed / f.relative_to(straight))) for f in folders]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_brats(tmp_path_factory.mktemp("resume") / "brats", n_hgg=5, n_lgg=5, modalities=("flair",))


def test_vqgan_resumes_exactly(data_root: Path, tmp_path: Path) -> None:
    from mrrl.stages import vqgan as vqgan_stage

    def run(run_dir: Path) -> None:
        cfg = compose_cfg(
            [
                "stage=vqgan",
                "data=brats2019",
                f"data.root={data_root}",
                *TINY_DATA,
                *TINY_VQGAN,
                "logger=none",
                "stage.loss.adv_start_step=1",  # both discriminators on: random slices after step 1
                "stage.trainer.max_epochs=2",  # 2 × 3 batches
                "stage.latents.export=false",
            ],
            tmp_path,
        )
        vqgan_stage.run(cfg, run_dir)

    diffs = resume_difference(run, vqgan_stage.VQGANModule, stop_at=5, root=tmp_path)  # 2nd batch, 2nd epoch
    assert max(diffs) <= TOLERANCE, diffs


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "killed_after_periodic_save"])
def test_diffusion_resumes_exactly(data_root: Path, tmp_path: Path, kill: bool) -> None:
    from test_diffusion_stage import TINY_DIFFUSION

    from mrrl.stages import diffusion as diffusion_stage

    vqgan = tiny_checkpoints(tmp_path / "ckpts", ["HGG", "LGG"])["vqgan"]

    def run(run_dir: Path) -> None:
        cfg = compose_cfg(
            [
                "stage=diffusion",
                "data=brats2019",
                f"data.root={data_root}",
                *TINY_DATA,
                *TINY_DIFFUSION,
                "logger=none",
                f"stage.vqgan_ckpt={vqgan}",
                "stage.sample_every_n_epochs=0",
                f"stage.checkpoint_every_n_steps={2 if kill else 'null'}",  # killed: resume from step 4
                "stage.cfg_dropout=0.3",  # label dropout draws from the noise generator too
                "stage.trainer.max_epochs=2",
            ],
            tmp_path,
        )
        diffusion_stage.run(cfg, run_dir)

    diffs = resume_difference(run, diffusion_stage.DiffusionModule, stop_at=5, root=tmp_path, kill=kill)
    assert max(diffs) <= TOLERANCE, diffs


def test_reward_resumes_exactly(tmp_path: Path) -> None:
    from test_reward_stage import TINY_REWARD, make_dataset

    from mrrl.reward.module import RewardModule
    from mrrl.stages import reward as reward_stage

    dataset = make_dataset(tmp_path / "reward_dataset")

    def run(run_dir: Path) -> None:
        cfg = compose_cfg(
            [*TINY_REWARD, f"stage.dataset_dir={dataset}", "logger=none", "stage.trainer.max_epochs=2"],
            tmp_path,
        )
        reward_stage.run(cfg, run_dir)

    # 16 training volumes, batch 4: R3D stopped in its 2nd epoch, R2D trained by the rerun.
    diffs = resume_difference(run, RewardModule, stop_at=6, root=tmp_path)
    assert len(diffs) == 2 and max(diffs) <= TOLERANCE, diffs


def test_ppo_resumes_exactly(tmp_path: Path) -> None:
    from test_ppo import CLASSES, make_module

    from mrrl.ppo.module import PPOModule
    from mrrl.training.trainer import build_trainer, fit

    checkpoints = tiny_checkpoints(tmp_path / "ckpts", CLASSES)

    def run(run_dir: Path) -> None:
        cfg = compose_cfg(
            ["stage=ppo", "logger=none", "stage.progress_bar=false", "stage.trainer.max_epochs=3"], tmp_path
        )
        module = make_module(checkpoints, sample={"batch_size": 4, "num_steps": 3}, train={"batch_size": 2})
        trainer, _ = build_trainer(cfg, run_dir)
        fit(trainer, module, None, run_dir)

    diffs = resume_difference(run, PPOModule, stop_at=2, root=tmp_path)  # one PPO iteration per epoch
    assert max(diffs) <= TOLERANCE, diffs


def test_resumable_loader_order_position_and_fallback(caplog) -> None:
    """The order is a function of (seed, epoch); a restored position skips what was served; samplers it
    cannot reproduce are left alone with a warning."""
    from torch.utils.data import DataLoader, WeightedRandomSampler

    from mrrl.training.resume import ResumableDataLoader, resumable_loader

    data = list(range(10))
    loader = resumable_loader(DataLoader(data, batch_size=3, shuffle=True), seed=7, rank=0, world_size=1)
    assert isinstance(loader, ResumableDataLoader)
    torch.manual_seed(123)  # the global RNG plays no part
    epoch0 = [b.tolist() for b in loader]
    torch.manual_seed(456)
    assert [b.tolist() for b in loader] == epoch0 and sorted(sum(epoch0, [])) == data
    loader.sampler.set_epoch(1)
    epoch1 = [b.tolist() for b in loader]
    assert epoch1 != epoch0
    served = iter(loader)
    next(served), next(served)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    again = resumable_loader(DataLoader(data, batch_size=3, shuffle=True), seed=7, rank=0, world_size=1)
    again.load_state_dict(state)
    assert [b.tolist() for b in again] == epoch1[2:]  # the rest of epoch 1
    again.load_state_dict({"epoch": 1, "batches": 4})  # saved at the end of epoch 1: epoch 2 from its start
    assert again.sampler.epoch == 2 and len([b for b in again]) == 4
    two_ranks = [resumable_loader(DataLoader(data, batch_size=5), 7, r, 2) for r in (0, 1)]
    assert sorted(sum((b.tolist() for dl in two_ranks for b in dl), [])) == data  # disjoint shards
    weighted = DataLoader(data, sampler=WeightedRandomSampler([1.0] * 10, 10), batch_size=2)
    assert resumable_loader(weighted, 7, 0, 1) is weighted and "cannot resume" in caplog.text

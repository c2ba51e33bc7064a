"""The training harness shared by every Lightning stage: checkpoints, resume, loggers, Trainer, manifest.

Rerunning the same command after an interruption resumes from ``<run_dir>/checkpoints/last.ckpt``
(written atomically, and on SIGTERM too: ``mrrl/fault_tolerance.py``); a stage whose manifest says it
finished is not retrained unless ``stage.force=true``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from mrrl.manifest import is_complete
from mrrl.training.fault_tolerance import (
    AtomicCheckpointIO,
    SetAsideDamaged,
    graceful_stop_from_config,
    resume_checkpoint,
    usable_resume_checkpoint,
)
from mrrl.training.resume import ResumeState
from mrrl.training.runtime import build_loggers, trainer_kwargs
from mrrl.utils.checkpoints import safe_load

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def last_checkpoint(run_dir: str | Path) -> Path | None:
    path = checkpoint_dir(run_dir) / LAST_CKPT
    return path if path.is_file() else None


def already_finished(cfg: DictConfig, run_dir: Path) -> bool:
    if is_complete(run_dir) and not cfg.stage.force:
        print(f"{cfg.stage.name}: already finished in {run_dir} (stage.force=true retrains)")
        return True
    return False


# Lightning's DDP strategy names and how each starts its ranks.
DDP_START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}


def _strategy(kwargs: dict[str, Any], find_unused_parameters: bool) -> Any:
    """DDP needs ``find_unused_parameters`` when optimisers alternate over parts of the model (GANs)."""
    strategy = kwargs.get("strategy", "auto")
    if isinstance(strategy, str) and strategy in DDP_START_METHODS and find_unused_parameters:
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True, start_method=DDP_START_METHODS[strategy])
    return strategy


class LastCheckpoint(ModelCheckpoint):
    """The resume point ``last.ckpt``: every N steps or at every epoch's end (not only after validation,
    which Lightning's default would do with ``check_val_every_n_epoch > 1``), and once more when training
    ends between two saves (e.g. ``trainer.max_steps`` in mid-epoch), so a finished fit always has one."""

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    monitor: str | None = None,
    mode: str = "min",
    callbacks: Sequence[Callback] = (),
    find_unused_parameters: bool = False,
) -> tuple[L.Trainer, ModelCheckpoint | None]:
    """Trainer with a ``last.ckpt`` (resume point, also saved on SIGTERM) and, with ``monitor``, a ``best.ckpt``."""
    kwargs = trainer_kwargs(cfg)
    kwargs["strategy"] = _strategy(kwargs, find_unused_parameters)
    every_n = cfg.stage.get("checkpoint_every_n_steps")
    ckpt_dir = checkpoint_dir(run_dir)
    # The resume point "last.ckpt", overwritten every N steps or else every epoch (save_top_k=0 with
    # save_last=True would write it only when some other checkpoint is written).
    last_cb = LastCheckpoint(
        dirpath=ckpt_dir,
        filename=LAST_CKPT.removesuffix(".ckpt"),
        monitor=None,
        save_top_k=1,
        every_n_train_steps=every_n or None,
        every_n_epochs=None if every_n else 1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    all_callbacks: list[Callback] = [ResumeState(int(cfg.seed)), *callbacks]
    best_cb = None
    if monitor:
        best_cb = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        all_callbacks.append(best_cb)
    # After best_cb, so a last.ckpt written at the same moment already holds the updated best.
    all_callbacks.append(last_cb)
    all_callbacks.append(graceful_stop_from_config(cfg, ckpt_dir / LAST_CKPT))
    loggers = build_loggers(cfg, run_dir)
    if loggers:
        all_callbacks.append(LearningRateMonitor(logging_interval="step"))
    kwargs_plugins = kwargs.pop("plugins", None)
    trainer = L.Trainer(
        **kwargs,
        default_root_dir=str(run_dir),
        callbacks=all_callbacks,
        plugins=[*_as_list(kwargs_plugins), AtomicCheckpointIO()],
        logger=loggers or False,
        enable_progress_bar=bool(cfg.stage.progress_bar),
        enable_model_summary=False,
    )
    return trainer, best_cb


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def fit(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule | None,
    run_dir: Path,
    fresh: bool = False,
) -> None:
    """``trainer.fit``, resuming from ``last.ckpt`` when an earlier run was interrupted (unless ``fresh``).

    Lightning's SLURM ``hpc_ckpt_<n>.ckpt`` files count too when newer (``resume_checkpoint``); a damaged
    resume point is set aside and the next good one used (``usable_resume_checkpoint``). Loading is
    weights-only (``mrrl/checkpoints.py``).
    """
    resume = resume_checkpoint(run_dir, last_checkpoint(run_dir))
    if resume is not None and fresh:
        stamp = int(time.time())
        for old in [last_checkpoint(run_dir), *Path(run_dir).glob("hpc_ckpt_*.ckpt")]:
            if old is not None:
                old.rename(old.with_name(f"{old.stem}-before-force-{stamp}.ckpt"))
        resume = None
    if resume is not None:
        best = checkpoint_dir(run_dir) / "best.ckpt"
        resume, damaged = usable_resume_checkpoint(run_dir, last_checkpoint(run_dir), [best])
        if damaged:
            names = ", ".join(path.name for path, _ in damaged)
            _say(
                f"damaged checkpoint {names}: resuming from {resume} instead"
                if resume
                else f"damaged checkpoint {names} and no other: training starts from scratch "
                "(stage.force=true starts over without looking at old checkpoints)",
                trainer,
            )
            trainer.callbacks.append(SetAsideDamaged(damaged))
    if resume is not None:
        log.info("resuming from %s", resume)
        print(f"resuming from {resume}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    release_process_group()


def release_process_group() -> None:
    """After a DDP fit, leave the process group on every rank.

    What follows (rank 0 re-validating, encoding latents, writing manifests) runs in one process; with the
    group still up, torchmetrics and Lightning would try to synchronise with ranks that have finished.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def checkpoint_outputs(run_dir: Path, best_cb: ModelCheckpoint | None) -> dict[str, Any]:
    """Paths of last/best checkpoints and the best score.

    Under ``ddp_spawn`` the main process's callbacks never saw a score (Lightning only sends the first
    checkpoint callback's path back), so path and score are read from the state stored in the checkpoints.
    """
    last = last_checkpoint(run_dir)
    out: dict[str, Any] = {"last_ckpt": str(last.resolve()) if last else None}
    if best_cb is None:
        return out
    best, score = best_cb.best_model_path, best_cb.best_model_score
    candidates = [checkpoint_dir(run_dir) / "best.ckpt", last]
    for path in candidates if not best or score is None else []:
        if path is None or not path.is_file():
            continue

        states = safe_load(path).get("callbacks", {})
        found = [
            s for s in states.values() if s.get("monitor") == best_cb.monitor and s.get("best_model_path")
        ]
        if found:
            best, score = found[0]["best_model_path"], found[0].get("best_model_score")
            break
    if not best or not Path(best).is_file():
        if last is None:
            return {**out, "best_ckpt": None, "best_score": None, "monitor": best_cb.monitor}
        _say(
            f"no {best_cb.monitor} score yet (training ended before its first validation): using {last} as the best checkpoint"
        )
        best, score = str(last), None
    out["best_ckpt"] = str(Path(best).resolve()) if best else None
    out["best_score"] = float(score) if score is not None else None
    out["monitor"] = best_cb.monitor
    return out


def _say(message: str, trainer: L.Trainer | None = None) -> None:
    if trainer is None or trainer.is_global_zero:
        print(f"mrrl: {message}", flush=True)

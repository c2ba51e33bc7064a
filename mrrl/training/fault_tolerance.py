"""Stopping and coming back: atomic checkpoint files, a checkpoint on SIGTERM, SLURM requeueing.

- :class:`AtomicCheckpointIO` writes every checkpoint (periodic ``last.ckpt``, ``best.ckpt``, the one saved
  on SIGTERM) to a temporary file beside its target and renames it into place, so a crash or a full disk
  never leaves a truncated checkpoint that a resumed run or a later stage would trust. (Lightning's own
  writer stages the file in the system temp folder and *moves* it; across file systems that is a copy.)
- :class:`GracefulStop` stops a fit on SIGTERM after the current step, on every rank at the same step, and
  saves ``checkpoints/last.ckpt`` there (all ranks take part; the state is that of a finished optimiser
  step). Without it, work since the last periodic ``last.ckpt`` is lost, and under DDP Lightning's own
  handler can hang. Ctrl+C in a one-process run saves too.
- On SLURM (``SLURM_JOB_ID`` set) the stop signal also requeues the job with ``scontrol requeue`` from
  rank 0, so a preempted or timed-out job comes back and the same command resumes. ``SIGUSR1``, which SLURM
  sends ``N`` seconds before the time limit with ``#SBATCH --signal=USR1@N``, stops the same way.
  Requeueing stops after ``fault_tolerance.max_requeues`` restarts (``SLURM_RESTART_COUNT``), and is left to
  submitit under the submitit launcher (it requeues on its own signal).

The stopped run exits with status 143 (``mrrl.training.distributed.sigterm_exits_nonzero``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

HPC_CKPT_GLOB = "hpc_ckpt_*.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints are written to ``.<name>.tmp-<pid>`` in the target folder, then renamed over it."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # remote file systems: Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as handle:  # on disk before it replaces the previous checkpoint
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return None


def resume_checkpoint(run_dir: Path, last: Path | None) -> Path | None:
    """The newest of ``last.ckpt`` and Lightning's SLURM ``hpc_ckpt_<n>.ckpt`` files in the run folder.

    Lightning writes ``hpc_ckpt_<n>.ckpt`` itself on its SLURM requeue signal when mrrl's requeueing is off
    (``fault_tolerance.requeue=false``); an explicit ``ckpt_path`` would otherwise ignore them.
    """
    candidates = [p for p in [last, *Path(run_dir).glob(HPC_CKPT_GLOB)] if p is not None and p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def usable_resume_checkpoint(
    run_dir: Path, last: Path | None, fallbacks: list[Path]
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest loadable of ``last.ckpt`` and ``hpc_ckpt_<n>.ckpt``, else the first loadable of
    ``fallbacks`` (``best.ckpt``) when a resume point proved damaged (truncated by a full disk, a copy cut
    short); and the damaged files with their one-line reasons. ``(None, …)``: training starts over.

    A pure function of the files, so every DDP rank makes the same choice (:class:`SetAsideDamaged` renames
    the damaged files later, once all ranks have chosen). Only the pickle is read here (tensors memory-
    mapped), which is where a truncated file fails. A file that would run code is an error, never skipped.
    """
    from mrrl.utils.checkpoints import DamagedCheckpointError, UnsafeCheckpointError, safe_load

    primary = [p for p in [last, *Path(run_dir).glob(HPC_CKPT_GLOB)] if p is not None and p.is_file()]
    if not primary:
        return None, []
    primary.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    damaged: list[tuple[Path, str]] = []
    # A fallback is reached only after every resume point proved damaged.
    for path in [*primary, *(p for p in fallbacks if p.is_file() and p not in primary)]:
        try:
            safe_load(path, mmap=True)
        except UnsafeCheckpointError:
            raise
        except (DamagedCheckpointError, FileNotFoundError) as exc:
            damaged.append((path, str(exc)))
            continue
        return path, damaged
    return None, damaged


class SetAsideDamaged(Callback):
    """Rank 0 renames damaged resume points ``<name>.corrupt-<time>`` when training starts: after every rank
    has chosen its resume point, before the first new ``last.ckpt`` could take the damaged file's name."""

    def __init__(self, damaged: list[tuple[Path, str]]):
        self.damaged = damaged

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path, reason in self.damaged:
            if path.is_file():
                path.rename(path.with_name(f"{path.name}.corrupt-{stamp}"))
                _say(f"{reason} -- set aside as {path.name}.corrupt-{stamp}")
        self.damaged = []


# ---------------------------------------------------------------------------------------------- SLURM


def slurm_job_id() -> str | None:
    """``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``; None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def requeue_slurm_job(max_requeues: int) -> bool:
    """``scontrol requeue`` this job unless it was already restarted ``max_requeues`` times."""
    job = slurm_job_id()
    if job is None:
        return False
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        _say(f"not requeueing SLURM job {job}: restarted {restarts} times (fault_tolerance.max_requeues)")
        return False
    try:
        status = subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:
        _say(f"cannot requeue SLURM job {job}: scontrol is not on PATH")
        return False
    if status != 0:
        _say(f"scontrol requeue {job} failed with status {status}")
        return False
    _say(f"requeued SLURM job {job}: it resumes from checkpoints/last.ckpt when it starts again")
    return True


def under_submitit() -> bool:
    """Whether this job runs under Hydra's submitit launcher (which requeues on its own signal)."""
    from mrrl.training.distributed import SLURM_LAUNCHER_SUFFIX, _launcher_target, hydra_config

    return _launcher_target(hydra_config()).endswith(SLURM_LAUNCHER_SUFFIX)


def _say(message: str) -> None:
    print(f"mrrl: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the callback


class GracefulStop(Callback):
    """Stop a fit cleanly on SIGTERM: every rank at the same step, ``ckpt_path`` saved; requeue on SLURM.

    Lightning's own SIGTERM handler runs a collective inside the signal handler, which can pair with a
    different collective on another rank and hang a DDP job. While training, this callback's handler only
    sets a flag; at the end of every training batch the ranks agree (one all-reduce of a bool) whether any
    of them was signalled, and then all of them let Lightning stop after that step and save the checkpoint.
    Ctrl+C in a one-process run saves too.

    Args:
        ckpt_path: the resume point the next run of the same command loads (``checkpoints/last.ckpt``).
        save: handle SIGTERM this way at all (``fault_tolerance.save_on_sigterm``).
        requeue: "auto" (on SLURM, not under the submitit launcher), True or False.
        max_requeues: stop requeueing after this many restarts of the SLURM job.
    """

    def __init__(
        self, ckpt_path: Path, save: bool = True, requeue: bool | str = "auto", max_requeues: int = 20
    ):
        if requeue not in (True, False, "auto"):
            from mrrl.errors import ConfigError

            raise ConfigError(f"fault_tolerance.requeue must be auto, true or false, got {requeue!r}")
        self.ckpt_path = Path(ckpt_path)
        self.save = save
        self.requeue = requeue
        self.max_requeues = int(max_requeues)
        self.stop_requested = False
        self._previous_handlers: dict[int, Any] = {}

    def requeue_enabled(self) -> bool:
        if slurm_job_id() is None or self.requeue is False:
            return False
        return self.requeue is True or not under_submitit()

    def stop_signals(self) -> list[int]:
        """SIGTERM, and SIGUSR1 (SLURM's time-limit warning with ``--signal=USR1@<s>``) when requeueing."""
        signals = [signal.SIGTERM]
        if self.requeue_enabled() and hasattr(signal, "SIGUSR1"):
            signals.append(signal.SIGUSR1)
        return signals

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning registered its handlers (on SLURM it would also save an hpc_ckpt mid-step on SIGUSR1).
        self.stop_requested = False
        if not self.save or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.stop_signals():
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._request_stop)

    def _request_stop(self, signum: int, frame: Any) -> None:
        log.info("signal %d: stopping after the current training step", signum)
        self.stop_requested = True  # no collectives in a signal handler: ranks agree at the batch end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Every rank learns whether any rank was signalled; then Lightning stops after this step everywhere.
        if trainer.strategy.reduce_boolean_decision(self.stop_requested, all=False):
            trainer._signal_connector.received_sigterm = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._restore_handlers()
        sigterm = isinstance(exception, SIGTERMException)
        ctrl_c = isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1
        if not (sigterm or ctrl_c) or not self.save:
            return
        trainer.save_checkpoint(str(self.ckpt_path))
        if trainer.is_global_zero:
            _say(f"saved {self.ckpt_path} at step {trainer.global_step} before stopping")
            if sigterm and self.requeue_enabled():
                requeue_slurm_job(self.max_requeues)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}


@dataclass(frozen=True)
class FaultToleranceSettings:
    """The top-level ``fault_tolerance`` block of ``conf/config.yaml``."""

    save_on_sigterm: bool
    requeue: bool | str  # auto | true | false
    max_requeues: int


def graceful_stop_from_config(cfg: Any, ckpt_path: Path) -> GracefulStop:
    """The callback configured by the top-level ``fault_tolerance`` block (every key required)."""
    from mrrl.settings import from_config

    settings = from_config(FaultToleranceSettings, cfg.fault_tolerance, "fault_tolerance")
    return GracefulStop(
        ckpt_path,
        save=bool(settings.save_on_sigterm),
        requeue=settings.requeue,
        max_requeues=int(settings.max_requeues),
    )

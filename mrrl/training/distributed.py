"""Scale-out checks and process hygiene that ``mrrl``'s CLI applies before every stage (``begin_stage``).

1. **Plain DDP inside ``--multirun``.** Lightning's ``strategy=ddp`` (and ``auto`` with several devices,
   FSDP, DeepSpeed) starts ranks 1..N-1 by re-executing the command line. Under ``mrrl -m`` that command
   line is the whole sweep, so every extra rank would relaunch the sweep. Refused with a message naming the
   fixes: ``trainer.strategy=ddp_spawn`` for local sweeps, ``hydra/launcher=slurm`` (submitit, where SLURM
   starts one task per GPU and nothing is re-executed) on clusters, or single runs without ``-m``.
2. **SLURM sizes.** Under the submitit SLURM launcher, SLURM's tasks per node and nodes must equal
   ``trainer.devices`` and ``trainer.num_nodes`` (``conf/hydra/launcher/slurm.yaml`` ties them together).
3. **One W&B run per job.** Hydra's basic launcher runs sweep jobs one after another in one process and
   Lightning's ``WandbLogger`` does not finish its run; a W&B run left open by a previous job is finished
   here, so every job (and every stage) gets its own run. The last one is finished by W&B at exit.
4. **SIGTERM exit status.** Lightning handles SIGTERM by stopping at the next batch (DDP) or epoch end
   (one process) with ``SIGTERMException`` — a ``SystemExit`` without a code, i.e. exit status 0 and no
   manifest. Stopped runs here exit with 143 (128 + SIGTERM) and say how to resume, so schedulers and
   ``mrrl-pipeline`` see a failure rather than a success.

SLURM requeueing is mrrl's (``mrrl/fault_tolerance.py``: ``last.ckpt`` saved on SIGTERM / SIGUSR1, then
``scontrol requeue``) or, under the submitit launcher, submitit's (``hydra.launcher.max_num_timeout``);
either way the requeued job reruns the same command and the stage resumes from ``checkpoints/last.ckpt``.
See ``docs/scaling.md``.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mrrl.errors import ConfigError

log = logging.getLogger(__name__)

# Stages that start no ranks (no Trainer and no Fabric): their ``trainer.strategy`` launches nothing.
NO_TRAINER_STAGES = frozenset({"check_data"})
SIGTERM_EXIT_STATUS = 128 + int(signal.SIGTERM)
SLURM_LAUNCHER_SUFFIX = "SlurmLauncher"


def begin_stage(cfg: DictConfig) -> None:
    """Everything ``run_stage`` needs before a stage starts; a refused launch prints one message, exits 1."""
    try:
        check_launch(cfg, hydra_config())
    except ConfigError as exc:
        print(f"mrrl: error: {exc}", file=sys.stderr)
        sys.exit(1)
    finish_wandb_run()
    sigterm_exits_nonzero()


def hydra_config() -> DictConfig | None:
    """The running Hydra job's ``hydra`` node, or ``None`` outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    return HydraConfig.get() if HydraConfig.initialized() else None


# ---------------------------------------------------------------------------------------------- launch checks


def check_launch(cfg: DictConfig, hydra: Mapping[str, Any] | None) -> None:
    """Raise :class:`ConfigError` for launches that cannot work: plain DDP in a sweep, SLURM size mismatches."""
    launcher = _launcher_target(hydra)
    on_slurm_launcher = launcher.endswith(SLURM_LAUNCHER_SUFFIX)
    trainers = _trainer_settings(cfg)
    if on_slurm_launcher and hydra is not None:
        check_slurm_sizes(trainers[0], hydra.get("launcher") or {})
    if not is_multirun(hydra) or cfg.stage.name in NO_TRAINER_STAGES or on_slurm_launcher:
        return
    for kwargs in trainers:
        strategy, n = kwargs.get("strategy", "auto"), local_processes(kwargs)
        if n > 1 and reexecutes_command_line(strategy):
            raise ConfigError(
                f"trainer.strategy={_describe(strategy)} with {n} processes per node cannot run inside a Hydra "
                "--multirun sweep: Lightning starts the extra ranks by re-executing the command line, which "
                "would relaunch the whole sweep in every rank. Use trainer.strategy=ddp_spawn for local "
                "sweeps, hydra/launcher=slurm (submitit: SLURM starts one task per GPU) on a cluster, or "
                "run the jobs one at a time without -m (see docs/scaling.md)."
            )


def check_slurm_sizes(trainer: Mapping[str, Any], launcher: Mapping[str, Any]) -> None:
    """SLURM's tasks per node and nodes must equal the Trainer's devices and nodes (one task per device)."""
    devices, nodes = local_processes(trainer), trainer.get("num_nodes", 1) or 1
    tasks, slurm_nodes = launcher.get("tasks_per_node", 1), launcher.get("nodes", 1)
    problems = []
    if tasks is not None and str(tasks) != str(devices):
        problems.append(f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={trainer.get('devices')}")
    if slurm_nodes is not None and str(slurm_nodes) != str(nodes):
        problems.append(f"hydra.launcher.nodes={slurm_nodes} but trainer.num_nodes={nodes}")
    if problems:
        raise ConfigError(
            "; ".join(problems) + ": SLURM must start one task per device. Use hydra/launcher=slurm (it "
            "ties tasks_per_node and gpus_per_node to trainer.devices and nodes to trainer.num_nodes) and "
            "size jobs with trainer.devices=<gpus per node> trainer.num_nodes=<nodes>."
        )


def is_multirun(hydra: Mapping[str, Any] | None) -> bool:
    return hydra is not None and str(hydra.get("mode")).rsplit(".", 1)[-1] == "MULTIRUN"


def _launcher_target(hydra: Mapping[str, Any] | None) -> str:
    launcher = (hydra or {}).get("launcher") or {}
    return str(launcher.get("_target_") or "")


def _trainer_settings(cfg: DictConfig) -> list[dict[str, Any]]:
    """The stage's Trainer arguments, plus one variant per sub-model with its own ``trainer`` (reward)."""
    from mrrl.training.runtime import trainer_kwargs

    base = trainer_kwargs(cfg)
    settings = [base]
    for value in cfg.stage.values():
        if isinstance(value, DictConfig) and isinstance(value.get("trainer"), DictConfig):
            own = OmegaConf.to_container(value.trainer, resolve=True)
            if own:
                settings.append({**base, **own})  # type: ignore[dict-item]
    return settings


def reexecutes_command_line(strategy: Any) -> bool:
    """Whether Lightning starts this strategy's extra ranks by re-running ``sys.argv`` (not spawn/fork)."""
    if isinstance(strategy, Mapping):
        target = str(strategy.get("_target_", ""))
        return strategy.get("start_method", "popen") == "popen" and any(
            name in target for name in ("DDPStrategy", "FSDPStrategy", "DeepSpeedStrategy")
        )
    if not isinstance(strategy, str):
        return False
    if (
        strategy == "auto"
        or strategy.startswith(("ddp_find_unused", "fsdp", "deepspeed"))
        or strategy == "ddp"
    ):
        return True  # "auto" with several devices becomes "ddp"
    if strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")) or strategy.startswith("single_"):
        return False
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry  # other names (slow import)

    if strategy not in StrategyRegistry:
        return False
    entry = StrategyRegistry[strategy]
    if issubclass(entry["strategy"], DDPStrategy):
        return entry["init_params"].get("start_method", "popen") == "popen"
    return entry["strategy"].__name__ in ("FSDPStrategy", "DeepSpeedStrategy")


def local_processes(trainer: Mapping[str, Any]) -> int:
    """Processes Lightning would run per node for these Trainer arguments (``devices``, ``accelerator``)."""
    devices, accelerator = trainer.get("devices", "auto"), str(trainer.get("accelerator", "auto"))
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        devices = -1 if text in ("auto", "-1") else int(text)
    count = int(devices)
    if count >= 0:
        return count
    if accelerator == "cpu":
        return 1
    import torch

    return max(torch.cuda.device_count(), 1)


def _describe(strategy: Any) -> str:
    return str(strategy.get("_target_")) if isinstance(strategy, Mapping) else str(strategy)


# ---------------------------------------------------------------------------------------------- process hygiene


def finish_wandb_run() -> bool:
    """Finish a W&B run a previous job or stage of this process left open; True if there was one."""
    wandb = sys.modules.get("wandb")  # never import wandb just to find out
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    log.info("finishing the W&B run of the previous job (%s)", wandb.run.id)
    wandb.finish()
    return True


def sigterm_exits_nonzero() -> None:
    """Make Lightning's ``SIGTERMException`` exit with status 143 (and a resume hint) instead of 0."""
    try:
        from lightning.pytorch.utilities.exceptions import SIGTERMException
    except ImportError:  # pragma: no cover - lightning is a dependency
        return
    if getattr(SIGTERMException, "_mrrl_exit_status", None):
        return

    def __init__(self, *args: Any) -> None:
        from lightning.pytorch.utilities import rank_zero_only

        SystemExit.__init__(self, *(args or (SIGTERM_EXIT_STATUS,)))
        if not args and getattr(rank_zero_only, "rank", 0) == 0:
            print(
                "mrrl: stopped by SIGTERM; run the same command again to resume from checkpoints/last.ckpt",
                file=sys.stderr,
                flush=True,
            )

    SIGTERMException.__init__ = __init__  # type: ignore[method-assign]
    SIGTERMException._mrrl_exit_status = SIGTERM_EXIT_STATUS  # type: ignore[attr-defined]

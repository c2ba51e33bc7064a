"""The W&B run of a stage: name, group, job type, tags, axes, summary, tables, artefacts, and its end.

One run per stage (per model for ``reward``, per protocol × seed × phase for ``classify``), grouped by
experiment (``logger.group``), ``job_type`` = the stage, tagged ``dataset:<name>`` and ``experiment:<name>``.
Each stage's keys are plotted against the axis :mod:`mrrl.tracking.keys` names (``define_metric``); final
metrics go to the run summary; the run is finished when the stage ends, so the next stage or sweep job
never logs into it. Everything here is a no-op without ``logger=wandb`` and off rank 0.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mrrl.errors import ConfigError
from mrrl.tracking.keys import STAGES, STEP

# Read-only mappings (replaced, never mutated), so a shared default is safe.
_RUN_FIELDS: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "mrrl_wandb_fields", default=MappingProxyType({})
)


@contextlib.contextmanager
def run_fields(**fields: Any) -> Iterator[None]:
    """Top-level config fields of the W&B runs started inside (classify: protocol, seed, phase)."""
    token = _RUN_FIELDS.set(MappingProxyType({**_RUN_FIELDS.get(), **fields}))
    try:
        yield
    finally:
        _RUN_FIELDS.reset(token)


class StageWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that plots the stage's keys against their axis (``define_metric``).

    The globs are defined when the run starts, and each key matching one is defined by name the first time
    it is logged: Lightning's own ``*`` glob (everything against ``trainer/global_step``) matches it too,
    and W&B gives a metric defined by name precedence over any glob.
    """

    def __init__(
        self,
        *,
        axis: str = STEP,
        axis_globs: Sequence[str] = (),
        checkpoint_dirs: Sequence[Path] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._axis, self._axis_globs = axis, tuple(axis_globs)
        self._defined: set[str] = set()
        self.checkpoint_dirs = tuple(checkpoint_dirs)  # logger.log_model: their *.ckpt go up as an artifact

    @property
    def experiment(self):
        fresh = self._experiment is None
        run = super().experiment
        if fresh and self._experiment is not None:
            define_axes(run, self._axis, self._axis_globs)
        return run

    def define_keys(self, keys) -> None:
        """Define the not yet defined ``keys`` that match the stage's globs on its axis."""
        new = [k for k in keys if k not in self._defined and on_axis(k, self._axis, self._axis_globs)]
        for key in new:
            self.experiment.define_metric(key, step_metric=self._axis)
        self._defined.update(new)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.define_keys(metrics)
        super().log_metrics(metrics, step)


def on_axis(key: str, axis: str, globs: Sequence[str]) -> bool:
    return axis != STEP and key != axis and any(fnmatch.fnmatchcase(key, g) for g in globs)


def define_axes(run, axis: str, globs: Sequence[str]) -> None:
    """``axis`` is the x of every key matching ``globs`` (Lightning already made trainer/global_step that
    of all others); the axis itself is defined first, so no glob makes it its own step metric."""
    if axis == STEP or not globs:
        return
    run.define_metric(axis, step_metric=STEP)
    for glob in globs:
        run.define_metric(glob, step_metric=axis)


def run_name(cfg: DictConfig, run_dir: Path) -> str:
    """``<experiment>/<stage>`` plus the run folder's path under the stage folder (``reward/r3d``,
    ``classify/runs/rl/seed0/finetune``, a sweep's ``job3``), never the stage twice."""
    stage_root = Path(cfg.paths.run_root) / str(cfg.experiment_name) / str(cfg.stage.name)
    run_dir = Path(run_dir)
    try:
        parts = run_dir.resolve().relative_to(stage_root.resolve()).parts
    except ValueError:  # a run folder given elsewhere (tests, stage.run_dir overrides)
        parts = () if run_dir.name == cfg.stage.name else (run_dir.name,)
    parts = tuple(p for p in parts if not p.startswith("multirun_"))
    return "/".join([str(cfg.experiment_name), str(cfg.stage.name), *parts])


def run_tags(cfg: DictConfig) -> list[str]:
    return [f"dataset:{cfg.data.name}", f"experiment:{cfg.experiment_name}", *map(str, cfg.logger.tags)]


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config, with the fields of :func:`run_fields` on top (they replace e.g. ``seed``)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return {**config, **_RUN_FIELDS.get()}


def wandb_logger(cfg: DictConfig, run_dir: Path) -> StageWandbLogger:
    """The stage's W&B logger (``logger=wandb``): offline unless ``logger.mode=online``."""
    keys = STAGES.get(str(cfg.stage.name))
    if not isinstance(cfg.logger.log_model, bool):
        raise ConfigError(f"logger.log_model must be true or false, got {cfg.logger.log_model!r}")
    return StageWandbLogger(
        axis=keys.axis if keys else STEP,
        axis_globs=keys.axis_globs if keys else (),
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        name=run_name(cfg, run_dir),
        job_type=str(cfg.stage.name),
        tags=run_tags(cfg),
        save_dir=str(run_dir),
        offline=cfg.logger.mode == "offline",
        # Lightning's own log_model refuses offline runs; checkpoints are logged at the stage's end instead.
        checkpoint_dirs=(run_dir / "checkpoints", run_dir) if cfg.logger.log_model else (),
        config=run_config(cfg),
    )


def wandb_loggers(loggers: Sequence[Any]) -> list[WandbLogger]:
    """The W&B loggers among ``loggers``, on rank 0 only (other ranks log nothing)."""
    if rank_zero_only.rank != 0:
        return []
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def step_axes(trainer) -> dict[str, float]:
    """The axis value of the row Lightning logs now (``_batches_that_stepped``: what its logger connector
    passes as ``step``), for media logged beside their scalars."""
    return {STEP: int(trainer.fit_loop.epoch_loop._batches_that_stepped)}


def numbers(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested dicts of numbers into ``a/b/c`` keys; non-finite values and non-numbers are left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def runs(loggers: Sequence[Any]) -> list[Any]:
    """The W&B runs of ``loggers`` (started if need be), rank 0 only."""
    return [logger.experiment for logger in wandb_loggers(loggers)]


def log_table(run, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    import wandb

    run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})


def log_scatter(
    run, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], x: str, y: str, title: str
) -> None:
    """The rows as a table ``key`` and a ``y`` against ``x`` scatter chart of it (``<key>_scatter``)."""
    import wandb

    table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
    run.log({key: table, f"{key}_scatter": wandb.plot.scatter(table, x, y, title=title)})


def finish(loggers: Sequence[Any], summary: Mapping[str, Any] | None = None) -> None:
    """Write ``summary`` (nested numbers, flattened) into each W&B run's summary, then finish the run."""
    for logger in wandb_loggers(loggers):
        if logger._experiment is None:  # never started (nothing was logged)
            continue
        run = logger.experiment
        if summary:
            run.summary.update(numbers(summary))
        if isinstance(logger, StageWandbLogger):
            log_checkpoints(run, logger.checkpoint_dirs)
        run.finish()


def log_checkpoints(run, folders: Sequence[Path]) -> None:
    """The ``*.ckpt`` files of ``folders`` as one ``model`` artifact of the run (offline too: ``wandb sync``
    uploads it)."""
    files = sorted({p.resolve() for folder in folders for p in Path(folder).glob("*.ckpt") if p.is_file()})
    if not files:
        return
    import wandb

    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={"files": [p.name for p in files]})
    for path in files:
        artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact, aliases=["latest"])


@contextlib.contextmanager
def stage_run(cfg: DictConfig, run_dir: Path) -> Iterator[Any]:
    """The W&B logger of a stage without a Trainer (reward_data, evaluate): ``None`` unless
    ``logger=wandb``, on rank 0; its run is finished on exit (with exit code 1 when the stage raised)."""
    if cfg.logger.name != "wandb" or rank_zero_only.rank != 0:
        yield None
        return
    logger = wandb_logger(cfg, run_dir)
    run = logger.experiment
    try:
        yield logger
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()

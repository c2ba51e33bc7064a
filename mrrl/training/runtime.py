"""What every stage needs from the config: seeding, the run directory, the DataModule, loggers, Trainer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mrrl.errors import ConfigError

log = logging.getLogger("mrrl")


def run_dir_from_hydra(cfg: DictConfig) -> Path:
    """The Hydra job's output dir (distinct per sweep job); outside Hydra, <run_root>/<experiment>/<stage>."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path(cfg.paths.run_root) / cfg.experiment_name / cfg.stage.name


def seed_everything(seed: int) -> None:
    import lightning as L

    L.seed_everything(int(seed), workers=True, verbose=False)


def build_datamodule(cfg: DictConfig, **overrides: Any):
    """The shared ``MRIDataModule`` from ``cfg.data`` (keys are the constructor's arguments)."""
    from mrrl.data.datamodule import MRIDataModule

    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data, dict)
    if not data.get("root"):
        env = {"brats": "BRATS2019_ROOT", "oasis": "OASIS1_ROOT"}.get(str(data.get("format")), "")
        raise ConfigError(
            f"data.root is not set for dataset '{data.get('name')}': pass data.root=<dir>"
            + (f" or set the environment variable {env}" if env else "")
        )
    data.update(overrides)
    try:
        return MRIDataModule(**data)
    except TypeError as exc:
        raise ConfigError(f"unexpected key in the data config: {exc}") from exc


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """CSV always (the report reads it); W&B on top when ``logger=wandb``; nothing with ``logger=none``."""
    from lightning.pytorch.loggers import CSVLogger

    name = cfg.logger.name
    if name == "none":
        return []
    _keep_previous_metrics(run_dir / "logs")
    loggers: list = [CSVLogger(save_dir=str(run_dir), name="logs", version="", flush_logs_every_n_steps=10)]
    if name == "wandb":
        from mrrl.tracking.wandb_run import wandb_logger

        loggers.append(wandb_logger(cfg, run_dir))  # group, job type, tags, axes: mrrl/tracking
    elif name != "csv":
        raise ConfigError(f"unknown logger {name!r}: use logger=csv, logger=wandb or logger=none")
    return loggers


def _keep_previous_metrics(log_dir: Path) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv; a resumed run keeps it as metrics.part<k>.csv."""
    current = log_dir / "metrics.csv"
    if current.is_file() and current.stat().st_size > 0:
        k = len(list(log_dir.glob("metrics.part*.csv")))
        current.rename(log_dir / f"metrics.part{k}.csv")


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments for ``lightning.Trainer`` from the ``trainer`` group merged with ``stage.trainer``."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    stage_kwargs = OmegaConf.to_container(cfg.stage.get("trainer") or OmegaConf.create(), resolve=True)
    assert isinstance(kwargs, dict) and isinstance(stage_kwargs, dict)
    return {**kwargs, **stage_kwargs}

"""The ``mrrl`` console script (also ``python -m mrrl``): compose ``conf/config.yaml``, run ``stage=``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("mrrl")


def find_config_dir() -> str:
    """``conf/`` beside the package (editable install / source checkout), or ``$MRRL_CONFIG_DIR``."""
    candidates = [os.environ.get("MRRL_CONFIG_DIR"), Path(__file__).resolve().parent.parent / "conf"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return str(Path(candidate).resolve())
    raise SystemExit(
        "mrrl: cannot find its Hydra configs (conf/config.yaml). Install mrrl in editable mode from a source "
        "checkout (`make install`) or set MRRL_CONFIG_DIR=<checkout>/conf."
    )


CONFIG_DIR = find_config_dir()


def run_stage(cfg: DictConfig):
    """Seed, pick the run directory, run the stage; user errors become one message and exit status 1.

    Returns the stage's outputs, or with ``objective=<dotted key>`` that one metric as a float, which is what
    Hydra's Optuna sweeper optimises (``mrrl/sweep_objective.py``).
    """
    from mrrl.config_checks import exit_on_bad_config
    from mrrl.errors import MrrlError
    from mrrl.stages import get_stage
    from mrrl.training.distributed import begin_stage
    from mrrl.training.runtime import run_dir_from_hydra, seed_everything

    exit_on_bad_config(cfg)  # also run by the Hydra callback; here for sweep jobs and in-process callers
    begin_stage(cfg)  # DDP × --multirun guard, SLURM sizes, one W&B run per job: mrrl/distributed.py
    _route_lightning_logs_through_hydra()
    run_dir = run_dir_from_hydra(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=True))
    seed_everything(cfg.seed)
    _pin_determinism(cfg)
    try:
        stage = get_stage(cfg.stage.name)
        if cfg.get("objective") is None:
            return stage(cfg, run_dir)
        from mrrl.sweep_objective import check_objective, objective_value
        from mrrl.training.distributed import hydra_config

        check_objective(cfg)
        outputs = stage(cfg, run_dir)
        hydra = hydra_config()
        overrides = list(hydra.overrides.task) if hydra is not None else []
        return objective_value(cfg, outputs, run_dir, overrides)
    except MrrlError as exc:
        print(f"mrrl: error: {exc}", file=sys.stderr)
        log.debug("details", exc_info=True)
        sys.exit(1)


def _pin_determinism(cfg: DictConfig) -> None:
    """``trainer.deterministic`` for every stage, also those that run no Lightning ``Trainer``."""
    mode = OmegaConf.select(cfg, "stage.trainer.deterministic", default=None)
    mode = OmegaConf.select(cfg, "trainer.deterministic") if mode is None else mode
    if not mode:
        return
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
    torch.use_deterministic_algorithms(True, warn_only=mode == "warn")
    torch.backends.cudnn.benchmark = False


def _route_lightning_logs_through_hydra() -> None:
    """Lightning adds its own console handler; Hydra's root handlers already print (and file) its records."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig):
    return run_stage(cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()

"""Stage registry: ``stage=<name>`` runs ``run(cfg, run_dir)`` of the module named here (imported lazily)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mrrl.errors import ConfigError

STAGES: dict[str, str] = {  # every stage; the pipeline ones in pipeline order
    "check_data": "mrrl.stages.check_data",
    "vqgan": "mrrl.stages.vqgan",
    "diffusion": "mrrl.stages.diffusion",
    "reward_data": "mrrl.stages.reward_data",
    "reward": "mrrl.stages.reward",
    "ppo": "mrrl.stages.ppo",
    "evaluate": "mrrl.stages.evaluate",
    "classify": "mrrl.stages.classify",
    "export": "mrrl.stages.export",  # on demand only: in no experiment's pipeline.stages
}
PIPELINE_STAGES = tuple(s for s in STAGES if s != "export")  # what a full pipeline runs, in order


def get_stage(name: str) -> Callable[[Any, Path], dict[str, Any] | None]:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; available: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).run

"""Stage registry: ``stage=<name>`` runs ``run(cfg, run_dir)`` of the module named here (imported lazily)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mrrl.errors import ConfigError
from mrrl.manifest import ON_DEMAND_STAGES, PIPELINE_STAGES

__all__ = ["ON_DEMAND_STAGES", "PIPELINE_STAGES", "STAGES", "get_stage"]

# Every stage: the pipeline ones in pipeline order, then the on-demand ones (in no experiment's pipeline).
STAGES: dict[str, str] = {name: f"mrrl.stages.{name}" for name in (*PIPELINE_STAGES, *ON_DEMAND_STAGES)}


def get_stage(name: str) -> Callable[[Any, Path], dict[str, Any] | None]:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; available: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).run

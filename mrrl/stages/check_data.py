"""``mrrl stage=check_data``: validate and preprocess a dataset without training, print Table 1."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mrrl.data import format_summary
from mrrl.manifest import write_manifest
from mrrl.runtime import build_datamodule

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    datamodule = build_datamodule(cfg).prepare()
    summary = datamodule.summary()
    print(f"dataset {summary['dataset']} at {summary['root']}")
    print(format_summary(summary))
    print(f"split file: {summary['split_file']}")
    write_manifest(run_dir, "check_data", summary, cfg)
    return summary

"""Helpers for stage tests: compose the real Hydra config in-process with tiny overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mrrl.cli import CONFIG_DIR

TINY_DATA = [
    "data.image_size=16",
    "data.test_per_class=1",
    "data.val_fraction=0.25",
    "data.progress=false",
    "data.batch_size=2",
    "trainer.log_every_n_steps=1",
]
TINY_VQGAN = [
    "stage.net.channels=[8,16]",
    "stage.net.num_res_blocks=1",
    "stage.net.codebook_size=32",
    "stage.net.codebook_dim=4",
    "stage.discriminator.channels=8",
    "stage.discriminator.num_layers=2",
    "stage.discriminator.slices_per_volume=2",
    "stage.progress_bar=false",
    "stage.trainer.check_val_every_n_epoch=1",
]


def compose_cfg(overrides: Sequence[str], run_root: Path) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"paths.run_root={run_root}"])


def stage_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.run_root) / cfg.experiment_name / cfg.stage.name

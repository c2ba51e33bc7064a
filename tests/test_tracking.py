"""W&B run settings without a run: names, tags, config fields, axes, key templates, summary flattening."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import compose_cfg

from mrrl.errors import ConfigError
from mrrl.tracking.keys import expand, key_pattern, matches, stage_keys
from mrrl.tracking.wandb_run import StageWandbLogger, numbers, on_axis, run_fields, run_name
from mrrl.training.runtime import build_loggers


def test_run_names_never_repeat_the_stage(tmp_path: Path) -> None:
    cfg = compose_cfg(["stage=vqgan", "experiment_name=demo"], tmp_path)
    stage_root = tmp_path / "demo" / "vqgan"
    assert run_name(cfg, stage_root) == "demo/vqgan"
    assert run_name(cfg, stage_root / "multirun_2026-12-01_10-00-00-123456" / "job3") == "demo/vqgan/job3"
    assert run_name(cfg, tmp_path / "elsewhere" / "vqgan") == "demo/vqgan"
    cfg = compose_cfg(["stage=classify", "experiment_name=demo"], tmp_path)
    deep = tmp_path / "demo" / "classify" / "runs" / "rl" / "seed1" / "finetune"
    assert run_name(cfg, deep) == "demo/classify/runs/rl/seed1/finetune"


def test_logger_settings_group_job_type_tags_fields_and_log_model(tmp_path: Path) -> None:
    cfg = compose_cfg(
        ["stage=ppo", "experiment_name=demo", "logger=wandb", "logger.tags=[mine]", "logger.log_model=true"],
        tmp_path,
    )
    with run_fields(protocol="rl", seed=3):
        (_, logger) = build_loggers(cfg, tmp_path / "demo" / "ppo")
    assert (
        isinstance(logger, StageWandbLogger)
        and logger.checkpoint_dirs[0] == tmp_path / "demo/ppo/checkpoints"
    )
    init = logger._wandb_init
    assert init["group"] == "demo" and init["job_type"] == "ppo" and init["name"] == "demo/ppo"
    assert init["tags"] == ["dataset:phantom_tumor", "experiment:demo", "mine"]
    assert init["config"]["protocol"] == "rl" and init["config"]["seed"] == 3  # the run's own seed wins
    assert logger._offline  # logger.mode=offline, the default
    assert logger._axis == "ppo/iteration"
    (_, plain) = build_loggers(cfg, tmp_path / "x")  # outside run_fields: the composed config only
    assert "protocol" not in plain._wandb_init["config"] and plain._wandb_init["config"]["seed"] == 0
    with pytest.raises(ConfigError, match="logger.log_model must be true or false"):
        build_loggers(compose_cfg(["stage=ppo", "logger=wandb", "logger.log_model=all"], tmp_path), tmp_path)


def test_axis_routing_and_key_templates() -> None:
    ppo = stage_keys("ppo")
    assert on_axis("reward/total_HGG", ppo.axis, ppo.axis_globs) and on_axis(
        "fid/mean", ppo.axis, ppo.axis_globs
    )
    assert not on_axis("ppo/iteration", ppo.axis, ppo.axis_globs)  # the axis is not plotted against itself
    assert not on_axis("lr-AdamW", ppo.axis, ppo.axis_globs)
    assert not on_axis("val/psnr", stage_keys("vqgan").axis, ("*",))  # trainer/global_step: Lightning's own
    assert expand("evaluate/fid/{model}/{cls}", model=["rl"], cls=["AD", "CN"]) == [
        "evaluate/fid/rl/AD",
        "evaluate/fid/rl/CN",
    ]
    assert matches("reward/{reward}_{cls}", ["reward/total_HGG", "reward/x/y_HGG", "ppo/kl"]) == [
        "reward/total_HGG"
    ]
    assert not key_pattern("fid/{cls}").match("fid/HGG/extra")
    with pytest.raises(KeyError, match="no values"):
        expand("fid/{cls}")
    with pytest.raises(KeyError, match="no W&B keys for stage"):
        stage_keys("nope")


def test_summary_values_are_flattened_finite_numbers() -> None:
    values = {"final": {"val": {"mse": 0.5, "n": 3}, "bad": math.nan, "none": None, "flag": True, "s": "x"}}
    assert numbers(values) == {"final/val/mse": 0.5, "final/val/n": 3.0}

"""Every config group combination composes, resolves and instantiates."""

from __future__ import annotations

import functools
import inspect
import itertools
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

from mrrl.cli import CONFIG_DIR
from mrrl.stages import PIPELINE_STAGES, STAGES
from mrrl.training.runtime import build_datamodule, build_loggers, trainer_kwargs


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_groups_exist() -> None:
    assert {"brats2019", "oasis1", "phantom_tumor", "phantom_atrophy"} <= set(options("data"))
    assert {"cpu", "gpu", "ddp", "ddp_cpu"} <= set(options("trainer"))
    assert {"csv", "wandb", "none"} <= set(options("logger"))
    assert {"demo", "demo_atrophy", "brats2019", "oasis1"} <= set(options("experiment"))
    assert set(options("stage")) == set(STAGES)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


@pytest.mark.parametrize("data", options("data"))
def test_every_combination_composes_and_instantiates(tmp_path: Path, data: str) -> None:
    """data × stage × trainer, each with one logger: the DataModule, loggers and Trainer arguments build for
    each. The logger cycles, so every (data, logger), (stage, logger) and (trainer, logger) pair is built at a
    third of the full product's composition time (a Hydra compose is ~0.25 s)."""
    accepted = set(inspect.signature(L.Trainer.__init__).parameters)
    built_trainers: set[str] = set()
    loggers = itertools.cycle(options("logger"))
    combos = [(s, t, next(loggers)) for s, t in itertools.product(options("stage"), options("trainer"))]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        configs = [
            (
                stage,
                trainer,
                logger,
                compose(
                    config_name="config",
                    overrides=[
                        f"data={data}",
                        f"stage={stage}",
                        f"trainer={trainer}",
                        f"logger={logger}",
                        f"paths.run_root={tmp_path}",
                        "data.root=/some/where",
                    ],
                ),
            )
            for stage, trainer, logger in combos
        ]
    for stage, trainer, logger, cfg in configs:
        dm = build_datamodule(cfg)
        assert dm.name == data and dm.num_classes == 2 and cfg.stage.name == stage
        loggers = build_loggers(cfg, tmp_path)
        assert len(loggers) == {"none": 0, "csv": 1, "wandb": 2}[logger]
        kwargs = trainer_kwargs(cfg)
        assert set(kwargs) <= accepted, set(kwargs) - accepted
        if kwargs["accelerator"] == "cpu" and (trainer, stage) not in built_trainers:
            # Instantiating a CPU trainer validates strategy/precision/devices combinations for real.
            built_trainers.add((trainer, stage))
            L.Trainer(
                **kwargs,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                default_root_dir=str(tmp_path),
            )


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose_with_every_stage(tmp_path: Path, experiment: str) -> None:
    cfg = _compose([f"experiment={experiment}", f"paths.run_root={tmp_path}"])
    assert cfg.experiment_name == experiment
    assert all(stage in STAGES for stage in cfg.pipeline.stages)
    if experiment.startswith("demo"):
        assert cfg.trainer.accelerator == "cpu" and cfg.data.phantom is not None
        assert list(cfg.pipeline.stages) == list(PIPELINE_STAGES)  # the demo runs the whole pipeline
    for stage in STAGES:
        # Presets (conf/preset/<experiment>_<stage>.yaml) must only touch keys the stage knows.
        base = _stage_keys(stage)
        staged = _compose([f"experiment={experiment}", f"stage={stage}", f"paths.run_root={tmp_path}"]).stage
        assert staged.name == stage
        assert _keys(staged) <= base, f"{experiment}_{stage} preset adds unknown keys"


@functools.cache
def _stage_keys(stage: str) -> frozenset[str]:
    """The keys of a stage's config without an experiment (composed once, not once per experiment)."""
    return frozenset(_keys(_compose([f"stage={stage}", "paths.run_root=/unused"]).stage))


def _keys(node, prefix: str = "") -> set[str]:
    from omegaconf import DictConfig

    out = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, DictConfig) and key not in (
            "trainer",
            "extractor_options",
            "extra_models",
            "extra_generators",
            "args",
        ):
            out |= _keys(value, path + ".")
    return out


def test_ddp_is_four_gpus_bf16() -> None:
    cfg = _compose(["trainer=ddp"])
    assert (cfg.trainer.devices, cfg.trainer.precision, cfg.trainer.strategy) == (4, "bf16-mixed", "ddp")
    cpu = _compose(["trainer=ddp_cpu"])
    assert (cpu.trainer.accelerator, cpu.trainer.devices) == ("cpu", 2)


def test_missing_real_data_root_is_a_clear_error(monkeypatch) -> None:
    from mrrl.errors import ConfigError

    monkeypatch.delenv("BRATS2019_ROOT", raising=False)
    with pytest.raises(ConfigError, match="data.root=<dir> or set the environment variable BRATS2019_ROOT"):
        build_datamodule(_compose(["data=brats2019"]))

"""``objective=<key>``: the number a job returns for Hydra's Optuna sweeper, and the sweeper configs.

Without the plugin: the key makes ``run_stage`` return a float (from a finished stage's manifest too), bad keys
say which keys exist, non-finite values follow Optuna's conventions. With ``hydra-optuna-sweeper`` (the extra
``mrrl[sweep]``): ``hydra/sweeper=ppo_optuna`` runs real PPO trials through the CLI.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from conftest import make_brats
from helpers import compose_cfg, run_mrrl, stage_dir, tiny_checkpoints
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mrrl.cli import CONFIG_DIR, run_stage
from mrrl.errors import ConfigError, ManifestError
from mrrl.sweep_objective import check_objective, lookup, objective_value

PLUGIN = "hydra_plugins.hydra_optuna_sweeper"


def has_plugin() -> bool:
    try:
        __import__(PLUGIN)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> Path:
    # 4 + 4 subjects: 1 per class for test and validation, 2 per class for training (FID statistics need 2).
    return make_brats(tmp_path_factory.mktemp("optuna") / "brats", n_hgg=4, n_lgg=4, modalities=("flair",))


def data_args(root: Path) -> list[str]:
    return [
        "data=brats2019",
        f"data.root={root}",
        "data.image_size=16",
        "data.test_per_class=1",
        "data.val_fraction=0.25",
        "data.progress=false",
    ]


def mrrl(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_mrrl(*args, timeout=timeout)


# ---------------------------------------------------------------------------------------------- no plugin needed


def test_objective_is_returned_as_float_also_for_a_finished_stage(brats, tmp_path, monkeypatch) -> None:
    import mrrl.cli
    import mrrl.training.distributed

    # run_stage in this process: without the process-wide set-up it does for a CLI run (signals, log handlers).
    monkeypatch.setattr(mrrl.training.distributed, "begin_stage", lambda cfg: None)
    monkeypatch.setattr(mrrl.cli, "_route_lightning_logs_through_hydra", lambda: None)
    cfg = compose_cfg(["stage=check_data", *data_args(brats), "objective=counts.total.All"], tmp_path)
    assert run_stage(cfg) == 8.0 and isinstance(run_stage(cfg), float)
    unset = compose_cfg(["stage=check_data", *data_args(brats)], tmp_path)
    assert run_stage(unset)["counts"]["total"]["All"] == 8  # unchanged without objective

    # A finished stage returns None (nothing rerun): the value comes from its manifest.
    import mrrl.stages

    monkeypatch.setattr(mrrl.stages, "get_stage", lambda name: lambda cfg, run_dir: None)
    assert run_stage(cfg) == 8.0
    run_dir = stage_dir(cfg)
    assert objective_value(cfg, None, run_dir, ["seed=0", "data=brats2019", "objective=x"]) == 8.0
    # ... but only if the manifest was made with this job's overrides (an Optuna trial drawing new values in
    # an old sweep folder must not be credited with the old run's result).
    other_seed = compose_cfg(
        ["stage=check_data", *data_args(brats), "objective=counts.total.All", "seed=3"], tmp_path
    )
    with pytest.raises(ConfigError, match=r"other settings \(seed: 0 there, 3 here\)"):
        objective_value(other_seed, None, run_dir, ["seed=3"])
    (run_dir / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="returned no outputs"):
        objective_value(cfg, None, run_dir)


def test_bad_key_is_a_clear_cli_error_naming_the_keys(brats, tmp_path) -> None:
    result = mrrl(
        "stage=check_data", *data_args(brats), f"paths.run_root={tmp_path}", "objective=counts.total.Al"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("mrrl: error: objective=counts.total.Al: no key 'Al' at 'counts.total'")
    assert "counts.total.All" in message and "counts.train.HGG" in message


def test_lookup_non_finite_values_and_non_numbers() -> None:
    outputs = {
        "val": {"val/l1": 0.25, "lr.g": 1e-3, "nan": math.nan, "null": None, "inf": -math.inf},
        "shape": [1, 16],
        "best_ckpt": "/x/best.ckpt",
    }
    assert lookup(outputs, "val.lr.g", "outputs") == 1e-3  # a key with a dot is matched whole
    assert lookup(outputs, "shape.1", "outputs") == 16
    cfg = OmegaConf.create({"objective": "val.val/l1", "stage": {"name": "vqgan"}})

    def value(key: str):
        cfg.objective = key
        return objective_value(cfg, outputs, Path("."))

    assert value("val.val/l1") == 0.25
    assert value("val.inf") == -math.inf  # Optuna stores ±inf as a completed trial
    assert (
        value("val.nan") is None and value("val.null") is None
    )  # failed trial (see mrrl/sweep_objective.py)
    with pytest.raises(ConfigError, match=r"is str '/x/best.ckpt' .*not a number.*val\.val/l1, val\.lr\.g"):
        value("best_ckpt")
    with pytest.raises(ConfigError, match="is a dictionary with keys val/l1, lr.g"):
        value("val")
    with pytest.raises(ConfigError, match="no key 'vall.x' at the top level"):
        value("vall.x")


def test_other_ranks_return_none(monkeypatch) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    cfg = OmegaConf.create({"objective": "x", "stage": {"name": "ppo"}})
    assert objective_value(cfg, None, Path("/nonexistent")) is None


def test_ppo_fid_objective_needs_the_probe_and_plain_configs_compose(tmp_path) -> None:
    def cfg(*overrides: str):
        return compose_cfg(["stage=ppo", "objective=final_metrics.fid/mean", *overrides], tmp_path)

    check_objective(cfg())  # probe.every=10 of 200 iterations
    for bad in (["stage.probe.every=0"], ["stage.probe.every=10", "stage.trainer.max_epochs=5"]):
        with pytest.raises(ConfigError, match="needs PPO's FID probe"):
            check_objective(cfg(*bad))
    with pytest.raises(ConfigError, match="not a dotted key"):
        check_objective(compose_cfg(["objective=a..b"], tmp_path))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        plain = compose("config", overrides=["stage=ppo"], return_hydra_config=True)
        assert plain.objective is None and plain.hydra.sweeper._target_.endswith("BasicSweeper")
        if not has_plugin():  # the sweeper configs are only loaded when selected, and then need the plugin
            with pytest.raises(Exception, match="optuna"):
                compose("config", overrides=["hydra/sweeper=ppo_optuna"], return_hydra_config=True)


# ---------------------------------------------------------------------------------------------- with the plugin


def test_sweeper_configs_extend_the_plugin(tmp_path) -> None:
    pytest.importorskip(PLUGIN, reason="needs the extra mrrl[sweep]")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["stage=ppo", "hydra/sweeper=ppo_optuna", f"paths.run_root={tmp_path}"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_.endswith("TPESampler")
    assert sweeper.direction == "minimize" and sweeper.n_jobs == 1 and sweeper.sampler.seed == 0
    assert dict(sweeper.params) == {
        "stage.train.kl.coef": "tag(log, interval(0.001, 0.3))",
        "stage.train.lr": "tag(log, interval(1.0e-6, 3.0e-4))",
        "objective": "final_metrics.fid/mean",
    }
    assert (
        sweeper.storage.path == f"{tmp_path}/default/ppo/optuna.db"
        and sweeper.study_name == "default-ppo-fid"
    )


def test_plugin_records_none_as_a_failed_trial_and_goes_on(tmp_path, monkeypatch) -> None:
    """What mrrl returns for a NaN objective (None) fails that trial only; ±inf is a value."""
    pytest.importorskip(PLUGIN, reason="needs the extra mrrl[sweep]")
    import optuna
    from hydra.core.plugins import Plugins
    from hydra.core.utils import JobReturn, JobStatus
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

    cfg = OmegaConf.create({"objective": "m", "stage": {"name": "ppo"}})
    returned = [objective_value(cfg, {"m": v}, tmp_path) for v in (math.nan, 0.5, math.inf)]

    class Launcher:
        def launch(self, job_overrides, initial_job_idx):
            return [
                JobReturn(status=JobStatus.COMPLETED, _return_value=returned.pop(0)) for _ in job_overrides
            ]

    monkeypatch.setattr(Plugins, "instantiate_launcher", lambda self, **kwargs: Launcher())
    storage = optuna.storages.InMemoryStorage()
    sweeper = OptunaSweeperImpl(
        optuna.samplers.RandomSampler(seed=0), "minimize", storage, "s", 3, 1, 0.0,
        None, None, OmegaConf.create({"x": "interval(0, 1)"}),
    )  # fmt: skip
    sweeper.setup(
        hydra_context=object(),  # only passed on to the launcher
        task_function=None,
        config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}),
    )
    sweeper.sweep([])
    states = [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"]
    assert OmegaConf.load(tmp_path / "optimization_results.yaml").best_value == 0.5


def tiny_ppo_inputs(root: Path) -> dict[str, str]:
    """Random-weight VQGAN, diffusion and R3D checkpoints in the stages' formats (16³, HGG/LGG)."""
    import torch

    from mrrl.reward.models import build_reward_net

    ckpts = tiny_checkpoints(root, ["HGG", "LGG"])
    net = {"arch": "resnet10", "width": 8, "conv1_kernel": 3}
    r3d = build_reward_net("r3d", (1, 16, 16, 16), net, load_pretrained=False)
    state = {f"net.{k}": v for k, v in r3d.state_dict().items()}
    hparams = {"kind": "r3d", "image_shape": [1, 16, 16, 16], "net": net}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, root / "r3d.ckpt")
    return {**ckpts, "r3d": str(root / "r3d.ckpt")}


def test_ppo_optuna_sweep_through_the_cli(brats, tmp_path) -> None:
    pytest.importorskip(PLUGIN, reason="needs the extra mrrl[sweep]")
    ckpts = tiny_ppo_inputs(tmp_path / "ckpt")
    args = [
        "-m",
        "hydra/sweeper=ppo_optuna",
        "stage=ppo",
        *data_args(brats),
        f"paths.run_root={tmp_path / 'runs'}",
        "experiment_name=opt",
        "logger=none",
        f"stage.diffusion_ckpt={ckpts['diffusion']}",
        f"stage.vqgan_ckpt={ckpts['vqgan']}",
        f"stage.reward.r3d_ckpt={ckpts['r3d']}",
        "stage.reward.w2d=0",
        "stage.sample.num_steps=4",
        "stage.sample.batch_size=4",
        "stage.train.batch_size=4",
        "stage.train.min_step_std=0",
        "stage.sample.decode_quantize=false",
        "stage.probe.every=1",
        "stage.probe.n=2",
        "stage.probe.split=train",  # 1 validation volume per class here; the probe needs 2
        "stage.figures.every=100",
        "stage.progress_bar=false",
        "stage.trainer.max_epochs=1",
        "hydra.sweeper.n_trials=2",
    ]
    result = mrrl(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweeps = sorted((tmp_path / "runs" / "opt" / "ppo").glob("multirun_*"))
    assert len(sweeps) == 1 and sorted(j.name for j in sweeps[0].glob("job*")) == ["job0", "job1"]
    values = {}
    for job in sweeps[0].glob("job*"):
        manifest = json.loads((job / "manifest.json").read_text())
        stage = manifest["config"]["stage"]
        coef, lr = stage["train"]["kl"]["coef"], stage["train"]["lr"]
        assert 0.001 <= coef <= 0.3 and 1e-6 <= lr <= 3e-4
        assert "objective=final_metrics.fid/mean" in (job / ".hydra" / "overrides.yaml").read_text()
        values[(coef, lr)] = manifest["outputs"]["final_metrics"]["fid/mean"]
    results = OmegaConf.load(sweeps[0] / "optimization_results.yaml")
    best = (results.best_params["stage.train.kl.coef"], results.best_params["stage.train.lr"])
    assert results.best_value == min(values.values()) == values[best]

    # The study is in <run_root>/<experiment>/ppo/optuna.db under a fixed name: the same command continues it.
    import optuna

    db = f"sqlite:///{tmp_path / 'runs' / 'opt' / 'ppo' / 'optuna.db'}"
    trials = optuna.load_study(study_name="opt-ppo-fid", storage=db).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(t.value for t in trials) == sorted(values.values())
    assert trials[0].user_attrs["objective"] == "final_metrics.fid/mean"

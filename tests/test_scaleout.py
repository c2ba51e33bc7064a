"""Scale-out: DDP (spawn in-process, plain ddp through the CLI), sweeps, the DDP × --multirun guard, the SLURM
launcher config, W&B offline runs per sweep job, and resuming after SIGKILL / SIGTERM."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT, make_brats
from helpers import TINY_DATA, TINY_VQGAN, compose_cfg, run_mrrl, stage_dir, wandb_records
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from mrrl.cli import CONFIG_DIR
from mrrl.errors import ConfigError
from mrrl.stages import vqgan as vqgan_stage
from mrrl.training.distributed import check_launch, local_processes, reexecutes_command_line

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
# 4 + 4 subjects: 1 per class for test, 1 per class for validation, 4 training volumes → batch 2 gives
# 2 steps per epoch in one process and 1 per rank under 2-process DDP.
N_PER_CLASS = 4
TINY_DIFFUSION = [
    "stage.unet.channels=[8,16]",
    "stage.unet.attention_levels=[false,true]",
    "stage.unet.num_res_blocks=1",
    "stage.unet.num_head_channels=8",
    "stage.unet.norm_num_groups=8",
    "stage.progress_bar=false",
    "stage.checkpoint_every_n_steps=1",
    "stage.optim.warmup_steps=0",
    "stage.val_sampling_steps=2",
    "stage.inference_steps=3",
    "stage.val_samples_per_class=1",
    "stage.sample_every_n_epochs=0",
    "stage.trainer.max_epochs=1",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scaleout") / "brats"
    return make_brats(root, n_hgg=N_PER_CLASS, n_lgg=N_PER_CLASS, modalities=("flair",))


def tiny_args(data_root: Path, run_root: Path | None, *extra: str) -> list[str]:
    """A tiny VQGAN run's overrides (``run_root=None``: for ``compose_cfg``, which sets it itself)."""
    return [
        "stage=vqgan",
        "data=brats2019",
        f"data.root={data_root}",
        *([f"paths.run_root={run_root}"] if run_root else []),
        *TINY_DATA,
        *TINY_VQGAN,
        "stage.discriminator.num_layers=1",  # fewer convolutions: these tests are about processes, not GANs
        *extra,
    ]


def mrrl(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_mrrl(*args, env=env, timeout=timeout)


def ckpt_state(path: Path) -> dict[str, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {
        "global_step": int(ckpt["global_step"]),
        "generator_steps": int(ckpt["state_dict"]["generator_steps"]),
    }


def steps_per_epoch(manifest: dict[str, Any], world_size: int, batch: int = 2) -> int:
    train = manifest["outputs"]["data"]["counts"]["train"]["All"]
    return math.ceil(math.ceil(train / world_size) / batch)


# ---------------------------------------------------------------------------------------------- the guard


def fake_hydra(mode: str, launcher: str = BASIC_LAUNCHER, **launcher_keys: Any):
    return OmegaConf.create({"mode": f"RunMode.{mode}", "launcher": {"_target_": launcher, **launcher_keys}})


def test_guard_refuses_reexecuting_ddp_only_inside_multirun(tmp_path: Path) -> None:
    cfg = compose_cfg(["stage=vqgan", "trainer=ddp_cpu"], tmp_path)
    with pytest.raises(ConfigError, match=r"ddp_spawn.*hydra/launcher=slurm"):
        check_launch(cfg, fake_hydra("MULTIRUN"))
    check_launch(cfg, fake_hydra("RUN"))  # single runs may re-execute: that is how plain ddp works
    check_launch(cfg, None)  # outside Hydra (tests, notebooks)
    for allowed in (
        ["stage=vqgan", "trainer=ddp_cpu", "trainer.strategy=ddp_spawn"],
        ["stage=vqgan", "trainer=ddp_cpu", "trainer.devices=1"],
        ["stage=check_data", "trainer=ddp_cpu"],  # starts no processes
        ["stage=evaluate", "trainer=ddp_cpu", "trainer.strategy=ddp_spawn"],  # generates in one process
    ):
        check_launch(compose_cfg(allowed, tmp_path), fake_hydra("MULTIRUN"))
    # `auto` with several devices becomes ddp; a stage-level Trainer override counts too.
    for refused in (
        ["trainer=ddp_cpu", "trainer.strategy=auto"],
        ["stage=evaluate", "trainer=ddp_cpu"],  # shares its sampling over ranks started by Fabric
        ["trainer=cpu", "+stage.trainer.devices=2", "+stage.trainer.strategy=ddp"],
    ):
        with pytest.raises(ConfigError, match="--multirun"):
            args = refused if refused[0].startswith("stage=") else ["stage=vqgan", *refused]
            check_launch(compose_cfg(args, tmp_path), fake_hydra("MULTIRUN"))
    # Under the submitit SLURM launcher SLURM starts the ranks: plain ddp is right, if the sizes agree.
    check_launch(cfg, fake_hydra("MULTIRUN", SLURM_LAUNCHER, nodes=1, tasks_per_node=2))
    with pytest.raises(ConfigError, match="tasks_per_node=1 but trainer.devices=2"):
        check_launch(cfg, fake_hydra("MULTIRUN", SLURM_LAUNCHER, nodes=1, tasks_per_node=1))


def test_strategy_and_device_parsing() -> None:
    assert reexecutes_command_line("ddp") and reexecutes_command_line("ddp_find_unused_parameters_true")
    assert reexecutes_command_line("fsdp") and reexecutes_command_line("auto")
    assert not any(map(reexecutes_command_line, ("ddp_spawn", "ddp_fork", "ddp_notebook", "single_device")))
    assert reexecutes_command_line({"_target_": "lightning.pytorch.strategies.DDPStrategy"})
    assert not reexecutes_command_line({"_target_": "x.DDPStrategy", "start_method": "spawn"})
    assert [local_processes({"devices": d}) for d in (4, "2", "0,1,3", [0, 1], 1)] == [4, 2, 3, 2, 1]
    assert local_processes({"devices": "auto", "accelerator": "cpu"}) == 1


@pytest.mark.parametrize(
    "name, start_method",
    [("ddp", "popen"), ("ddp_spawn", "spawn"), ("ddp_fork", "fork"), ("ddp_notebook", "fork")],
)
def test_gan_stages_get_ddp_with_unused_parameters_however_ranks_start(name: str, start_method: str) -> None:
    """The VQGAN's two optimisers each leave parameters without gradients: every DDP flavour gets
    ``find_unused_parameters`` and keeps its way of starting ranks; other strategies pass through."""
    from lightning.pytorch.strategies import DDPStrategy

    from mrrl.training.trainer import _strategy

    strategy = _strategy({"strategy": name}, find_unused_parameters=True)
    assert isinstance(strategy, DDPStrategy) and strategy._start_method == start_method
    assert strategy._ddp_kwargs["find_unused_parameters"] is True
    assert _strategy({"strategy": name}, find_unused_parameters=False) == name
    assert _strategy({"strategy": "fsdp"}, find_unused_parameters=True) == "fsdp"


def test_cli_multirun_with_plain_ddp_is_refused_before_any_rank_starts(
    data_root: Path, tmp_path: Path
) -> None:
    result = mrrl("-m", *tiny_args(data_root, tmp_path, "trainer=ddp_cpu", "seed=0,1"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot run inside a Hydra --multirun sweep" in result.stderr and "ddp_spawn" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("train_ddp_process_*")) and not list(tmp_path.rglob("*.ckpt"))


# ---------------------------------------------------------------------------------------------- SLURM launcher


@dataclass
class _SubmititSlurmStandIn:
    """The fields of hydra-submitit-launcher's ``SlurmQueueConf`` that mrrl's ``slurm.yaml`` sets or reads."""

    _target_: str = SLURM_LAUNCHER
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    timeout_min: int = 60
    cpus_per_task: int | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int = 1
    mem_gb: int | None = None
    nodes: int = 1
    name: str = "${hydra.job.name}"
    partition: str | None = None
    signal_delay_s: int = 120
    max_num_timeout: int = 0
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    array_parallelism: int = 256
    setup: list[str] | None = None


@pytest.fixture
def submitit_slurm_config():
    """The plugin's ``submitit_slurm`` config when installed (``mrrl[slurm]``), else a stand-in schema."""
    try:
        import hydra_plugins.hydra_submitit_launcher.config  # noqa: F401  (registers submitit_slurm)

        yield "plugin"
        return
    except ImportError:
        pass
    store = ConfigStore.instance()
    store.store(
        group="hydra/launcher", name="submitit_slurm", node=_SubmititSlurmStandIn, provider="mrrl-test"
    )
    yield "stand-in"
    store.repo["hydra"]["launcher"].pop("submitit_slurm.yaml", None)


def test_slurm_launcher_sizes_follow_the_trainer(submitit_slurm_config, tmp_path: Path) -> None:
    def launcher_cfg(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(
                "config",
                overrides=["stage=vqgan", "hydra/launcher=slurm", f"paths.run_root={tmp_path}", *overrides],
                return_hydra_config=True,
            )

    cfg = launcher_cfg("trainer=ddp", "trainer.num_nodes=2")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout > 0 and launcher.name == "mrrl-vqgan"
    hydra = OmegaConf.merge(cfg.hydra, {"mode": "RunMode.MULTIRUN"})
    check_launch(cfg, hydra)  # plain ddp under SLURM: allowed
    bad = launcher_cfg("trainer=ddp", "hydra.launcher.nodes=2")  # sizes set on the launcher, not the Trainer
    with pytest.raises(ConfigError, match="hydra.launcher.nodes=2 but trainer.num_nodes=1"):
        check_launch(bad, OmegaConf.merge(bad.hydra, {"mode": "RunMode.MULTIRUN"}))


def test_submitit_local_launcher_runs_a_sweep_job(data_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the extra mrrl[slurm]")
    result = mrrl(
        "-m",
        "stage=check_data",
        "data=brats2019",
        f"data.root={data_root}",
        f"paths.run_root={tmp_path}",
        *TINY_DATA,
        "hydra/launcher=slurm_local",
        "hydra.launcher.timeout_min=5",
        "seed=0,1",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    manifests = sorted(tmp_path.glob("default/check_data/multirun_*/job*/manifest.json"))
    assert len(manifests) == 2


# ---------------------------------------------------------------------------------------------- DDP


def test_ddp_spawn_in_process_trains_on_both_ranks(data_root: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(
        tiny_args(
            data_root,
            None,
            "trainer=ddp_cpu",
            "trainer.strategy=ddp_spawn",
            "experiment_name=spawn",
            "stage.trainer.max_epochs=1",
            "stage.latents.export=false",
        ),
        tmp_path,
    )
    run_dir = stage_dir(cfg)
    outputs = vqgan_stage.run(cfg, run_dir)
    assert outputs is not None
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["trainer"]["strategy"] == "ddp_spawn"
    # 4 training volumes, batch 2: one step per epoch on each of the 2 ranks (one process would take 2).
    assert steps_per_epoch(manifest, world_size=2) == 1 < steps_per_epoch(manifest, world_size=1)
    assert ckpt_state(run_dir / "checkpoints" / "last.ckpt") == {"global_step": 1, "generator_steps": 1}
    val = manifest["outputs"]["val"]
    assert 0 < val["val/codebook_usage"] <= 1 and val["val/perplexity"] >= 1


def test_plain_ddp_through_the_cli_vqgan_then_diffusion(data_root: Path, tmp_path: Path) -> None:
    args = tiny_args(
        data_root, tmp_path, "trainer=ddp_cpu", "experiment_name=ddp", "stage.trainer.max_epochs=2"
    )
    result = mrrl(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "ddp" / "vqgan"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["trainer"]["strategy"] == "ddp"
    # Rank 1 was started by Lightning re-executing the command (Hydra job "train_ddp_process_1", same run dir).
    rank1_log = (run_dir / "train_ddp_process_1.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in rank1_log
    # Only rank 0 validated the best checkpoint, encoded latents and wrote the manifest: once.
    assert result.stdout.count("vqgan: val L1") == 1
    assert len(list(tmp_path.rglob("manifest.json"))) == 1 and len(list(tmp_path.rglob("latents.pt"))) == 1
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["splits-brats2019.json", "vqgan"]
    assert ckpt_state(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2 * steps_per_epoch(
        manifest, 2
    )

    # The diffusion stage of the same experiment reads that manifest and trains under plain ddp too: its
    # latent sampler shards the 4 training latents over the 2 ranks (1 step per rank per epoch).
    result = mrrl(
        "stage=diffusion",
        *[a for a in args if not a.startswith(("stage=", "stage.", "+stage."))],
        *TINY_DIFFUSION,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    diff_dir = tmp_path / "ddp" / "diffusion"
    diffusion = json.loads((diff_dir / "manifest.json").read_text())
    assert diffusion["outputs"]["vqgan_ckpt"] == manifest["outputs"]["best_ckpt"]
    assert diffusion["outputs"]["global_step"] == 1 and result.stdout.count("diffusion: 1 steps") == 1
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (diff_dir / "train_ddp_process_1.log").read_text()


# ---------------------------------------------------------------------------------------------- sweeps + W&B


def test_sweep_2x2_distinct_job_dirs_with_offline_wandb_runs(data_root: Path, tmp_path: Path) -> None:
    wandb_home = tmp_path / "wandb_home"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb_home),
        "WANDB_CACHE_DIR": str(wandb_home / "cache"),
        "WANDB_CONFIG_DIR": str(wandb_home / "config"),
        "WANDB_DATA_DIR": str(wandb_home / "data"),
        "WANDB_SILENT": "true",
    }
    result = mrrl(
        "-m",
        *tiny_args(
            data_root,
            tmp_path / "runs",
            "experiment_name=sweep",
            "logger=wandb",
            "seed=0,1",
            "stage.net.codebook_size=16,32",
            "stage.trainer.max_epochs=1",
            "stage.latents.export=false",
        ),
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweeps = list((tmp_path / "runs" / "sweep" / "vqgan").glob("multirun_*"))
    assert len(sweeps) == 1
    jobs = sorted(sweeps[0].glob("job*"))
    assert [j.name for j in jobs] == ["job0", "job1", "job2", "job3"]
    combos, run_ids = set(), set()
    for job in jobs:
        manifest = json.loads((job / "manifest.json").read_text())
        assert manifest["run_dir"] == str(job.resolve())
        combos.add((manifest["config"]["seed"], manifest["outputs"]["codebook_size"]))
        assert "train/l1" in (job / "logs" / "metrics.csv").read_text().splitlines()[0]  # CSV beside W&B
        offline = list((job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, f"{job.name}: {offline}"  # one W&B run per job, in the job's folder
        run_ids.add(offline[0].name.rsplit("-", 1)[-1])
        records = wandb_records(next(offline[0].glob("run-*.wandb")))
        assert records["run"] == 1 and records["exit"] == 1  # the run was finished (job 3: at exit)
        assert {"train/l1", "val/l1", "val/psnr", "trainer/global_step"} <= records["history_keys"]
    assert combos == {(0, 16), (0, 32), (1, 16), (1, 32)} and len(run_ids) == 4
    assert not list(wandb_home.glob("**/offline-run-*"))  # runs live in the job folders, not in WANDB_DIR


# ---------------------------------------------------------------------------------------------- fault tolerance


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mrrl", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for_new_checkpoint(proc: subprocess.Popen, path: Path, after_ns: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.stat().st_mtime_ns > after_ns:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before writing a new {path.name}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no new {path} within {timeout} s")


def test_killed_then_terminated_run_resumes_to_the_same_step_count(data_root: Path, tmp_path: Path) -> None:
    epochs = 4
    args = tiny_args(
        data_root,
        tmp_path,
        "experiment_name=ft",
        f"stage.trainer.max_epochs={epochs}",
        "stage.latents.export=false",
    )
    run_dir = tmp_path / "ft" / "vqgan"
    last = run_dir / "checkpoints" / "last.ckpt"

    # 1. SIGKILL as soon as the first last.ckpt exists (AtomicCheckpointIO renames it into place: never
    #    half-written).
    proc = _start(args, tmp_path / "run1.log")
    _wait_for_new_checkpoint(proc, last, after_ns=0)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (run_dir / "manifest.json").exists()
    killed_at = ckpt_state(last)

    # 2. The same command resumes; SIGTERM once it has saved a newer checkpoint: Lightning stops after the
    #    current step, GracefulStop saves last.ckpt there, and mrrl exits with 143 (not 0) and says how to resume.
    stamp = last.stat().st_mtime_ns
    proc = _start(args, tmp_path / "run2.log")
    _wait_for_new_checkpoint(proc, last, after_ns=stamp)
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=60)
    log2 = (tmp_path / "run2.log").read_text()
    assert f"resuming from {last}" in log2
    assert status == 143, log2[-3000:]
    assert "stopped by SIGTERM" in log2 and not (run_dir / "manifest.json").exists()
    assert "before stopping" in log2 and "requeue" not in log2  # saved; not on SLURM, so nothing requeued
    terminated_at = ckpt_state(last)
    assert killed_at["global_step"] < terminated_at["global_step"]

    # 3. Once more: it resumes and finishes with the step count of an uninterrupted run.
    result = mrrl(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from" in result.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    expected = epochs * steps_per_epoch(manifest, world_size=1)
    assert terminated_at["global_step"] <= expected
    assert ckpt_state(last) == {"global_step": expected, "generator_steps": expected}


def test_sigterm_under_ddp_saves_last_ckpt_and_requeues_the_slurm_job(
    data_root: Path, tmp_path: Path
) -> None:
    """Plain ddp (2 gloo ranks) with no periodic checkpoint before the end: SIGTERM to the launching process
    must leave a last.ckpt from which the same command finishes with the step count of an uninterrupted run;
    with SLURM_JOB_ID set, rank 0 (only) calls `scontrol requeue <job>`."""
    epochs = 24  # 1 step per epoch and rank (4 training volumes, batch 2, 2 ranks)
    args = tiny_args(
        data_root,
        tmp_path,
        "trainer=ddp_cpu",
        "experiment_name=ftddp",
        f"stage.trainer.max_epochs={epochs}",
        "stage.trainer.check_val_every_n_epoch=12",
        f"stage.checkpoint_every_n_steps={epochs}",  # the only periodic last.ckpt comes at the very end
        "stage.latents.export=false",
        "trainer.log_every_n_steps=1",
    )
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    slurm_env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_RESTART_COUNT": "0",
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
    }
    run_dir = tmp_path / "ftddp" / "vqgan"
    last, metrics = run_dir / "checkpoints" / "last.ckpt", run_dir / "logs" / "metrics.csv"

    proc = _start(args, tmp_path / "ddp.log", env=slurm_env)
    deadline = time.monotonic() + 180
    while not metrics.is_file():  # the CSV logger's first flush: training is under way on both ranks
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(
                f"no training progress (status {proc.poll()}): {(tmp_path / 'ddp.log').read_text()[-3000:]}"
            )
        time.sleep(0.05)
    assert not last.exists()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=120)
    log = (tmp_path / "ddp.log").read_text()
    assert status == 143, log[-3000:]
    stopped_at = ckpt_state(last)
    assert 0 < stopped_at["global_step"] < epochs, stopped_at
    assert stopped_at["generator_steps"] == stopped_at["global_step"]
    assert calls.read_text().splitlines() == ["requeue 4242"]  # once: rank 0 only
    assert "requeued SLURM job 4242" in log and not (run_dir / "manifest.json").exists()

    # The requeued job: the same command (one restart so far) resumes and finishes; no requeue on success.
    result = mrrl(*args, env={**slurm_env, "SLURM_RESTART_COUNT": "1"}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from {last}" in result.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    expected = epochs * steps_per_epoch(manifest, world_size=2)
    assert ckpt_state(last) == {"global_step": expected, "generator_steps": expected}
    assert calls.read_text().splitlines() == ["requeue 4242"]
    assert not list(run_dir.rglob(".*.tmp-*"))  # no temporary checkpoint left behind

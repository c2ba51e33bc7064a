"""The real console scripts in subprocesses: exit codes, messages, run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, make_brats


def run_cli(*args: str, module: str = "mrrl", cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("BRATS2019_ROOT", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_check_data_prints_summary_and_writes_manifest(tmp_path: Path) -> None:
    root = make_brats(tmp_path / "brats", n_hgg=3, n_lgg=3, modalities=("flair",))
    result = run_cli(
        "stage=check_data",
        "data=brats2019",
        f"data.root={root}",
        "data.test_per_class=1",
        "data.image_size=16",
        f"paths.run_root={tmp_path / 'runs'}",
        "experiment_name=cli",
        "data.progress=false",
    )
    assert result.returncode == 0, result.stderr
    assert "HGG" in result.stdout and "preprocessed shape: 1 channel(s) × 16×16×16" in result.stdout
    manifest = json.loads((tmp_path / "runs" / "cli" / "check_data" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["outputs"]["counts"]["total"]["All"] == 6
    assert (tmp_path / "runs" / "cli" / "splits-brats2019.json").is_file()


def test_check_data_bad_input_exits_nonzero_with_named_files(tmp_path: Path) -> None:
    root = make_brats(tmp_path / "brats", n_hgg=2, n_lgg=2, modalities=("flair",))
    victim = root / "HGG" / "BraTS19_TEST_HGG_000" / "BraTS19_TEST_HGG_000_flair.nii.gz"
    victim.write_bytes(b"garbage")
    (root / "HGG" / "BraTS19_TEST_HGG_001" / "BraTS19_TEST_HGG_001_flair.nii.gz").unlink()
    result = run_cli(
        "stage=check_data",
        "data=brats2019",
        f"data.root={root}",
        "data.test_per_class=1",
        f"paths.run_root={tmp_path / 'runs'}",
        "data.progress=false",
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip().startswith("- ")]
    # One pass (issue 17): the missing modality does not hide the corrupt file; naming problems come first.
    assert len(lines) == 2 and "missing modality 'flair'" in lines[0]
    assert str(victim) in lines[1] and "unreadable, truncated or corrupt" in lines[1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "default" / "check_data" / "manifest.json").exists()


def test_missing_root_and_unknown_stage_messages(tmp_path: Path) -> None:
    result = run_cli("stage=check_data", "data=brats2019", f"paths.run_root={tmp_path}")
    assert result.returncode == 1 and "data.root=<dir>" in result.stderr
    result = run_cli("stage=nope", f"paths.run_root={tmp_path}")
    assert result.returncode != 0 and "nope" in result.stderr


def run_pipeline_in_process(capfd, *args: str) -> tuple[int, str]:
    """``mrrl-pipeline <args>`` in this process (the stages still run as their own processes): exit status and
    everything printed, the stages' output included."""
    from mrrl import pipeline

    with pytest.raises(SystemExit) as info:
        pipeline.main(list(args))
    captured = capfd.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def test_pipeline_runs_and_skips_finished_stages(tmp_path: Path, capfd) -> None:
    root = make_brats(tmp_path / "brats", n_hgg=3, n_lgg=3, modalities=("flair",))
    args = [
        "data=brats2019",
        f"data.root={root}",
        "data.test_per_class=1",
        "data.image_size=16",
        f"paths.run_root={tmp_path / 'runs'}",
        "experiment_name=pipe",
        "data.progress=false",
    ]
    status, out = run_pipeline_in_process(capfd, *args)
    assert status == 0, out
    assert "[1/1] check_data   done in" in out
    status, out = run_pipeline_in_process(capfd, *args)
    assert status == 0 and "skipped" in out
    status, out = run_pipeline_in_process(capfd, *args, "pipeline.force=true")
    assert status == 0 and "done in" in out


# ------------------------------------------------------------------------------------- per-stage overrides


def test_no_stage_is_named_like_a_top_level_config_key(tmp_path: Path) -> None:
    """``<stage>.<key>=`` on the pipeline's command line is a stage's setting only because no top-level key
    shares a stage's name."""
    from mrrl.pipeline import compose_config
    from mrrl.stages import STAGES

    for experiment in ("demo", "brats2019"):
        cfg = compose_config([f"experiment={experiment}", f"paths.run_root={tmp_path}"])
        assert not set(STAGES) & set(cfg.keys())


def test_split_overrides_routes_each_kind() -> None:
    from mrrl.pipeline import split_overrides

    shared, per_stage, every = split_overrides(
        [
            "experiment=demo",
            "data.image_size=16",
            "stage=vqgan",  # the pipeline's, dropped
            "pipeline.force=true",  # the pipeline's, dropped
            "ppo.train.lr=1e-5",
            "+classify.extra_generators.mine=/x",
            "~vqgan.speed",
            "stage.trainer.max_epochs=1",
        ],
        ["vqgan", "ppo", "classify"],
    )
    assert shared == ["experiment=demo", "data.image_size=16"]
    assert per_stage == {
        "vqgan": ["~stage.speed"],
        "ppo": ["stage.train.lr=1e-5"],
        "classify": ["+stage.extra_generators.mine=/x"],
    }
    assert every == ["stage.trainer.max_epochs=1"]


def test_pipeline_gives_each_stage_its_own_overrides(tmp_path: Path, monkeypatch, capsys) -> None:
    """What each stage process is started with (stages replaced by a recorder; nothing trains)."""
    from mrrl import pipeline
    from mrrl.report import build

    commands: dict[str, list[str]] = {}

    def record(command):
        stage = next(a.split("=", 1)[1] for a in command if a.startswith("stage="))
        commands[stage] = list(command[3:])
        return 0

    monkeypatch.setattr(pipeline, "run_child", record)
    monkeypatch.setattr(build, "write_report", lambda experiment_dir: experiment_dir / "report.md")
    status = pipeline.run_pipeline(
        [
            "experiment=demo",
            f"paths.run_root={tmp_path}",
            "stage.trainer.max_epochs=1",  # every stage that has the key
            "vqgan.trainer.max_epochs=2",  # the VQGAN's own: comes after the shared one, so it wins
            "ppo.train.lr=1e-5",
            "+classify.extra_generators.mine=/x",
        ]
    )
    assert status == 0 and list(commands) == ["check_data", "vqgan", "diffusion", "reward_data", "reward",
                                               "ppo", "evaluate", "classify"]  # fmt: skip
    shared = ["experiment=demo", f"paths.run_root={tmp_path}"]
    assert commands["check_data"] == ["stage=check_data", *shared]
    assert commands["vqgan"] == [
        "stage=vqgan",
        *shared,
        "stage.trainer.max_epochs=1",
        "stage.trainer.max_epochs=2",
    ]
    assert commands["ppo"] == ["stage=ppo", *shared, "stage.trainer.max_epochs=1", "stage.train.lr=1e-5"]
    assert commands["classify"] == ["stage=classify", *shared, "+stage.extra_generators.mine=/x"]
    assert all("stage.train.lr=1e-5" not in c for name, c in commands.items() if name != "ppo")
    with_epochs = {name for name, c in commands.items() if "stage.trainer.max_epochs=1" in c}
    assert with_epochs == {"vqgan", "diffusion", "reward", "ppo"}


def test_pipeline_override_of_a_key_no_stage_has_is_one_clear_line(tmp_path: Path, capsys) -> None:
    from mrrl import pipeline

    base = ["experiment=demo", f"paths.run_root={tmp_path}"]
    for args, expected in (
        (["ppo.train.lrr=1e-5"], "ppo.train.lrr: stage ppo has no key stage.train.lrr"),
        (["stage.trainer.max_epochss=1"], "no stage of this pipeline (check_data, vqgan,"),
        (["export.format=nifti"], "'export' is not a stage of this pipeline"),
        (["vqgan.trainer.max_epochs=many"], "max_epochs"),
        (["+stage.new_key=1"], "adding a key to every stage is ambiguous"),
    ):
        with pytest.raises(SystemExit) as info:
            pipeline.main([*base, *args])
        err = capsys.readouterr().err
        assert info.value.code == 1 and err.startswith("mrrl-pipeline: error: ") and expected in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "demo").exists()  # refused before any stage ran

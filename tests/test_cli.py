"""The real console scripts in subprocesses: exit codes, messages, run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_pipeline_runs_and_skips_finished_stages(tmp_path: Path) -> None:
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
    first = run_cli(*args, module="mrrl.pipeline")
    assert first.returncode == 0, first.stderr
    assert "[1/1] check_data   done in" in first.stdout
    second = run_cli(*args, module="mrrl.pipeline")
    assert "skipped" in second.stdout
    forced = run_cli(*args, "pipeline.force=true", module="mrrl.pipeline")
    assert "done in" in forced.stdout

"""Checkpoints from elsewhere never run code; damaged resume points are set aside; no best checkpoint yet is fine.

- A crafted pickle (unpickling it would ``touch`` a marker file) is refused by every loader mrrl has, by a
  resumed fit and by the CLI, with one line naming the file; the marker is never created.
- A truncated ``last.ckpt`` is renamed ``last.ckpt.corrupt-<time>`` and the run resumes from ``best.ckpt``,
  or starts over and says so.
- A run that stops before its first validation uses ``last.ckpt`` as its best checkpoint, and says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_brats
from helpers import TINY_DATA, TINY_VQGAN, compose_cfg, run_mrrl, stage_dir, tiny_checkpoints

from mrrl.utils.checkpoints import DamagedCheckpointError, UnsafeCheckpointError, safe_load


class _RunsShell:
    """Unpickling this calls ``os.system`` (what a malicious checkpoint would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint shaped like mrrl's (state_dict + hyper_parameters) whose loading would run a command."""
    torch.save(
        {"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"net": _RunsShell(f"touch {marker}")}},
        path,
    )
    return path


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    return crafted_checkpoint(tmp_path / "evil.ckpt", marker), marker


def _loaders():
    from mrrl.classify.model import load_weights
    from mrrl.diffusion.generate import export_ema, load_diffusion
    from mrrl.reward.models import load_reward_model
    from mrrl.vqgan.loading import load_latents, load_vqgan

    return {
        "safe_load": safe_load,
        "load_vqgan": load_vqgan,
        "load_diffusion": load_diffusion,
        "export_ema": lambda p: export_ema(p, p.with_name("ema.pt")),
        "load_reward_model": load_reward_model,
        "load_latents": load_latents,
        "classify.load_weights": lambda p: load_weights(None, p),
    }


@pytest.mark.parametrize("loader", list(_loaders()))
def test_crafted_pickle_is_refused_by_every_loader_without_running(loader: str, evil) -> None:
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError) as info:
        _loaders()[loader](path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "posix.system" in message
    assert not marker.exists()


def test_damaged_files_get_one_line_naming_them(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, good)
    for name, data in {
        "truncated.ckpt": good.read_bytes()[:3000],
        "empty.ckpt": b"",
        "junk.ckpt": b"not a checkpoint" * 20,
    }.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DamagedCheckpointError, match="damaged") as info:
            safe_load(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)
    assert torch.equal(
        safe_load(good)["state_dict"]["w"], torch.load(good, weights_only=True)["state_dict"]["w"]
    )


# ---------------------------------------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_brats(tmp_path_factory.mktemp("safe") / "brats", n_hgg=5, n_lgg=5, modalities=("flair",))


def vqgan_cfg(data_root: Path, run_root: Path, *extra: str):
    return compose_cfg(
        [
            "stage=vqgan",
            "data=brats2019",
            f"data.root={data_root}",
            *TINY_DATA,
            *TINY_VQGAN,
            "logger=none",
            "stage.latents.export=false",
            *extra,
        ],
        run_root,
    )


def test_resume_from_a_crafted_last_checkpoint_is_refused(data_root: Path, tmp_path: Path, evil) -> None:
    from mrrl.stages import vqgan as vqgan_stage

    path, marker = evil
    cfg = vqgan_cfg(data_root, tmp_path, "stage.trainer.max_epochs=1")
    last = stage_dir(cfg) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    path.rename(last)
    with pytest.raises(UnsafeCheckpointError, match="last.ckpt"):
        vqgan_stage.run(cfg, stage_dir(cfg))
    assert not marker.exists() and last.is_file()  # refused, not silently set aside


def test_cli_refuses_a_crafted_vqgan_checkpoint(data_root: Path, tmp_path: Path, evil) -> None:
    path, marker = evil
    result = run_mrrl(
        "stage=diffusion",
        "data=brats2019",
        f"data.root={data_root}",
        *TINY_DATA,
        f"stage.vqgan_ckpt={path}",
        f"paths.run_root={tmp_path}",
        "logger=none",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("mrrl: error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "Traceback" not in result.stderr
    assert not marker.exists()


def test_truncated_last_checkpoint_is_set_aside_and_best_resumes(
    data_root: Path, tmp_path: Path, capsys
) -> None:
    from mrrl.stages import vqgan as vqgan_stage

    cfg = vqgan_cfg(data_root, tmp_path, "stage.trainer.max_epochs=1")
    run_dir = stage_dir(cfg)
    vqgan_stage.run(cfg, run_dir)
    ckpts = run_dir / "checkpoints"
    assert safe_load(ckpts / "best.ckpt")["global_step"] == 3
    (run_dir / "manifest.json").unlink()  # interrupted while last.ckpt was being copied, say
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:4096])
    capsys.readouterr()
    outputs = vqgan_stage.run(vqgan_cfg(data_root, tmp_path, "stage.trainer.max_epochs=2"), run_dir)
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "damaged" in out and f"resuming from {ckpts / 'best.ckpt'}" in out
    assert len(list(ckpts.glob("last.ckpt.corrupt-*"))) == 1
    assert safe_load(outputs["last_ckpt"])["global_step"] == 6  # continued from best's step 3


def test_truncated_only_checkpoint_starts_over_and_says_so(data_root: Path, tmp_path: Path, capsys) -> None:
    from mrrl.stages import vqgan as vqgan_stage

    cfg = vqgan_cfg(data_root, tmp_path, "stage.trainer.max_epochs=1")
    run_dir = stage_dir(cfg)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    outputs = vqgan_stage.run(cfg, run_dir)
    captured = capsys.readouterr()
    assert "training starts from scratch" in captured.out + captured.err
    assert "stage.force=true" in captured.out + captured.err
    assert safe_load(outputs["last_ckpt"])["global_step"] == 3


def test_run_ending_before_its_first_validation_uses_last_as_best(
    data_root: Path, tmp_path: Path, capsys
) -> None:
    """``++trainer.max_steps=2`` with validation every 5 epochs: no best.ckpt and no val score yet."""
    from mrrl.stages import vqgan as vqgan_stage

    cfg = vqgan_cfg(data_root, tmp_path, "stage.trainer.check_val_every_n_epoch=5", "++trainer.max_steps=2")
    outputs = vqgan_stage.run(cfg, stage_dir(cfg))
    assert "last.ckpt as the best checkpoint" in capsys.readouterr().out
    assert Path(outputs["best_ckpt"]).name == "last.ckpt" and outputs["best_score"] is None
    assert safe_load(outputs["best_ckpt"])["global_step"] == 2


def test_run_ending_before_its_first_validation_under_ddp(data_root: Path, tmp_path: Path, capfd) -> None:
    """The same run with 2 DDP ranks (gloo, forked in-process: the plain-ddp CLI launch of this stage is
    tests/test_scaleout.py's): rank 0 falls back to last.ckpt and writes the manifest."""
    from mrrl.stages import vqgan as vqgan_stage

    cfg = vqgan_cfg(
        data_root,
        tmp_path,
        "stage.trainer.check_val_every_n_epoch=5",
        "++trainer.max_steps=2",
        "trainer=ddp_cpu",
        "trainer.strategy=ddp_fork",
        "logger=none",
    )
    run_dir = stage_dir(cfg)
    outputs = vqgan_stage.run(cfg, run_dir)
    assert "last.ckpt as the best checkpoint" in capfd.readouterr().out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert Path(manifest["outputs"]["best_ckpt"]).name == "last.ckpt" == Path(outputs["best_ckpt"]).name
    assert safe_load(outputs["best_ckpt"])["global_step"] == 2


def test_diffusion_and_reward_runs_ending_before_validation_use_last(data_root: Path, tmp_path: Path, capsys):
    from test_diffusion_stage import TINY_DIFFUSION
    from test_reward_stage import TINY_REWARD, make_dataset

    from mrrl.stages import diffusion as diffusion_stage
    from mrrl.stages import reward as reward_stage

    vqgan = tiny_checkpoints(tmp_path / "ckpts", ["HGG", "LGG"])["vqgan"]
    cfg = compose_cfg(
        [
            "stage=diffusion",
            "data=brats2019",
            f"data.root={data_root}",
            *TINY_DATA,
            *TINY_DIFFUSION,
            "logger=none",
            f"stage.vqgan_ckpt={vqgan}",
            "stage.trainer.check_val_every_n_epoch=10",
            "stage.trainer.max_steps=2",
        ],
        tmp_path,
    )
    outputs = diffusion_stage.run(cfg, tmp_path / "diffusion")
    assert Path(outputs["best_ckpt"]).name == "last.ckpt" and Path(outputs["ema_ckpt"]).is_file()
    dataset = make_dataset(tmp_path / "reward_dataset")
    cfg = compose_cfg(
        [*TINY_REWARD, f"stage.dataset_dir={dataset}", "logger=none", "++trainer.max_steps=2"], tmp_path
    )
    outputs = reward_stage.run(cfg, tmp_path / "reward")
    assert all(Path(outputs[f"{kind}_ckpt"]).name == "last.ckpt" for kind in ("r3d", "r2d"))
    assert capsys.readouterr().out.count("as the best checkpoint") == 3

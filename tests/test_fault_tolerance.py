"""Atomic checkpoint files, the checkpoint saved on SIGTERM / Ctrl+C, resume-point choice, SLURM requeueing.

The end-to-end runs (SIGKILL and SIGTERM through the CLI, one process and 2-rank DDP with a fake
``scontrol``) are in ``test_scaleout.py``.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from mrrl.errors import ConfigError
from mrrl.training.fault_tolerance import (
    AtomicCheckpointIO,
    GracefulStop,
    requeue_slurm_job,
    resume_checkpoint,
    slurm_job_id,
)

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def fake_scontrol(tmp_path: Path, monkeypatch) -> Path:
    """A ``scontrol`` on PATH that records its arguments."""
    calls = tmp_path / "scontrol.calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


# ---------------------------------------------------------------------------------------------- atomic files


def test_atomic_checkpoint_io_replaces_whole_files_and_keeps_the_old_one_on_failure(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    assert torch.load(target, weights_only=False)["global_step"] == 1

    # A failing write (an object torch.save cannot pickle) leaves the previous checkpoint untouched.
    with pytest.raises((pickle.PicklingError, AttributeError)):
        io.save_checkpoint({"global_step": 2, "bad": lambda: None}, target)
    assert torch.load(target, weights_only=False)["global_step"] == 1
    io.save_checkpoint({"global_step": 3}, target)
    assert torch.load(target, weights_only=False)["global_step"] == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_resume_point_is_the_newest_of_last_and_lightning_hpc_checkpoints(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert resume_checkpoint(tmp_path, None) is None
    last.parent.mkdir()
    last.write_bytes(b"x")
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    os.utime(last, ns=(time.time_ns(), time.time_ns() - 10**9))
    assert resume_checkpoint(tmp_path, last) == hpc
    os.utime(hpc, ns=(time.time_ns(), time.time_ns() - 2 * 10**9))
    assert resume_checkpoint(tmp_path, last) == last


# ---------------------------------------------------------------------------------------------- SLURM


def test_requeue_calls_scontrol_once_per_stop_and_respects_max_requeues(
    fake_scontrol: Path, monkeypatch, capsys
) -> None:
    assert slurm_job_id() is None and requeue_slurm_job(5) is False  # not on SLURM: nothing to requeue
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    assert requeue_slurm_job(5) is True
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "700")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job(5) is True
    assert fake_scontrol.read_text().splitlines() == ["requeue 777", "requeue 700_3"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "5")
    assert requeue_slurm_job(5) is False
    assert "restarted 5 times" in capsys.readouterr().err
    assert len(fake_scontrol.read_text().splitlines()) == 2


def test_requeue_without_scontrol_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert requeue_slurm_job(3) is False
    assert "scontrol is not on PATH" in capsys.readouterr().err


def test_requeue_setting_auto_defers_to_submitit(monkeypatch, tmp_path: Path) -> None:
    import mrrl.training.fault_tolerance as ft

    with pytest.raises(ConfigError, match="fault_tolerance.requeue"):
        GracefulStop(tmp_path / "last.ckpt", requeue="sometimes")
    auto, always, never = (GracefulStop(tmp_path / "last.ckpt", requeue=r) for r in ("auto", True, False))
    assert not auto.requeue_enabled()  # not on SLURM
    assert auto.stop_signals() == [signal.SIGTERM]
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    assert auto.requeue_enabled() and always.requeue_enabled() and not never.requeue_enabled()
    assert auto.stop_signals() == [signal.SIGTERM, signal.SIGUSR1]
    monkeypatch.setattr(ft, "under_submitit", lambda: True)
    assert not auto.requeue_enabled() and always.requeue_enabled()


# ---------------------------------------------------------------------------------------------- the callback


class Regression(L.LightningModule):
    """Six steps of a linear fit; ``interrupt`` (a callable) runs at one training step."""

    def __init__(self, interrupt_at: int, interrupt) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.interrupt_at, self.interrupt = interrupt_at, interrupt

    def training_step(self, batch, batch_idx):
        if self.global_step == self.interrupt_at:
            self.interrupt()
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(12, 4, generator=g)
        return torch.utils.data.DataLoader(list(zip(x, x.sum(1, keepdim=True))), batch_size=2)


def fit_until_interrupted(tmp_path: Path, interrupt, at: int = 2):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        callbacks=[GracefulStop(ckpt)],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module = Regression(at, interrupt)
    return trainer, module, ckpt


def test_sigterm_stops_after_the_current_step_and_saves_the_resume_point(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    trainer, module, ckpt = fit_until_interrupted(tmp_path, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SIGTERMException):
        trainer.fit(module)
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 3  # the step that was running finished, then the stop
    assert torch.equal(saved["state_dict"]["net.weight"], module.net.weight.detach())

    # The same fit resumed from it continues at step 3 and stops at max_steps.
    resumed = Regression(-1, None)
    seen = []
    resumed.on_train_batch_start = lambda batch, batch_idx: seen.append(resumed.global_step)
    L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(resumed, ckpt_path=str(ckpt))
    assert seen == [3, 4, 5] and resumed.global_step == 6


def test_ctrl_c_in_one_process_saves_too(tmp_path: Path) -> None:
    def ctrl_c() -> None:
        raise KeyboardInterrupt

    trainer, module, ckpt = fit_until_interrupted(tmp_path, ctrl_c, at=4)
    with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into exit status 1
        trainer.fit(module)
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4  # before the interrupted step


def test_other_errors_do_not_overwrite_the_resume_point(tmp_path: Path) -> None:
    def crash() -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    trainer, module, ckpt = fit_until_interrupted(tmp_path, crash)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.fit(module)
    assert not ckpt.exists()


# ---------------------------------------------------------------------------------------------- the pipeline


CHILD = """
import signal, sys, time
from pathlib import Path
log = Path(sys.argv[1])
def note(signum, frame):
    with log.open("a") as f:
        f.write(f"{signum}\\n")
    if signum == signal.SIGTERM:
        sys.exit(143)
signal.signal(signal.SIGTERM, note)
signal.signal(signal.SIGUSR1, note)
log.write_text("ready\\n")
while True:
    time.sleep(0.05)
"""


def test_pipeline_passes_stop_signals_on_to_the_running_stage(tmp_path: Path) -> None:
    """SIGUSR1 (SLURM's warning) and SIGTERM sent to ``mrrl-pipeline`` reach the stage process; the
    pipeline survives SIGUSR1 (whose default action would end it) and exits with the stage's status."""
    import subprocess
    import sys

    log = tmp_path / "child.log"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from mrrl.pipeline import run_child; "
            f"sys.exit(run_child([sys.executable, '-c', {CHILD!r}, {str(log)!r}]))",
        ]
    )
    deadline = time.monotonic() + 60
    while not (log.is_file() and log.read_text().startswith("ready")):
        assert time.monotonic() < deadline and parent.poll() is None, "the stage process did not start"
        time.sleep(0.05)
    parent.send_signal(signal.SIGUSR1)
    while str(int(signal.SIGUSR1)) not in log.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "SIGUSR1 was not passed on"
        time.sleep(0.05)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 143
    assert log.read_text().split() == ["ready", str(int(signal.SIGUSR1)), str(int(signal.SIGTERM))]

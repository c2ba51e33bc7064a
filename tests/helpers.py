"""Helpers for stage tests: compose the real Hydra config in-process with tiny overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mrrl.cli import CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent

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

TINY_UNET = [  # the smallest diffusion UNet: 2 levels of 8 channels, no attention
    "stage.unet.channels=[8,8]",
    "stage.unet.attention_levels=[false,false]",
    "stage.unet.num_res_blocks=1",
    "stage.unet.num_head_channels=8",
    "stage.unet.norm_num_groups=8",
]


def compose_cfg(overrides: Sequence[str], run_root: Path) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"paths.run_root={run_root}"])


def stage_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.run_root) / cfg.experiment_name / cfg.stage.name


def _randomise_zero_params(module, seed: int = 0) -> None:
    """MONAI zero-initialises the UNet's output convs: an untrained model would ignore its inputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.abs().sum() == 0:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def tiny_checkpoints(root: Path, class_names: Sequence[str], image_size: int = 16) -> dict[str, str]:
    """A tiny VQGAN and a tiny diffusion checkpoint in the stages' formats (random weights, no training)."""
    import torch

    from mrrl.diffusion.module import DiffusionModule
    from mrrl.settings import from_config
    from mrrl.stages import diffusion as diffusion_stage
    from mrrl.vqgan.module import VQGANModule, VQGANSettings

    vq_cfg = compose_cfg(
        [
            "stage=vqgan",
            "stage.net.channels=[8,16]",
            "stage.net.num_res_blocks=1",
            "stage.net.codebook_size=16",
            "stage.net.codebook_dim=2",
            "stage.discriminator.channels=8",
            "stage.discriminator.num_layers=2",
            "stage.discriminator.norm=BATCH",  # the discriminator these checkpoints always had
            "stage.loss.adv_start_step=0",
            "stage.optim.lr_g=1e-3",
            "stage.optim.lr_d=1e-3",
        ],
        root,
    )
    diff_cfg = compose_cfg(
        [
            "stage=diffusion",
            *TINY_UNET,
            "stage.ema.decay=0.999",
            "stage.optim.lr=1e-3",
        ],
        root,
    )
    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    vq = VQGANModule(
        (1, image_size, image_size, image_size), from_config(VQGANSettings, vq_cfg.stage, "stage")
    )
    vq_path = root / "vqgan.ckpt"
    torch.save({"hyper_parameters": dict(vq.hparams), "state_dict": vq.state_dict()}, vq_path)
    diff = DiffusionModule(
        (2, image_size // 4, image_size // 4, image_size // 4),
        list(class_names),
        diffusion_stage.settings(diff_cfg),
        vqgan_ckpt=str(vq_path),
        seed=0,
    )
    _randomise_zero_params(diff.denoiser.unet)
    diff.ema.unet.load_state_dict(diff.denoiser.unet.state_dict())
    diff.set_scale_factor(1.0)
    diff_path = root / "diffusion.ckpt"
    # No recorded sampler, as in checkpoints written before the stage recorded one (tests/test_ppo.py reads it).
    hparams = {**dict(diff.hparams), "sampling": None}
    torch.save({"hyper_parameters": hparams, "state_dict": diff.state_dict()}, diff_path)
    return {"vqgan": str(vq_path), "diffusion": str(diff_path)}


def zero_the_loss(module) -> None:
    """The mutation each case must catch: loss × 0 before the backward pass, optimiser steps still taken."""
    if module.automatic_optimization:
        step = module.training_step
        module.training_step = lambda *args, **kwargs: step(*args, **kwargs) * 0.0
    else:
        backward = module.manual_backward
        module.manual_backward = lambda loss, *args, **kwargs: backward(loss * 0.0, *args, **kwargs)


def bare_trainer(root: Path, **kwargs):
    """A CPU Trainer with nothing around the loop (no logger, checkpoints, progress bar or sanity check) unless
    ``kwargs`` say otherwise."""
    import lightning as L

    bare = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
    }
    return L.Trainer(**{**bare, **kwargs})


def run_mrrl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m mrrl <args>`` in a fresh process (the real CLI: Hydra, DDP re-execution), output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mrrl", *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------- W&B offline runs


def _wandb_protos(path: Path):
    """The protobuf ``Record``s of an offline run's ``run-<id>.wandb`` file, in order.

    The file is W&B's transaction log (what ``wandb sync`` uploads): a 7-byte header, then LevelDB-style
    32 KiB blocks of records (crc32, length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4), each a protobuf ``Record``.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_records(path: Path) -> dict:
    """Record counts and logged history keys of an offline run's ``run-<id>.wandb`` file."""
    counts: dict = {"history_keys": set()}
    for record in _wandb_protos(path):
        name = record.WhichOneof("record_type")
        counts[name] = counts.get(name, 0) + 1
        if name == "history":
            counts["history_keys"] |= {i.key or "/".join(i.nested_key) for i in record.history.item}
    return counts


class WandbRun:
    """What an offline W&B run recorded: its run record, history rows, summary, metric definitions."""

    def __init__(self, path: Path) -> None:
        import json

        self.path = path
        self.rows: list[dict] = []
        self.summary: dict = {}
        self.metrics: dict[str, str] = {}  # name or glob -> step metric
        self.counts: dict[str, int] = {}
        self.artifacts: list[tuple[str, str]] = []  # (type, name): checkpoints are "model"
        for record in _wandb_protos(path):
            kind = record.WhichOneof("record_type")
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if kind == "run":
                run = record.run
                self.name, self.group, self.job_type = run.display_name, run.run_group, run.job_type
                self.tags = list(run.tags)
                self.config = {
                    i.key: json.loads(i.value_json) for i in run.config.update if i.key != "_wandb"
                }
            elif kind == "history":
                self.rows.append(
                    {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                )
            elif kind == "summary":
                for i in record.summary.update:
                    self.summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
            elif kind == "artifact":
                self.artifacts.append((record.artifact.type, record.artifact.name))
            elif kind == "metric":
                metric = record.metric
                self.metrics[metric.name or metric.glob_name] = metric.step_metric

    @property
    def media(self) -> dict[str, str]:
        """Logged media and tables, key -> W&B type (``image-file``, ``table-file``)."""
        return {k[: -len("/_type")]: v for row in self.rows for k, v in row.items() if k.endswith("/_type")}

    @property
    def keys(self) -> set[str]:
        """Every logged key: scalars and media (a medium's own fields, ``<key>/path`` ..., folded into it)."""
        media = self.media
        scalars = {k for row in self.rows for k in row if not any(k.startswith(m + "/") for m in media)}
        return scalars | set(media)

    def table(self, key: str) -> dict:
        """The last logged ``wandb.Table`` under ``key``: ``{"columns": [...], "data": [[...], ...]}``."""
        import json

        (row,) = self.rows_with(key)[-1:]
        return json.loads((self.path.parent / "files" / row[f"{key}/path"]).read_text())

    def rows_with(self, key: str) -> list[dict]:
        return [row for row in self.rows if key in row or f"{key}/_type" in row]


def wandb_runs(folder: Path, wait_s: float = 20.0) -> list[WandbRun]:
    """Every offline W&B run under ``folder`` (``<run_dir>/wandb/offline-run-*/run-*.wandb``).

    W&B's service writes a finished run's last records (summary, exit) shortly after ``run.finish()``
    returns: a run without its exit record is read again, for up to ``wait_s`` seconds.
    """
    import time

    paths = sorted(Path(folder).rglob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + wait_s
    while True:
        runs = [WandbRun(p) for p in paths]
        if all(r.counts.get("exit") for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def check_wandb_run(folder: Path, stage: str, name: str, classes: Sequence[str], count: int = 1) -> WandbRun:
    """Assert what every stage's W&B run must hold; return the (last) run for stage-specific checks.

    ``count`` runs under ``folder``, named ``name`` (the last one), job type = stage, grouped and tagged by
    experiment and dataset; every key :mod:`mrrl.tracking.keys` declares for the stage is logged (a
    ``{cls}``-only template for every class), summary keys are in the summary, the stage's axis is the
    step metric of its globs, and every image shares its axis value with a row of scalars.
    """
    from mrrl.tracking.keys import STAGES, STEP, expand, matches

    runs = wandb_runs(folder)
    assert len(runs) == count, [r.path for r in runs]
    run = runs[-1]
    assert run.counts.get("exit") == 1, f"{run.path}: the run was not finished"
    assert run.name == name and run.job_type == stage, (run.name, run.job_type)
    experiment = name.split("/")[0]
    assert run.group == experiment and f"experiment:{experiment}" in run.tags, (run.group, run.tags)
    assert any(t.startswith("dataset:") for t in run.tags), run.tags
    spec = STAGES[stage]
    logged, summary = run.keys, set(run.summary)
    for templates, have in ((spec.curves + spec.images + spec.tables, logged), (spec.summary, summary)):
        for template in (t for t in templates if t not in spec.optional):
            assert matches(template, have), f"{stage}: nothing logged for {template}; have {sorted(have)}"
            if "{cls}" in template and template.count("{") == 1:
                assert set(expand(template, cls=classes)) <= have, (template, sorted(have))
    for glob in spec.axis_globs:
        assert run.metrics.get(glob) == spec.axis, (glob, run.metrics)
    import fnmatch

    for key in logged - set(run.media):  # every curve on the axis is defined by name (beats Lightning's `*`)
        if key != spec.axis and any(fnmatch.fnmatchcase(key, g) for g in spec.axis_globs):
            assert run.metrics.get(key) == spec.axis, (key, run.metrics.get(key))
    from mrrl.dashboard.spec import PANELS

    for panel in (p for p in PANELS if p.stage == stage):  # the dashboard plots what the stage logged
        for template in (k for k in panel.keys if not any(k == t or matches(t, [k]) for t in spec.optional)):
            assert matches(template, logged | summary), f"panel {panel.title!r}: {template} never logged"
    for image in spec.images if spec.images_on_axis else ():
        for template_key in matches(image, run.media):
            for row in run.rows_with(template_key):
                same = [
                    r
                    for r in run.rows
                    if r.get(spec.axis) == row[spec.axis]
                    and r.get(STEP) == row.get(STEP)
                    and any(k in r for k in spec.curves)
                ]
                assert same, f"{template_key} at {spec.axis}={row[spec.axis]}: no scalars there"
    return run

"""One (protocol, seed) run: optional pre-training on synthetic volumes, fine-tuning on the real training
split, test-set predictions of the selected checkpoint.

Layout of ``<run_dir>/runs/<protocol>/seed<k>/``:

- ``run.json``: the run's key (everything its result depends on). A run whose key no longer matches
  (another checkpoint, other settings) is stale: its folder is cleared and it trains again;
- ``pretrain/`` (synthetic protocols): ``checkpoints/last.ckpt``, CSV logs, ``done.json`` once finished;
- ``finetune/``: ``checkpoints/{last,best}.ckpt`` and CSV logs;
- ``predictions.csv`` and ``result.json`` (test probabilities and metrics), written last: a run with a
  ``result.json`` under the current key is finished and skipped.

An interrupted phase resumes from its ``last.ckpt``; a finished pre-training is not repeated.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import Dataset

from mrrl.classify.data import ClassifyDataModule, SyntheticDataset, balanced_class_weights
from mrrl.classify.metrics import binary_metrics
from mrrl.classify.model import MONITORS, ClassifierModule, PhaseOptimSettings, load_weights, predict
from mrrl.classify.protocols import Protocol
from mrrl.errors import ConfigError
from mrrl.settings import from_config
from mrrl.tracking.wandb_run import finish as finish_wandb
from mrrl.tracking.wandb_run import run_fields
from mrrl.training.runtime import seed_everything
from mrrl.training.trainer import build_trainer, checkpoint_outputs, fit, last_checkpoint
from mrrl.utils.checkpoints import safe_load
from mrrl.utils.io import atomic_write_json, atomic_write_text, json_normalise

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
RESULT_FILE = "result.json"
DONE_FILE = "done.json"


def data_identity(datamodule) -> dict[str, Any]:
    """The data a run saw: dataset, preprocessing and the split file's contents."""
    split_file = Path(datamodule.split_file or datamodule.split_path)
    return {
        "dataset": datamodule.name,
        "root": str(datamodule.root.resolve()),
        "preprocessing": datamodule.cache.dir.name,
        "classes": datamodule.class_names,
        "split_sha1": hashlib.sha1(split_file.read_bytes()).hexdigest(),
    }


def run_key(cfg: DictConfig, protocol: Protocol, seed: int, synthetic: Mapping[str, Any], data: Any) -> dict:
    """Everything a run's test metrics depend on (not the decision threshold: metrics are recomputed
    from the stored probabilities, and not the hardware ``trainer`` group)."""
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    assert isinstance(stage, dict)
    keys = ("arch", "net", "batch_size", "class_weights", "augment", "finetune", "monitor", "positive_class")
    key: dict[str, Any] = {k: stage.get(k) for k in keys}
    key.update(protocol=protocol.key, seed=int(seed), trainer=stage.get("trainer") or {}, data=data)
    if protocol.generator is not None:
        key.update(pretrain=stage.get("pretrain"), generator=protocol.identity(), synthetic=dict(synthetic))
    return json_normalise(key)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished_result(run_dir: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored result of a finished run with this key, else None."""
    result = read_json(run_dir / RESULT_FILE)
    return result if isinstance(result, dict) and result.get("key") == key else None


def prepare_run_dir(run_dir: Path, key: Mapping[str, Any], force: bool) -> None:
    """Clear a stale (other key) or forced run; record the key. Only rank 0 deletes (DDP re-executes)."""
    previous = read_json(run_dir / RUN_FILE)
    stale = run_dir.exists() and (force or previous != key)
    if rank_zero_only.rank == 0:
        if stale and any(run_dir.iterdir()):
            why = "stage.force=true" if force else "its settings or inputs changed"
            print(f"classify: retraining {run_dir} from scratch ({why})")
            shutil.rmtree(run_dir)
        atomic_write_json(run_dir / RUN_FILE, key)


def choose_monitor(requested: str, val_labels: list[int]) -> tuple[str | None, str]:
    """``(monitor, mode)`` for ``best.ckpt``: None without a val split; AUC/F1 need both classes there."""
    if requested not in MONITORS:
        raise ConfigError(f"stage.monitor must be one of {tuple(MONITORS)}, got {requested!r}")
    if not val_labels:
        log.warning("the val split is empty: the last fine-tuning epoch is tested")
        return None, "min"
    if requested in ("val/auc", "val/f1") and len(set(val_labels)) < 2:
        log.warning("the val split has one class, so %s is undefined: selecting by val/loss", requested)
        return "val/loss", "min"
    return requested, MONITORS[requested]


@dataclass
class RunContext:
    """What every run of one stage invocation shares."""

    cfg: DictConfig
    class_names: list[str]
    positive_index: int
    in_channels: int
    train_set: Dataset
    val_set: Dataset | None
    test_set: Dataset
    monitor: tuple[str | None, str]
    device: torch.device | str
    synthetic: Callable[[Protocol], Mapping[str, torch.Tensor]]

    def module(self, phase: str, class_weights: list[float] | None = None) -> ClassifierModule:
        stage = self.cfg.stage
        return ClassifierModule(
            arch=str(stage.arch),
            in_channels=self.in_channels,
            class_names=self.class_names,
            positive_index=self.positive_index,
            net=OmegaConf.to_container(stage.net, resolve=True),
            optim=from_config(PhaseOptimSettings, stage[phase], f"stage.{phase}"),
            class_weights=class_weights,
            threshold=float(stage.threshold),
        )

    def phase_cfg(self, phase: str, validate: bool) -> DictConfig:
        """The config with ``stage.trainer`` extended by this phase's epochs (for ``build_trainer``)."""
        extra: dict[str, Any] = {"max_epochs": int(self.cfg.stage[phase].max_epochs)}
        if not validate:
            extra.update(limit_val_batches=0, num_sanity_val_steps=0)
        own = OmegaConf.to_container(self.cfg.stage.get("trainer") or OmegaConf.create(), resolve=True)
        phase = copy.deepcopy(self.cfg)
        with open_dict(phase):
            phase.stage.trainer = {**own, **extra}  # type: ignore[dict-item]
        return phase

    def datamodule(self, train_set: Dataset, val_set: Dataset | None) -> ClassifyDataModule:
        stage = self.cfg.stage
        return ClassifyDataModule(
            train_set, val_set, int(stage.batch_size), int(stage.eval_batch_size), int(stage.num_workers)
        )


def pretrain(ctx: RunContext, protocol: Protocol, seed: int, phase_dir: Path) -> Path:
    """Train from scratch on the generator's synthetic volumes; the weights (``last.ckpt``) it ends with."""
    done = read_json(phase_dir / DONE_FILE)
    if done and Path(done["ckpt"]).is_file():
        return Path(done["ckpt"])
    volumes = ctx.synthetic(protocol)
    dataset = SyntheticDataset(
        volumes,
        {c: i for i, c in enumerate(ctx.class_names)},
        OmegaConf.to_container(ctx.cfg.stage.augment, resolve=True),
        prefix=protocol.key,
    )
    seed_everything(seed)
    module = ctx.module("pretrain")
    trainer, _ = build_trainer(ctx.phase_cfg("pretrain", validate=False), phase_dir)
    fit(trainer, module, ctx.datamodule(dataset, None), phase_dir)
    finish_wandb(trainer.loggers)  # the next run must not log into this one (DESIGN.md, known pitfalls)
    ckpt = last_checkpoint(phase_dir)
    if ckpt is None:
        raise RuntimeError(f"pre-training in {phase_dir} wrote no last.ckpt")
    if trainer.is_global_zero:
        atomic_write_json(phase_dir / DONE_FILE, {"ckpt": str(ckpt.resolve()), "n_volumes": len(dataset)})
    return ckpt


def finetune(ctx: RunContext, seed: int, phase_dir: Path, init: Path | None) -> tuple[Any, dict[str, Any]]:
    """Fine-tune (or, for *real only*, train from scratch) on the real training split."""
    weights = None
    if ctx.cfg.stage.get("class_weights") == "balanced":
        weights = balanced_class_weights(ctx.train_set.labels, len(ctx.class_names))
    seed_everything(seed)
    module = ctx.module("finetune", weights)
    if init is not None and last_checkpoint(phase_dir) is None:
        load_weights(module, init)
    monitor, mode = ctx.monitor
    trainer, best_cb = build_trainer(
        ctx.phase_cfg("finetune", validate=monitor is not None), phase_dir, monitor=monitor, mode=mode
    )
    fit(trainer, module, ctx.datamodule(ctx.train_set, ctx.val_set if monitor else None), phase_dir)
    return trainer, checkpoint_outputs(phase_dir, best_cb)


def best_epoch(ckpt: str | Path) -> int | None:
    return safe_load(ckpt).get("epoch")


def execute(ctx: RunContext, protocol: Protocol, seed: int, run_dir: Path, key: dict) -> dict | None:
    """Train and test one (protocol, seed) run; its ``result.json`` payload (None on ranks other than 0)."""
    force = bool(ctx.cfg.stage.force)
    prepare_run_dir(run_dir, key, force)
    start = time.monotonic()
    init = None
    if protocol.generator is not None:
        with run_fields(protocol=protocol.key, seed=int(seed), phase="pretrain"):
            init = pretrain(ctx, protocol, seed, run_dir / "pretrain")
    with run_fields(protocol=protocol.key, seed=int(seed), phase="finetune"):  # W&B config: groupable
        trainer, outputs = finetune(ctx, seed, run_dir / "finetune", init)
    if not trainer.is_global_zero:
        return None
    ckpt = outputs.get("best_ckpt") or outputs["last_ckpt"]
    module = ClassifierModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    preds = predict(module, ctx.test_set, int(ctx.cfg.stage.eval_batch_size), ctx.device)
    targets = [int(y == ctx.positive_index) for y in preds["label"]]
    metrics = binary_metrics(preds["prob"], targets, float(ctx.cfg.stage.threshold))
    lines = ["id,label,target,prob_positive"]
    lines += [
        f"{i},{ctx.class_names[y]},{t},{p:.6f}"
        for i, y, t, p in zip(preds["id"], preds["label"], targets, preds["prob"], strict=True)
    ]
    atomic_write_text(run_dir / "predictions.csv", "\n".join(lines) + "\n")
    result = {
        "protocol": protocol.key,
        "seed": int(seed),
        "key": key,
        "metrics": metrics,
        "threshold": float(ctx.cfg.stage.threshold),
        "ckpt": str(Path(ckpt).resolve()),
        "pretrain": read_json(run_dir / "pretrain" / DONE_FILE) if init else None,
        "monitor": outputs.get("monitor"),
        "best_score": outputs.get("best_score"),
        "best_epoch": best_epoch(ckpt),
        "test": {"ids": preds["id"], "targets": targets, "probs": preds["prob"]},
        "seconds": round(time.monotonic() - start, 3),
    }
    atomic_write_json(run_dir / RESULT_FILE, result)
    finish_wandb(trainer.loggers, {"test": metrics})  # the fine-tuning run's summary: its test scores
    return result

"""Stage 4, ``mrrl stage=reward``: train the reward regressors R3D and R2D (paper §3.3–3.4) on the reward dataset.

Each model trains with its own Trainer in ``<run_dir>/r3d`` and ``<run_dir>/r2d``: checkpoints, CSV logs, a
per-group table and plot, and a ``manifest.json`` once it has finished (so a rerun does not retrain it,
and an interrupted one resumes from its ``last.ckpt``). Both use the same seeded hold-out (``split.json``)
and the same reward-target normalisation (train-split mean/std, stored in the checkpoints). The stage
manifest, written last, names both checkpoints (``r3d_ckpt``, ``r2d_ckpt``: what PPO loads) and their metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mrrl.errors import ConfigError, ManifestError
from mrrl.manifest import is_complete, read_manifest, write_manifest
from mrrl.reward.dataset import RewardDataset, load_reward_dataset
from mrrl.reward.losses import RANKING_LOSSES
from mrrl.reward.models import KINDS, load_reward_model
from mrrl.reward.module import MONITORS, RewardDataModule, RewardModule
from mrrl.reward.ranking_metrics import group_table, reward_metrics, score_dataset, write_group_report
from mrrl.reward.splits import SPLIT_FILE, ensure_split
from mrrl.tracking.wandb_run import finish as finish_wandb
from mrrl.tracking.wandb_run import log_scatter, run_fields, runs
from mrrl.training.runtime import seed_everything
from mrrl.training.trainer import already_finished, build_trainer, checkpoint_outputs, fit, last_checkpoint

log = logging.getLogger(__name__)


def resolve_dataset_dir(cfg: DictConfig) -> Path:
    """``stage.dataset_dir`` if given, else the ``reward_data`` stage's manifest of this experiment."""
    if cfg.stage.get("dataset_dir"):
        return Path(str(cfg.stage.dataset_dir))
    hint = (
        "run `mrrl stage=reward_data` with the same experiment first, or pass "
        "stage.dataset_dir=<reward dataset directory>"
    )
    manifest = read_manifest(cfg.paths.experiment_dir, "reward_data", hint=hint)
    dataset_dir = manifest.get("outputs", {}).get("dataset_dir")
    if not dataset_dir:
        raise ManifestError(
            f"the reward_data manifest in {cfg.paths.experiment_dir} names no dataset_dir: {hint}"
        )
    return Path(dataset_dir)


def check_config(cfg: DictConfig) -> list[str]:
    """The models to train; every inconsistent setting is a ConfigError before any data is read."""
    stage = cfg.stage
    models = list(stage.models)
    unknown = [m for m in models if m not in KINDS]
    if not models or unknown:
        raise ConfigError(f"stage.models must list some of {KINDS}, got {models}")
    if stage.monitor not in MONITORS:
        raise ConfigError(f"stage.monitor must be one of {tuple(MONITORS)}, got {stage.monitor!r}")
    if stage.ranking.kind not in RANKING_LOSSES:
        raise ConfigError(f"stage.ranking.kind must be one of {RANKING_LOSSES}, got {stage.ranking.kind!r}")
    if int(stage.ensemble_size) < 1:
        raise ConfigError(f"stage.ensemble_size must be ≥ 1, got {stage.ensemble_size}")
    if float(stage.ranking_weight) < 0:
        raise ConfigError(f"stage.ranking_weight must be ≥ 0, got {stage.ranking_weight}")
    for kind in models:
        for key in ("batch_size", "eval_batch_size"):
            if int(stage[kind][key]) < 1:
                raise ConfigError(f"stage.{kind}.{key} must be ≥ 1, got {stage[kind][key]}")
    return models


def target_normalisation(rewards: np.ndarray, enabled: bool) -> dict[str, Any]:
    """Standardise the regression targets with the training split's statistics (undone in ``score_volumes``)."""
    if not enabled:
        return {"enabled": False, "mean": 0.0, "std": 1.0}
    std = float(np.std(rewards))
    return {"enabled": True, "mean": float(np.mean(rewards)), "std": std if std > 1e-8 else 1.0}


def _model_cfg(cfg: DictConfig, kind: str) -> DictConfig:
    """The stage config with ``stage.<kind>.trainer`` merged over ``stage.trainer`` (for ``build_trainer``)."""
    own = cfg.stage[kind].get("trainer") or {}
    return OmegaConf.merge(cfg, {"stage": {"trainer": OmegaConf.merge(cfg.stage.get("trainer") or {}, own)}})


def _device(cfg: DictConfig) -> str:
    return "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"


def train_model(
    cfg: DictConfig,
    kind: str,
    model_dir: Path,
    train_set: RewardDataset,
    val_set: RewardDataset,
    norm: dict[str, Any],
    dataset_dir: Path,
) -> dict[str, Any] | None:
    """Fit one regressor (resuming or skipping as its folder says); on rank 0 evaluate its best checkpoint."""
    stage = cfg.stage
    force = bool(stage.force)
    if is_complete(model_dir) and not force:
        print(f"reward: {kind} already trained in {model_dir}")
        return read_manifest(model_dir.parent, model_dir.name)["outputs"]
    section = OmegaConf.to_container(stage[kind], resolve=True)
    assert isinstance(section, dict)
    module = RewardModule(
        kind=kind,
        image_shape=train_set.image_shape,
        net=section,
        optim=OmegaConf.to_container(stage.optim, resolve=True),
        ranking=OmegaConf.to_container(stage.ranking, resolve=True),
        ranking_weight=float(stage.ranking_weight),
        target_mean=norm["mean"],
        target_std=norm["std"],
        slice_targets=bool(section["slice_targets"]) if kind == "r2d" else False,
        dataset_dir=str(dataset_dir.resolve()),
        augment=OmegaConf.to_container(stage.augment, resolve=True),
    )
    datamodule = RewardDataModule(
        train_set, val_set, section["batch_size"], section["eval_batch_size"], int(stage.num_workers)
    )
    monitor, mode = MONITORS[stage.monitor]
    with run_fields(reward_model=model_dir.name):  # one W&B run per model, told apart by this field
        trainer, best_cb = build_trainer(_model_cfg(cfg, kind), model_dir, monitor=monitor, mode=mode)
    fit(trainer, module, datamodule, model_dir, fresh=force)
    if not trainer.is_global_zero:
        return None
    outputs = checkpoint_outputs(model_dir, best_cb)
    best = outputs.get("best_ckpt") or str(last_checkpoint(model_dir))
    outputs["best_ckpt"] = best
    net = load_reward_model(best, _device(cfg))
    batch = int(section["eval_batch_size"])
    scores = {
        name: score_dataset(net, ds, batch, _device(cfg))
        for name, ds in (("train", train_set), ("val", val_set))
    }
    for name, ds in (("train", train_set), ("val", val_set)):
        outputs[name] = reward_metrics(scores[name], ds.rewards, ds.group_ids)
    rows = group_table(train_set, val_set, scores["train"], scores["val"])
    v = outputs["val"]
    title = f"{kind}: val Spearman {_fmt(v['spearman'])}, rank acc {_fmt(v['rank_acc'])}"
    table_path, plot_path = write_group_report(rows, model_dir, title)
    outputs.update(
        {
            "kind": kind,
            "arch": section.get("arch"),
            "group_table": str(table_path.resolve()),
            "group_plot": str(plot_path.resolve()),
        }
    )
    write_manifest(model_dir, f"reward.{kind}", outputs)
    log_reward_scores(trainer.loggers, (train_set, val_set), scores, outputs)
    return outputs


def log_reward_scores(loggers, datasets, scores, outputs) -> None:
    """W&B: predicted against target reward per volume (table and scatter), final metrics; ends the run
    (or the next model would log into it: DESIGN.md, known pitfalls)."""
    for run in runs(loggers):
        rows = [
            [split, str(group), float(target), float(pred)]
            for split, ds in zip(("train", "val"), datasets)
            for group, target, pred in zip(ds.group_ids, ds.rewards, scores[split])
        ]
        columns = ["split", "group", "target", "predicted"]
        log_scatter(run, "reward/scores", columns, rows, "target", "predicted", "predicted vs target reward")
    finish_wandb(loggers, {"final": {"train": outputs["train"], "val": outputs["val"]}})


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    if already_finished(cfg, run_dir):
        return None
    models = check_config(cfg)
    dataset_dir = resolve_dataset_dir(cfg)
    dataset = load_reward_dataset(dataset_dir)
    is_zero = rank_zero_only.rank == 0
    split = ensure_split(
        run_dir,
        dataset.rows,
        str(cfg.stage.split),
        float(cfg.stage.val_fraction),
        int(cfg.seed),
        dataset_dir,
        write=is_zero,
        force=bool(cfg.stage.force),
    )
    train_set, val_set = dataset.subset(split["train"]), dataset.subset(split["val"])
    norm = target_normalisation(train_set.rewards, bool(cfg.stage.normalize_targets))
    size = int(cfg.stage.ensemble_size)
    results: dict[str, Any] = {}
    members: dict[str, list[str]] = {kind: [] for kind in models}
    # Member 0 of every model first, in the order ensemble_size=1 trains them: so member 0 is exactly the single
    # model of ensemble_size=1 for R2D too (the extra members' reseeding must not run before it). The others
    # differ by their seed only.
    for k in range(size):
        if k > 0:
            seed_everything(int(cfg.seed) + k)
        for kind in models:
            name = member_names(kind, size)[k]
            results[name] = train_model(cfg, kind, run_dir / name, train_set, val_set, norm, dataset_dir)
            members[kind].append(name)
    if not is_zero:
        return None
    outputs: dict[str, Any] = {
        "dataset_dir": str(dataset_dir.resolve()),
        "image_shape": list(dataset.image_shape),
        "class_names": dataset.meta.get("class_names"),
        "split": {
            "file": str((run_dir / SPLIT_FILE).resolve()),
            "mode": str(cfg.stage.split),
            "val_fraction": float(cfg.stage.val_fraction),
            "num_train": len(train_set),
            "num_val": len(val_set),
        },
        "target_normalization": norm,
        "models": results,
        "ensemble_size": size,
        **{f"{kind}_ckpt": results[kind]["best_ckpt"] for kind in models},  # type: ignore[index]
    }
    if size > 1:  # what PPO loads as the ensemble (stage=ppo reward.uncertainty_penalty)
        outputs.update({f"{kind}_ckpts": [results[n]["best_ckpt"] for n in members[kind]] for kind in models})
    write_manifest(run_dir, "reward", outputs, cfg)
    for kind in models:
        val = results[kind]["val"]  # type: ignore[index]
        print(
            f"reward: {kind} val MSE {_fmt(val['mse'])}  Spearman {_fmt(val['spearman'])}  "
            f"rank acc {_fmt(val['rank_acc'])}  ({results[kind]['best_ckpt']})"
        )  # type: ignore[index]
    return outputs


def member_names(kind: str, size: int) -> list[str]:
    """Folders of an ensemble's members: ``r3d`` (as without an ensemble), then ``r3d_m1``, ``r3d_m2``, ..."""
    return [kind] + [f"{kind}_m{k}" for k in range(1, size)]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

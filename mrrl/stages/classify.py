"""Stage 7, ``mrrl stage=classify``: downstream classification (paper §4.3, Tables 3 and 4).

A 3D ResNet (MONAI, ``stage.arch``) classifies the real **test** split after each protocol:

- ``real``: trained on the real training split (random shifted crop + flip), best epoch on the val split;
- ``standard`` / ``rl``: pre-trained on ``stage.n_synthetic_per_class`` volumes per class sampled from the
  standard / PPO fine-tuned diffusion model, then fine-tuned the same way on the real training split;
- one more row per ``stage.extra_generators`` entry (checkpoints or volume files: Table 4 baselines).

Each protocol runs once per seed of ``stage.seeds`` (see :mod:`mrrl.classify.runner` for the per-run
folders, resume and skipping); synthetic volumes are sampled once per generator, before any training,
and cached in ``<run_dir>/synthetic/``; under ``trainer=ddp`` the ranks (started here, before sampling, and
reused by every Trainer) share the sampling and each gets all volumes (:mod:`mrrl.training.ranks`). A protocol
whose generator does not exist yet (no ppo manifest) is reported as missing and the others run. Outputs:
``table3.md``, ``table3.csv`` (accuracy, F1, AUC as mean ± sample std over seeds), ``per_seed.csv``,
``metrics.json`` and the manifest. Rerunning rebuilds the tables from the finished runs' stored test
predictions and trains only what is missing or stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mrrl.classify.metrics import aggregate, binary_metrics, difference_verdict, paired_difference
from mrrl.classify.model import MONITORS, build_classifier
from mrrl.classify.protocols import Protocol, SyntheticVolumes, discover_protocols, generation_settings
from mrrl.classify.runner import RunContext, choose_monitor, data_identity, execute, finished_result, run_key
from mrrl.classify.tables import write_tables
from mrrl.errors import ConfigError, ManifestError
from mrrl.manifest import write_manifest
from mrrl.training.ranks import RankShard, generation_device, launch_ranks
from mrrl.training.runtime import build_datamodule
from mrrl.utils.io import atomic_write_json, finite_or_none


def _seeds(cfg: DictConfig) -> list[int]:
    seeds = [int(s) for s in (cfg.stage.seeds or [])]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"stage.seeds must be a non-empty list of distinct ints, got {seeds}")
    return seeds


def check_config(cfg: DictConfig, in_channels: int) -> None:
    """Every setting a run needs, checked before any run folder is touched (a changed setting makes the
    finished runs stale, and a stale run's folder is cleared before it retrains)."""
    stage = cfg.stage
    if stage.monitor not in MONITORS:
        raise ConfigError(f"stage.monitor must be one of {tuple(MONITORS)}, got {stage.monitor!r}")
    if stage.class_weights not in (None, "balanced"):
        raise ConfigError(f"stage.class_weights must be null or 'balanced', got {stage.class_weights!r}")
    if not 0.0 < float(stage.threshold) < 1.0:
        raise ConfigError(f"stage.threshold must be in (0, 1), got {stage.threshold}")
    if int(stage.batch_size) < 2 or int(stage.eval_batch_size) < 1:
        raise ConfigError("stage.batch_size must be ≥ 2 (BatchNorm) and stage.eval_batch_size ≥ 1")
    if int(stage.n_synthetic_per_class) < 1:
        raise ConfigError(f"stage.n_synthetic_per_class must be ≥ 1, got {stage.n_synthetic_per_class}")
    for phase in ("pretrain", "finetune"):
        if int(stage[phase].max_epochs) < 1:
            raise ConfigError(f"stage.{phase}.max_epochs must be ≥ 1, got {stage[phase].max_epochs}")
    try:
        build_classifier(str(stage.arch), in_channels, 2, **OmegaConf.to_container(stage.net, resolve=True))
    except TypeError as exc:
        raise ConfigError(f"stage.net has an argument MONAI's ResNet does not take: {exc}") from exc


def _positive_index(cfg: DictConfig, class_names: list[str]) -> int:
    if len(class_names) != 2:
        raise ConfigError(f"the classify stage is binary; data.classes is {class_names}")
    positive = cfg.stage.positive_class or class_names[0]
    if positive not in class_names:
        raise ConfigError(f"stage.positive_class={positive!r} is not one of the data's classes {class_names}")
    return class_names.index(positive)


class SyntheticSlot:
    """The current protocol's synthetic volumes: protocols run one after another, so one generator's
    volumes are held in memory at a time (the others stay in the disk cache)."""

    def __init__(self, source: SyntheticVolumes):
        self.source = source
        self.key: str | None = None
        self.volumes: Mapping[str, torch.Tensor] = {}
        self.info: dict[str, dict[str, Any]] = {}

    def __call__(self, protocol: Protocol) -> Mapping[str, torch.Tensor]:
        assert protocol.generator is not None
        if self.key != protocol.key:
            self.volumes = {}  # free the previous generator's volumes first
            self.volumes, info = self.source.get(protocol.generator)
            self.key = protocol.key
            self.info.setdefault(protocol.key, info)
        return self.volumes


@dataclass(frozen=True)
class PlannedRun:
    protocol: Protocol
    seed: int
    dir: Path
    key: dict[str, Any]


def load_splits(cfg: DictConfig):
    """``(datamodule, train, val, test, positive class index)``; train augments with ``stage.augment``."""
    augment = OmegaConf.to_container(cfg.stage.augment, resolve=True)
    datamodule = build_datamodule(cfg, augment=augment).prepare()
    check_config(cfg, int(datamodule.image_shape[0]))
    positive = _positive_index(cfg, datamodule.class_names)
    train, val, test = (datamodule.dataset(s, augment=s == "train") for s in ("train", "val", "test"))
    for split, ds in (("train", train), ("test", test)):
        if len(set(ds.labels)) < 2:
            raise ConfigError(
                f"the {split} split needs volumes of both classes, it has {len(ds)} of {set(ds.labels)}"
            )
    return datamodule, train, val, test, positive


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    run_dir = Path(run_dir)
    stage = cfg.stage
    seeds = _seeds(cfg)
    protocols, missing, vqgan = discover_protocols(cfg)
    for why in missing.values():
        print(f"classify: missing protocol — {why}")
    if not protocols:
        raise ManifestError("no protocol to run:\n  " + "\n  ".join(missing.values()))
    datamodule, train_set, val_set, test_set, positive = load_splits(cfg)
    fabric = launch_ranks(cfg)  # None in one process (and under ddp_spawn: its Trainers spawn the ranks)

    settings = generation_settings(stage)
    data_id = data_identity(datamodule)
    plan = [
        PlannedRun(
            p, s, run_dir / "runs" / p.key / f"seed{s}", run_key(cfg, p, s, settings.cache_key(), data_id)
        )
        for p in protocols
        for s in seeds
    ]
    force = bool(stage.force)
    done = {} if force else {(r.protocol.key, r.seed): finished_result(r.dir, r.key) for r in plan}
    device = generation_device(cfg, fabric)
    synthetic = SyntheticSlot(
        SyntheticVolumes(
            datamodule.class_names,
            tuple(datamodule.image_shape),
            settings,
            run_dir / "synthetic",
            device,
            vqgan_ckpt=vqgan,
            regenerate=bool(stage.regenerate),
            shard=RankShard(fabric),
        )
    )
    # Sample (or find in the cache) every generator that still has runs to do, before any training:
    # a broken generator fails now, not after hours of training the other protocols.
    todo = [r for r in plan if not done.get((r.protocol.key, r.seed))]
    for protocol in {r.protocol.key: r.protocol for r in todo if r.protocol.generator}.values():
        synthetic(protocol)

    ctx = RunContext(
        cfg=cfg,
        class_names=datamodule.class_names,
        positive_index=positive,
        in_channels=int(datamodule.image_shape[0]),
        train_set=train_set,
        val_set=val_set if len(val_set) else None,
        test_set=test_set,
        monitor=choose_monitor(str(stage.monitor), val_set.labels),
        device=device,
        synthetic=synthetic,
    )
    results: dict[str, list[dict[str, Any]]] = {p.key: [] for p in protocols}
    for r in plan:
        result = done.get((r.protocol.key, r.seed))
        if result is not None:
            print(f"classify: {r.protocol.label}, seed {r.seed}: finished earlier ({r.dir})")
        else:
            print(f"classify: {r.protocol.label}, seed {r.seed}: training in {r.dir}")
            result = execute(ctx, r.protocol, r.seed, r.dir, r.key)
        if result is not None:  # None on DDP ranks other than 0
            results[r.protocol.key].append({**result, "dir": str(r.dir.resolve())})
    if rank_zero_only.rank != 0:
        return None
    summary = summarize(cfg, datamodule, protocols, results, missing, synthetic.info, positive)
    return write_outputs(cfg, run_dir, summary)


def write_outputs(cfg: DictConfig, run_dir: Path, summary: Mapping[str, Any]) -> dict[str, Any]:
    """The tables, ``metrics.json`` and the manifest (per-seed and aggregated metrics of every protocol)."""
    title = f"Table 3 ({summary['experiment']}, {summary['dataset']}): downstream classification"
    tables = write_tables(run_dir, summary, title)
    metrics_json = atomic_write_json(run_dir / "metrics.json", finite_or_none(summary))
    print(tables["table_md"].read_text())
    outputs = {
        **{k: str(v.resolve()) for k, v in tables.items()},
        "metrics_json": str(metrics_json.resolve()),
        "protocols": {
            r["key"]: {"label": r["label"], "metrics": r["metrics"], "per_seed": r["per_seed"]}
            for r in summary["protocols"]
        },
        "missing": summary["missing"],
        "paired": summary["paired"],
    }
    outputs = finite_or_none(outputs)
    write_manifest(run_dir, "classify", outputs, cfg)
    return outputs


def _run_summary(r: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    return {
        "seed": r["seed"],
        "metrics": binary_metrics(r["test"]["probs"], r["test"]["targets"], threshold),
        "best_epoch": r.get("best_epoch"),
        "ckpt": r["ckpt"],
        "dir": r["dir"],
        "n_synthetic": (r.get("pretrain") or {}).get("n_volumes"),
    }


def summarize(cfg, datamodule, protocols, results, missing, synthetic_info, positive: int) -> dict[str, Any]:
    """Per protocol: every seed's metrics (recomputed from the stored test probabilities at the current
    threshold) and their mean ± sample std; plus what the table's header needs."""
    threshold = float(cfg.stage.threshold)
    class_names = datamodule.class_names
    test_labels = datamodule.dataset("test").labels
    rows = []
    for p in protocols:
        runs = [_run_summary(r, threshold) for r in sorted(results[p.key], key=lambda r: r["seed"])]
        generator = None if p.generator is None else (p.generator.source or dict(p.generator.class_files))
        rows.append(
            {
                "key": p.key,
                "label": p.label,
                "generator": generator,
                "synthetic": synthetic_info.get(p.key),
                "seeds": [r["seed"] for r in runs],
                "metrics": aggregate([r["metrics"] for r in runs]),
                "per_seed": {str(r["seed"]): r["metrics"] for r in runs},
                "runs": runs,
            }
        )
    iv = cfg.stage.intervals
    return {
        "paired": paired_differences(
            protocols, results, threshold, int(iv.n_boot), int(iv.seed), float(iv.level)
        ),
        "experiment": cfg.experiment_name,
        "dataset": datamodule.name,
        "arch": str(cfg.stage.arch),
        "classes": class_names,
        "positive_class": class_names[positive],
        "threshold": threshold,
        "std": "sample standard deviation over seeds (ddof = 1)",
        "test_counts": {c: test_labels.count(i) for i, c in enumerate(class_names)},
        "protocols": rows,
        "missing": missing,
        "n_synthetic_per_class": int(cfg.stage.n_synthetic_per_class),
    }


def paired_differences(
    protocols, results, threshold: float, n_boot: int, seed: int, level: float
) -> list[dict]:
    """Every later protocol against every earlier one (standard − real, rl − real, rl − standard, ...):
    the mean paired difference over shared seeds with its bootstrap interval and a verdict per metric."""
    test_runs = {
        p.key: {r["seed"]: (r["test"]["probs"], r["test"]["targets"]) for r in results[p.key]}
        for p in protocols
    }
    out = []
    for j, a in enumerate(protocols):
        for b in protocols[:j]:
            diff = paired_difference(test_runs[a.key], test_runs[b.key], threshold, n_boot, seed, level)
            verdicts = {
                m: difference_verdict(d, f"{a.key} better", f"{a.key} worse") for m, d in diff.items()
            }
            out.append(
                {
                    "a": a.key,
                    "b": b.key,
                    "label": f"{a.label} − {b.label}",
                    "difference": diff,
                    "verdict": verdicts,
                }
            )
    return out

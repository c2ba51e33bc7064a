"""Stage 6, ``mrrl stage=evaluate``: paper Table 2, FID per class and overall for every available model.

Rows: the VQGAN reconstruction of the real test set (the limit), the standard diffusion model, the RL
fine-tuned model (found through the ``vqgan`` / ``diffusion`` / ``ppo`` manifests or given as
``stage.vqgan_ckpt`` / ``diffusion_ckpt`` / ``rl_ckpt``) and any ``stage.extra_models``. Rows whose stage
has not run are named with the reason and the command that produces them; the tables hold the rows
that exist. Every configured extractor gives one FID table; precision/recall/density/coverage and MS-SSIM
diversity go to ``metrics.json`` and the Markdown.

Outputs in the run dir: ``table2.md``, ``table2.csv``, ``metrics.json``, ``figures/samples_<class>.png``,
``samples/<model>/<class>.npy`` (the generated volumes, reused by a rerun with the same settings) and the
manifest. A finished evaluation is skipped when its inputs (checkpoints, settings, data) are unchanged;
``stage.force=true`` re-scores (still reusing cached samples; ``stage.regenerate=true`` samples again).

With ``logger=wandb`` Table 2 (with intervals), the per-model/class values, PRDC, diversity, the gap
closed and the figures also go to W&B (:mod:`mrrl.tracking.stage_logs`).

Distributed: under a multi-device ``trainer`` (``trainer=ddp``: 4 GPUs) the ranks share the sampling and
the reconstructions of every row (:mod:`mrrl.training.ranks`; deterministic DDIM gives the volumes one process
would), and rank 0 alone extracts features, scores and writes. With one device it runs in one process
(the first GPU unless ``trainer.accelerator=cpu``); extra ranks started outside such a config (torchrun
with ``trainer.devices=1``) return at once and write nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mrrl.errors import ConfigError, ManifestError
from mrrl.evaluation.calibration import CalibrationSettings, calibration_volumes, premise_checks
from mrrl.evaluation.judge import check_headline_name, headline_judge
from mrrl.evaluation.scores import (
    ALL,
    RealFeatureCache,
    RealReference,
    build_extractors,
    diversity_by_class,
    model_features,
    real_reference,
    score_model,
)
from mrrl.evaluation.sources import (
    GenerationSettings,
    ModelSpec,
    VolumeContext,
    VolumeSet,
    discover_models,
    model_volumes,
)
from mrrl.evaluation.tables import (
    gap_closed,
    render_markdown,
    write_calibration_figure,
    write_csv,
    write_figures,
)
from mrrl.manifest import MANIFEST_NAME, is_complete, write_manifest
from mrrl.metrics.intervals import bootstrap_scores, split_half_floor
from mrrl.tracking.stage_logs import log_evaluation
from mrrl.tracking.wandb_run import stage_run
from mrrl.training.ranks import RankShard, generation_device, launch_ranks, process_rank
from mrrl.training.runtime import build_datamodule
from mrrl.training.trainer import release_process_group
from mrrl.utils.io import atomic_write_json, atomic_write_text, finite_or_none


def load_real_sets(datamodule, split: str) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The real ``split`` volumes per class ``[N, C, D, H, W]`` and their subject ids."""
    volumes, ids = {}, {}
    for c in datamodule.class_names:
        dataset = datamodule.dataset(split, label=c)
        if len(dataset) < 2:
            raise ConfigError(
                f"the {split} split has {len(dataset)} {c} volume(s); FID needs at least 2 per class "
                "(raise data.test_per_class)"
            )
        items = [dataset[i] for i in range(len(dataset))]
        volumes[c] = torch.stack([item["image"] for item in items]).float()
        ids[c] = [item["id"] for item in items]
    return volumes, ids


def inputs_fingerprint(cfg: DictConfig, specs) -> dict[str, Any]:
    """What the evaluation's numbers depend on; a finished run with the same fingerprint is not redone."""
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    assert isinstance(stage, dict)
    for key in ("force", "regenerate"):
        stage.pop(key, None)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return json.loads(
        json.dumps(
            {"models": {s.key: s.identity() for s in specs}, "stage": stage, "data": data},
            sort_keys=True,
            default=str,
        )
    )


def _previous_inputs(run_dir: Path) -> Any:
    try:
        return json.loads((run_dir / MANIFEST_NAME).read_text())["outputs"].get("inputs")
    except (OSError, ValueError, KeyError):
        return None


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    fabric = launch_ranks(cfg)
    shard = RankShard(fabric)
    if fabric is None and process_rank() != 0:
        print(f"evaluate: rank {process_rank()} idle (trainer.devices=1: the evaluation runs on rank 0)")
        return None
    run_dir = Path(run_dir)
    specs, missing = discover_models(cfg)
    inputs = inputs_fingerprint(cfg, specs)
    if is_complete(run_dir) and not cfg.stage.force and _previous_inputs(run_dir) == inputs:
        print(f"evaluate: already evaluated these models in {run_dir} (stage.force=true re-scores)")
        return None
    for reason in missing.values():
        print(f"evaluate: missing row — {reason}")
    if not specs:
        raise ManifestError("nothing to evaluate:\n  " + "\n  ".join(missing.values()))
    check_pairs(cfg, [spec.key for spec in specs])

    device = generation_device(cfg, fabric)
    datamodule = build_datamodule(cfg).prepare()
    split = str(cfg.stage.split)
    real, real_ids = load_real_sets(datamodule, split)
    ctx = VolumeContext(
        class_names=datamodule.class_names,
        real=real,
        real_ids=real_ids,
        image_shape=tuple(datamodule.image_shape),
        settings=GenerationSettings.from_config(cfg.stage),
        samples_dir=run_dir / "samples",
        device=device,
        regenerate=bool(cfg.stage.regenerate),
        vqgan_ckpt=next((s.source for s in specs if s.key == "vqgan"), None),
        reconstruction_batch_size=int(cfg.stage.reconstruction_batch_size),
        shard=shard,
    )
    made = make_rows_on_all_ranks(specs, ctx) if shard.world > 1 else {}
    if not shard.is_zero:
        print(f"evaluate: rank {shard.rank} made its share of every row; rank 0 scores and writes")
        return None

    scorer = Scorer.build(cfg, datamodule, split, real, real_ids, device)
    n_fig = int(cfg.stage.figure_volumes)
    models, scores, previews, features = [], [], {}, {}
    for spec in specs:
        model, rows, volumes, features[spec.key] = evaluate_row(spec, ctx, scorer, made.get(spec.key))
        models.append(model)
        scores += rows
        previews[spec.label] = {c: v[:n_fig] for c, v in volumes.items()}

    results = collect_results(cfg, datamodule, split, models, missing, scores, scorer, ctx, shard.world)
    results["real"]["diversity"] = scorer.diversity(real)
    calibration = {}
    standard = next((s for s in specs if s.key == "standard"), None)
    if standard is not None:
        cal_volumes, calibration = calibration_volumes(
            standard, ctx, CalibrationSettings.from_config(cfg.stage)
        )
        for name, volumes in cal_volumes.items():
            features[name] = scorer.features(volumes)
    results.update(uncertainty(cfg, scorer, features, calibration))
    results["headline"] = headline_judge(cfg, scorer.extractors, str(cfg.stage.metrics.headline_extractor))
    results = finite_or_none(results)
    outputs = write_outputs(cfg, run_dir, results, {c: v[:n_fig] for c, v in real.items()}, previews)
    outputs["inputs"] = inputs
    write_manifest(run_dir, "evaluate", outputs, cfg)
    return outputs


@dataclass
class Scorer:
    """The configured extractors, the real reference and the metric settings."""

    extractors: list
    reference: RealReference
    batch_size: int
    k: int
    with_prdc: bool
    diversity_pairs: int
    seed: int
    device: torch.device

    @classmethod
    def build(cls, cfg: DictConfig, datamodule, split: str, real, real_ids, device: torch.device) -> Scorer:
        metrics = cfg.stage.metrics
        image_shape = tuple(datamodule.image_shape)
        options = OmegaConf.to_container(metrics.extractor_options or {}, resolve=True)
        extractors = [e.to(device) for e in build_extractors(list(metrics.extractors), options, image_shape)]
        check_headline_name(str(metrics.headline_extractor), extractors)
        batch_size = int(metrics.batch_size)
        cache_dir = metrics.stats_cache_dir or Path(cfg.paths.cache_dir) / "fid_stats"
        data_key = {
            "dataset": datamodule.name,
            "root": str(datamodule.root.resolve()),
            "preprocessing": datamodule.cache.dir.name,
            "split": split,
            "image_shape": list(image_shape),
        }
        cache = RealFeatureCache(cache_dir)
        reference = real_reference(extractors, real, real_ids, data_key, cache, batch_size, device)
        return cls(
            extractors=extractors,
            reference=reference,
            batch_size=batch_size,
            k=int(metrics.prdc_k),
            with_prdc=bool(metrics.with_prdc),
            diversity_pairs=int(metrics.diversity_pairs),
            seed=int(cfg.stage.seed),
            device=device,
        )

    def features(self, volumes: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return model_features(volumes, self.extractors, self.batch_size, self.device)

    def scores(self, volumes: Mapping[str, torch.Tensor], features=None) -> list[dict[str, Any]]:
        return score_model(
            volumes,
            self.extractors,
            self.reference,
            self.batch_size,
            self.k,
            self.with_prdc,
            self.device,
            features=features,
        )

    def real_features(self, name: str) -> dict[str, torch.Tensor]:
        """The real reference's feature rows of one extractor, per class (without ``All``)."""
        return {c: f for c, f in self.reference.features[name].items() if c != ALL}

    def diversity(self, volumes: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return diversity_by_class(volumes, self.diversity_pairs, self.seed, self.batch_size, self.device)


def make_rows_on_all_ranks(specs, ctx: VolumeContext) -> dict[str, VolumeSet]:
    """DDP: every rank makes its share of every row (rank 0 writes the sample caches); then the ranks part.

    Scoring comes after, on rank 0 alone, from the caches: the metrics (MONAI's MS-SSIM, torchmetrics)
    would otherwise try to synchronise with ranks that are done.
    """
    made = {}
    for spec in specs:
        if spec.kind != "volumes":  # volume files are only read, by rank 0 when it scores
            produced = model_volumes(spec, ctx)
            made[spec.key] = VolumeSet({}, produced.reused, produced.seconds)
    release_process_group()
    ctx.shard, ctx.regenerate = RankShard(), False  # from here on: one process, reading the caches
    return made


def evaluate_row(spec: ModelSpec, ctx: VolumeContext, scorer: Scorer, made: VolumeSet | None = None):
    """``(model summary, score rows, volumes per class)`` of one row (``made``: how DDP ranks made it)."""
    t0 = time.monotonic()
    produced = model_volumes(spec, ctx)
    if made is not None:
        produced.reused, produced.seconds = made.reused, made.seconds
    features = scorer.features(produced.volumes)
    rows = [
        {"model": spec.key, "model_label": spec.label, **r}
        for r in scorer.scores(produced.volumes, features=features)
    ]
    model = {
        "key": spec.key,
        "label": spec.label,
        "kind": spec.kind,
        "source": spec.source or dict(spec.class_files),
        "n_per_class": {c: len(v) for c, v in produced.volumes.items()},
        "reused_samples": produced.reused,
        "volume_seconds": round(produced.seconds, 3),
        "generation": produced.generation,  # diffusion rows: the sampler each was made with (null keys resolved)
        "diversity": scorer.diversity(produced.volumes),
        "seconds": round(time.monotonic() - t0, 3),
    }
    cached = " (cached samples)" if produced.reused and all(produced.reused.values()) else ""
    print(f"evaluate: {spec.label}: {model['seconds']:.1f} s{cached}")
    return model, rows, produced.volumes, features


def interval_pairs(cfg: DictConfig) -> list[tuple[str, str]]:
    """``stage.intervals.pairs``: the ``[a, b]`` rows whose paired difference a − b gets an interval."""
    pairs = []
    for i, pair in enumerate(cfg.stage.intervals.pairs or []):
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ConfigError(
                f"stage.intervals.pairs[{i}]={list(pair)}: give two different row names, [a, b]"
            )
        pairs.append((str(pair[0]), str(pair[1])))
    return pairs


def check_pairs(cfg: DictConfig, rows: list[str]) -> None:
    """Before any sampling: every paired row must be one this run fills."""
    for a, b in interval_pairs(cfg):
        unknown = [k for k in (a, b) if k not in rows]
        if unknown:
            raise ConfigError(
                f"stage.intervals.pairs: no row named {', '.join(unknown)}; this run's rows: {', '.join(rows)} "
                "(add one with +stage.extra_models.<name>=<checkpoint>)"
            )


def uncertainty(cfg: DictConfig, scorer: Scorer, features, calibration) -> dict[str, Any]:
    """Bootstrap intervals (FID, KID, RL−standard difference, gap closed, verdicts), the split-half floor
    and the paper's premises, per extractor; the premises are judged on the headline extractor."""
    iv = cfg.stage.intervals
    n_boot, level, seed = int(iv.n_boot), float(iv.level), int(iv.seed)
    intervals, floors = {}, {}
    for e in scorer.extractors:
        real = scorer.real_features(e.name)
        fake = {key: per_ext[e.name] for key, per_ext in features.items()}
        r = e.rows_per_volume()
        t0 = time.monotonic()
        intervals[e.name] = bootstrap_scores(
            real, fake, n_boot, seed, level, rows_per_volume=r, pairs=interval_pairs(cfg)
        )
        floors[e.name] = split_half_floor(real, int(iv.floor_splits), seed, level, rows_per_volume=r)
        print(f"evaluate: {e.name}: {n_boot} bootstrap resamples in {time.monotonic() - t0:.1f} s")
    headline = str(cfg.stage.metrics.headline_extractor)
    premises = {
        col: premise_checks(intervals[headline], calibration, floors[headline], col)
        for col in [*scorer.reference.features[headline]]
    }
    return {"intervals": intervals, "floor": floors, "calibration": calibration, "premises": premises}


def collect_results(
    cfg, datamodule, split, models, missing, scores, scorer: Scorer, ctx, ranks: int = 1
) -> dict[str, Any]:
    """Everything for ``metrics.json`` and the tables (see :mod:`mrrl.evaluation.tables`)."""
    cols = [*datamodule.class_names, "All"]
    fid: dict[str, dict[str, dict[str, float]]] = {}
    for e in scorer.extractors:
        fid[e.name] = {m["key"]: {} for m in models}
        for r in scores:
            if r["extractor"] == e.name:
                fid[e.name][r["model"]][r["class"]] = r["fid"]
    real_n = {c: len(v) for c, v in ctx.real.items()}
    return {
        "experiment": cfg.experiment_name,
        "dataset": datamodule.name,
        "split": split,
        "classes": list(datamodule.class_names),
        "models": models,
        "missing": missing,
        "extractors": [{"name": e.name, "identity": e.identity} for e in scorer.extractors],
        "scores": scores,
        "fid": fid,
        "gap_closed": {e.name: gap_closed(fid[e.name], cols) for e in scorer.extractors},
        "real": {"n": {**real_n, "All": sum(real_n.values())}},
        "settings": {
            "generation": {**ctx.settings.cache_key(), "batch_size": ctx.settings.batch_size},
            "metrics": OmegaConf.to_container(cfg.stage.metrics, resolve=True),
            "device": str(ctx.device),
            "ranks": ranks,
        },
    }


def write_outputs(cfg, run_dir: Path, results, real_preview, previews) -> dict[str, Any]:
    """``table2.md``, ``table2.csv``, ``metrics.json``, figures (and W&B with ``logger=wandb``)."""
    markdown = render_markdown(results, title=f"Table 2 ({results['experiment']}, {results['dataset']})")
    table_md = atomic_write_text(run_dir / "table2.md", markdown)
    table_csv = write_csv(run_dir / "table2.csv", results)
    metrics_json = atomic_write_json(run_dir / "metrics.json", results)
    figures = write_figures(run_dir / "figures", real_preview, previews, int(cfg.stage.figure_volumes))
    if results.get("calibration"):
        figures.append(write_calibration_figure(run_dir / "figures" / "calibration.png", results))
    print(markdown)
    if cfg.logger.name == "wandb":
        log_to_wandb(cfg, run_dir, results, figures)
    return {
        "table_md": str(table_md.resolve()),
        "table_csv": str(table_csv.resolve()),
        "metrics_json": str(metrics_json.resolve()),
        "figures": [str(p.resolve()) for p in figures],
        "rows": [m["key"] for m in results["models"]],
        "missing": results["missing"],
        "fid": results["fid"],
        "gap_closed": results["gap_closed"],
        "headline": results["headline"],
        "headline_table": headline_summary(results),
    }


def headline_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's short form of the headline numbers: FID/KID with intervals, gap closed, verdicts."""
    name = results["headline"]["extractor"]
    iv = results["intervals"][name]
    keys = [m["key"] for m in results["models"]]
    return {
        "extractor": name,
        "scores": {metric: {k: iv["scores"][metric][k] for k in keys} for metric in ("fid", "kid")},
        "gap_closed": iv.get("gap_closed"),
        "verdict": iv.get("verdict"),
        "floor": results["floor"][name],
        "premises_passed": {
            col: all(check["passed"] for check in checks) for col, checks in results["premises"].items()
        },
    }


def log_to_wandb(cfg: DictConfig, run_dir: Path, results: Mapping[str, Any], figures: list[Path]) -> None:
    """Table 2 with intervals, per model/class values (summary), PRDC, diversity, gap closed, figures."""
    with stage_run(cfg, run_dir) as logger:
        if logger is not None:
            log_evaluation(logger, results, figures)

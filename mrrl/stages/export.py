"""``mrrl stage=export``: a synthetic cohort other tools can use, from any diffusion checkpoint.

Writes ``stage.n_per_class`` volumes per class into ``stage.out_dir`` (default ``<run_dir>/cohort``) in the
dataset's own layout (:mod:`mrrl.export.cohort`), so ``mrrl stage=check_data data=<same format>
data.root=<cohort>`` and every training stage accept it, with ``labels.csv`` and ``provenance.json``
(checkpoint + sha256, sampler settings, seed, version, geometry, intensity mapping, an extractor-free
quality summary). Every NIfTI carries the training data's preprocessed grid (:mod:`mrrl.export.geometry`)
and says in its header that it is synthetic. With ``stage.weights`` the model goes to ``<run_dir>/model``
as safetensors + JSON with a ``MODEL_CARD.md``.

The checkpoint: ``stage.ckpt``, else the ppo (``model=rl``) or diffusion (``model=standard``) manifest;
``auto`` takes the PPO one when that stage finished.

Resumable and sharded: cases come in blocks with their own seeds (the same cases whoever makes them);
under ``trainer=ddp`` rank ``r`` makes blocks ``r, r + W, ...``; files are written to temporary names and
renamed, so a rerun after an interruption makes only the missing cases; a finished export (manifest with
the same plan) is skipped; other settings into the same folder are refused unless ``stage.force=true``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import mrrl
from mrrl.diffusion.sampling import SAMPLERS
from mrrl.errors import ConfigError, ManifestError, MrrlError
from mrrl.evaluation.sources import GenerationSettings
from mrrl.export.cohort import (
    DESCRIP,
    PLAN_JSON,
    PROVENANCE_JSON,
    Block,
    case_files,
    is_written,
    plan_blocks,
    read_case,
    write_case,
    write_labels,
    write_oasis_labels,
)
from mrrl.export.geometry import INTENSITY_MODES, cohort_geometry, to_model_range, to_output_range
from mrrl.manifest import CHECKPOINT_KEYS, MANIFEST_NAME, is_complete, resolve_checkpoint, write_manifest
from mrrl.training.ranks import RankShard, generation_device, launch_ranks, process_rank
from mrrl.training.runtime import build_datamodule
from mrrl.training.trainer import release_process_group
from mrrl.utils.io import atomic_write_json, atomic_write_text, file_identity

COHORT_FORMAT = "mrrl.export.cohort/1"
MODELS = ("auto", "rl", "standard")


# ---------------------------------------------------------------------------------------------- inputs


def check_settings(stage: DictConfig) -> GenerationSettings:
    settings = GenerationSettings.from_config(stage)
    if settings.n_per_class < 1:
        raise ConfigError(f"stage.n_per_class must be >= 1, got {settings.n_per_class}")
    if settings.sampler not in SAMPLERS:
        raise ConfigError(f"stage.sampler must be one of {list(SAMPLERS)}, got {settings.sampler!r}")
    if settings.num_steps < 1:
        raise ConfigError(f"stage.num_steps must be >= 1, got {settings.num_steps}")
    if str(stage.intensity) not in INTENSITY_MODES:
        raise ConfigError(f"stage.intensity must be one of {list(INTENSITY_MODES)}, got {stage.intensity!r}")
    return settings


def choose_checkpoint(cfg: DictConfig) -> tuple[str, str]:
    """``(checkpoint path, row key)``: ``stage.ckpt`` (key ``checkpoint``) or the ppo / diffusion manifest."""
    stage = cfg.stage
    if stage.ckpt:
        path = Path(str(stage.ckpt)).expanduser()
        if not path.is_file():
            raise ConfigError(f"stage.ckpt: {path} does not exist (a diffusion or PPO checkpoint)")
        return str(path), "checkpoint"
    if str(stage.model) not in MODELS:
        raise ConfigError(f"stage.model must be one of {list(MODELS)}, got {stage.model!r}")
    keys = ["rl", "standard"] if stage.model == "auto" else [str(stage.model)]
    rows = {"rl": "ppo", "standard": "diffusion"}
    problems = []
    for key in keys:
        wanted = [k for k in CHECKPOINT_KEYS[rows[key]] if stage.use_ema or k != "ema_ckpt"]
        try:
            return resolve_checkpoint(None, cfg.paths.experiment_dir, rows[key], "stage.ckpt", wanted), key
        except ManifestError as exc:
            problems.append(str(exc))
    raise ManifestError("no checkpoint to export: " + "; ".join(problems) + " (or pass stage.ckpt=<path>)")


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _plain(obj: Any) -> Any:
    """JSON-safe copy (checkpoint hyper-parameters may hold tuples, Paths or OmegaConf nodes)."""
    if OmegaConf.is_config(obj):
        obj = OmegaConf.to_container(obj, resolve=True)
    return json.loads(json.dumps(obj, default=str))


class Models:
    """The denoiser and decoder an export samples with, and how it decodes."""

    def __init__(self, cfg: DictConfig, ckpt: str, class_names: list[str], device: torch.device):
        from mrrl.diffusion.loading import load_diffusion_with_vqgan
        from mrrl.utils.checkpoints import safe_load

        stage = cfg.stage
        # The VQGAN the checkpoint records; stage.vqgan_ckpt (else the vqgan manifest) only when it is gone.
        self.loaded, self.vqgan, self.vqgan_ckpt = load_diffusion_with_vqgan(
            ckpt,
            fallback_vqgan=lambda: resolve_checkpoint(
                stage.vqgan_ckpt, cfg.paths.experiment_dir, "vqgan", "stage.vqgan_ckpt"
            ),
            use_ema=bool(stage.use_ema),
            device=device,
        )
        if list(self.loaded.class_names) != list(class_names):
            raise ConfigError(
                f"{ckpt} was trained on classes {self.loaded.class_names}, the data have {class_names}"
            )
        self.vqgan_hparams = _plain(dict(safe_load(self.vqgan_ckpt).get("hyper_parameters", {})))
        quantize = stage.decode_quantize
        if quantize is None:
            quantize = (self.loaded.hparams.get("sampling") or {}).get("decode_quantize", True)
        self.quantize = bool(quantize)

    def sample(self, block: Block, settings: GenerationSettings, clamp: tuple[float, float]) -> torch.Tensor:
        """The block's volumes ``[n, C, D, H, W]``, all drawn from the block's seed."""
        from mrrl.diffusion.generate import generate_volumes

        return generate_volumes(
            self.loaded.denoiser,
            self.vqgan,
            self.loaded.scale_factor,
            [block.class_index] * len(block.cases),
            self.loaded.latent_shape,
            num_steps=settings.num_steps,
            sampler=settings.sampler,
            eta=settings.eta,
            batch_size=len(block.cases),
            generator=torch.Generator().manual_seed(block.seed),
            guidance_scale=settings.guidance_scale,
            quantize=self.quantize,
            clamp=clamp,
        )


# ---------------------------------------------------------------------------------------------- the plan


def _prepare_out_dir(out_dir: Path, run_dir: Path, plan: dict[str, Any], force: bool) -> str:
    """``done`` | ``resume`` | ``fresh`` for this plan in ``out_dir`` (rank 0 only; writes the plan file)."""
    plan_path = out_dir / PLAN_JSON
    if is_complete(run_dir) and not force:
        try:
            previous = json.loads((run_dir / MANIFEST_NAME).read_text())["outputs"].get("plan")
        except (OSError, ValueError, KeyError):
            previous = None
        if previous == plan and (out_dir / PROVENANCE_JSON).is_file():
            return "done"
    if plan_path.is_file():
        try:
            existing = json.loads(plan_path.read_text())
        except (OSError, ValueError):
            existing = None
        if existing == plan and not force:
            return "resume"
        if not force:
            differ = sorted(k for k in plan if (existing or {}).get(k) != plan[k])
            raise ConfigError(
                f"{out_dir} holds an export with other settings ({', '.join(differ)}): pass "
                "stage.force=true to replace it, or another stage.out_dir"
            )
        shutil.rmtree(out_dir)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"stage.out_dir {out_dir} is not empty and holds no mrrl export: choose another")
    (run_dir / MANIFEST_NAME).unlink(missing_ok=True)
    atomic_write_json(plan_path, plan)
    return "fresh"


def _agree_or_raise(shard: RankShard, compute) -> Any:
    """Rank 0's result on every rank; an error on rank 0 is raised on every rank (none waits forever)."""
    result, error = None, None
    if shard.is_zero:
        try:
            result = compute()
        except MrrlError as exc:
            error = (type(exc).__name__, str(exc))
    result, error = shard.agree((result, error))
    if error is not None:
        raise (ManifestError if error[0] == "ManifestError" else ConfigError)(error[1])
    return result


# ---------------------------------------------------------------------------------------------- stage


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:

    fabric = launch_ranks(cfg)
    shard = RankShard(fabric)
    if fabric is None and process_rank() != 0:
        print(f"export: rank {process_rank()} idle (trainer.devices=1: the export runs on rank 0)")
        return None
    run_dir = Path(run_dir)
    stage = cfg.stage
    settings = check_settings(stage)
    ckpt, row_key = choose_checkpoint(cfg)
    datamodule = build_datamodule(cfg).prepare()
    class_names = datamodule.class_names
    blocks = plan_blocks(
        datamodule.format, class_names, settings.n_per_class, settings.batch_size, settings.seed
    )
    out_dir = Path(str(stage.out_dir)) if stage.out_dir else run_dir / "cohort"
    model_range = tuple(float(v) for v in cfg.data.intensity_range)

    def make_plan() -> dict[str, Any]:
        geometry = cohort_geometry(datamodule, int(stage.geometry_subjects))
        return _plain(
            {
                "format": COHORT_FORMAT,
                "checkpoint": file_identity(ckpt),
                "sampling": {**settings.cache_key(), "batch_size": settings.batch_size},
                "layout": datamodule.format,
                "classes": class_names,
                "modalities": list(datamodule.modalities),
                "image_shape": list(datamodule.image_shape),
                "intensity": {"mode": str(stage.intensity), "model_range": list(model_range)},
                "geometry": geometry.summary(),
            }
        )

    plan = _agree_or_raise(shard, make_plan)
    state = _agree_or_raise(shard, lambda: _prepare_out_dir(out_dir, run_dir, plan, bool(stage.force)))
    if state == "done":
        print(f"export: already exported to {out_dir} (stage.force=true exports again)")
        return None

    device = generation_device(cfg, fabric)
    models = Models(cfg, ckpt, class_names, device)
    affine = np.asarray(plan["geometry"]["affine"], dtype=np.float64)
    source_range = np.asarray(plan["geometry"]["source_range"], dtype=np.float64)
    modalities = list(datamodule.modalities)
    t0, made, kept = time.monotonic(), [], 0
    for block in blocks[shard.rank :: shard.world]:
        todo = [c for c in block.cases if not is_written(datamodule.format, out_dir, c, modalities)]
        kept += len(block.cases) - len(todo)
        if not todo:
            continue
        volumes = models.sample(block, settings, model_range).numpy()
        for case in todo:
            written = to_output_range(
                volumes[case.seed_index], str(stage.intensity), model_range, source_range
            )
            write_case(datamodule.format, out_dir, case, written, affine, modalities)
            made.append(case.id)
    seconds = time.monotonic() - t0
    print(f"export: rank {shard.rank} wrote {len(made)} case(s) in {seconds:.1f} s ({kept} already there)")
    per_rank = [(made, seconds)]
    if shard.world > 1:
        per_rank = [None] * shard.world
        torch.distributed.all_gather_object(per_rank, (made, seconds))
    release_process_group()
    if not shard.is_zero:
        return None
    work = {"written_by_rank": [ids for ids, _ in per_rank], "seconds": max(t for _, t in per_rank)}
    return finish(cfg, run_dir, out_dir, plan, blocks, datamodule, models, ckpt, row_key, work, shard)


def quality_summary(volumes: list[np.ndarray], threshold: float) -> dict[str, Any]:
    """Mean ± std over volumes of the mean intensity, the intensity std and the foreground fraction."""
    stats = np.array([[v.mean(), v.std(), (v > threshold).mean()] for v in volumes], dtype=np.float64)
    names = ("mean_intensity", "std_intensity", "foreground_fraction")
    return {
        "n": len(volumes),
        **{
            n: [round(float(stats[:, i].mean()), 6), round(float(stats[:, i].std()), 6)]
            for i, n in enumerate(names)
        },
    }


def finish(cfg, run_dir, out_dir, plan, blocks, datamodule, models, ckpt, row_key, work, shard):
    """Rank 0: read every case back (shape check + quality), write labels, provenance, model, manifest."""
    stage = cfg.stage
    made, seconds = sum(len(ids) for ids in work["written_by_rank"]), work["seconds"]
    layout, modalities = datamodule.format, list(datamodule.modalities)
    cases = [c for b in blocks for c in b.cases]
    missing = [c.id for c in cases if not is_written(layout, out_dir, c, modalities)]
    if missing:
        raise ManifestError(
            f"export: {len(missing)} case(s) missing after every rank finished: {missing[:3]}"
        )
    rows, per_class = [], {c: [] for c in datamodule.class_names}
    intensity = {**plan["intensity"], "source_range": plan["geometry"]["source_range"]}
    for case in cases:
        files = case_files(layout, out_dir, case, modalities)
        row = {
            "case": case.id,
            "class": case.class_name,
            "seed": case.seed,
            "seed_index": case.seed_index,
            "files": ";".join(str(f.relative_to(out_dir)) for f in files),
        }
        volume = read_case(out_dir, row)
        if list(volume.shape) != list(datamodule.image_shape):
            raise ManifestError(
                f"export: {files[0]} has shape {list(volume.shape)}, expected {datamodule.image_shape}"
            )
        source = np.asarray(intensity["source_range"])
        per_class[case.class_name].append(
            to_model_range(volume, intensity["mode"], intensity["model_range"], source)
        )
        rows.append(row)
    labels = write_labels(out_dir, rows)
    if layout == "oasis":
        write_oasis_labels(out_dir, cases, float(cfg.data.cdr_threshold))
    threshold = float(stage.foreground_threshold)
    real = {c: [] for c in datamodule.class_names}
    for subject in datamodule.dataset("train").subjects:
        real[subject.label].append(datamodule.cache.load(subject.id))
    quality = {
        "space": "model intensity range",
        "foreground_threshold": threshold,
        "synthetic": {c: quality_summary(v, threshold) for c, v in per_class.items()},
        "real_train": {c: quality_summary(v, threshold) for c, v in real.items() if v},
    }
    settings = plan["sampling"]
    provenance = _plain(
        {
            "format": COHORT_FORMAT,
            "synthetic": True,
            "notice": DESCRIP,
            "model": row_key,
            "checkpoint": {
                "path": str(Path(ckpt).resolve()),
                "sha256": sha256(ckpt),
                "vqgan_path": str(Path(models.vqgan_ckpt).resolve()),
                "vqgan_sha256": sha256(models.vqgan_ckpt),
                "use_ema": settings["use_ema"],
            },
            "sampling": {**settings, "decode_quantize": models.quantize},
            "seed": settings["seed"],
            "mrrl_version": mrrl.__version__,
            "torch_version": torch.__version__,
            "dataset": {"name": datamodule.name, "root": str(datamodule.root.resolve()), "layout": layout},
            "classes": datamodule.class_names,
            "modalities": modalities,
            "image_shape": list(datamodule.image_shape),
            "n_per_class": settings["n_per_class"],
            "geometry": plan["geometry"],
            "intensity": intensity,
            "quality": quality,
            "ranks": shard.world,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    provenance_path = atomic_write_json(out_dir / PROVENANCE_JSON, provenance)
    outputs: dict[str, Any] = {
        "cohort": str(out_dir.resolve()),
        "labels_csv": str(labels.resolve()),
        "provenance": str(provenance_path.resolve()),
        "n_cases": len(cases),
        "made_this_run": made,
        "written_by_rank": work["written_by_rank"],
        "seconds": round(seconds, 3),
        "volumes_per_second": round(made / seconds, 4) if made and seconds > 0 else None,
        "plan": plan,
    }
    if stage.weights:
        outputs["model"] = write_model(cfg, run_dir / "model", models, provenance, datamodule, row_key)
    write_manifest(run_dir, "export", outputs, cfg)
    data = "brats2019" if layout == "brats" else "oasis1"
    print(f"export: {len(cases)} case(s) in {out_dir} ({made} made now); use it as a dataset with")
    print(f"  mrrl stage=check_data data={data} data.root={out_dir} data.modalities=[{','.join(modalities)}]")
    return outputs


def write_model(cfg, model_dir: Path, models: Models, provenance, datamodule, row_key) -> dict[str, str]:
    from mrrl.export.model_card import render_model_card
    from mrrl.export.weights import save_exported_model

    vqgan_config = {
        "net": models.vqgan_hparams["net"],
        "in_channels": int(models.vqgan_hparams["image_shape"][0]),
        "image_shape": models.vqgan_hparams["image_shape"],
    }
    loaded = models.loaded._replace(hparams=_plain(dict(models.loaded.hparams)))
    files = save_exported_model(model_dir, loaded, models.vqgan, vqgan_config, provenance["checkpoint"])
    card = render_model_card(Path(cfg.paths.experiment_dir), provenance, datamodule.summary(), row_key)
    files["model_card"] = str(atomic_write_text(model_dir / "MODEL_CARD.md", card).resolve())
    return files

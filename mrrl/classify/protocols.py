"""Which Table 3 / Table 4 protocols an experiment can run, and their synthetic training volumes.

The generators are found exactly as the evaluate stage finds its rows (:mod:`mrrl.evaluation.sources`:
``stage.generators.*`` overrides, else the ``diffusion`` / ``ppo`` manifests; ``stage.extra_generators``
entries are checkpoints or volume files). Volumes are sampled once per generator and cached in
``<run_dir>/synthetic/<model>/<class>.npy`` with a sidecar key (checkpoint identity + sampler settings),
so every seed, and every rerun with the same settings, reuses them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mrrl.errors import ConfigError
from mrrl.evaluation.sources import (
    GenerationSettings,
    ModelSpec,
    VolumeContext,
    discover_models,
    model_volumes,
    safe_name,
)
from mrrl.training.ranks import RankShard

log = logging.getLogger(__name__)

REAL = "real"
LABELS = {REAL: "Real data only", "standard": "Standard synthetic", "rl": "RL synthetic (ours)"}
DEFAULT_ORDER = (REAL, "standard", "rl")


@dataclass(frozen=True)
class Protocol:
    """One table row: ``generator`` is None for *real only*, else the model pre-training samples come from."""

    key: str
    label: str
    generator: ModelSpec | None = None

    def identity(self) -> dict[str, Any] | None:
        return None if self.generator is None else self.generator.identity()


def _sources_cfg(cfg: DictConfig) -> DictConfig:
    """The config shape :func:`discover_models` reads, from this stage's keys."""
    gens = cfg.stage.generators
    return OmegaConf.create(
        {
            "paths": {"experiment_dir": str(cfg.paths.experiment_dir)},
            "stage": {
                "vqgan_ckpt": gens.vqgan_ckpt,
                "diffusion_ckpt": gens.diffusion_ckpt,
                "rl_ckpt": gens.rl_ckpt,
                "ppo_checkpoint": cfg.stage.ppo_checkpoint,
                "use_ema": bool(cfg.stage.use_ema),
                "extra_models": cfg.stage.extra_generators or {},
            },
        }
    )


def discover_protocols(cfg: DictConfig) -> tuple[list[Protocol], dict[str, str], str | None]:
    """``(protocols to run, {protocol: why it is missing}, fallback VQGAN checkpoint or None)``.

    ``stage.protocols`` (null = all) selects rows; naming one that cannot exist is a ``ConfigError``.
    """
    for name, value in (cfg.stage.get("extra_generators") or {}).items():
        if safe_name(str(name)) in (*LABELS, "vqgan"):
            raise ConfigError(f"stage.extra_generators.{name}: the name is taken by a default protocol")
        paths = value.values() if OmegaConf.is_dict(value) else [value]
        absent = [str(p) for p in paths if not Path(str(p)).expanduser().exists()]
        if absent:
            raise ConfigError(f"stage.extra_generators.{name}: {', '.join(absent)} does not exist")
    specs, missing_rows = discover_models(_sources_cfg(cfg))
    vqgan = next((s.source for s in specs if s.key == "vqgan"), None)
    available = [Protocol(REAL, LABELS[REAL])]
    available += [Protocol(s.key, LABELS.get(s.key, s.label), s) for s in specs if s.key != "vqgan"]
    missing = {k: f"{LABELS[k]}: {why.split(': ', 1)[-1]}" for k, why in missing_rows.items() if k in LABELS}
    wanted = cfg.stage.get("protocols")
    if wanted is None:
        return available, missing, vqgan
    wanted = [str(w) for w in wanted]
    known = {p.key for p in available} | set(missing)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ConfigError(
            f"stage.protocols names {unknown}; known: {sorted(known)} (extras come from stage.extra_generators)"
        )
    chosen = [p for p in available if p.key in wanted]
    return chosen, {k: v for k, v in missing.items() if k in wanted}, vqgan


def generation_settings(stage: DictConfig) -> GenerationSettings:
    return GenerationSettings(
        n_per_class=int(stage.n_synthetic_per_class),
        sampler=None if stage.sampler is None else str(stage.sampler),  # None: the checkpoint's own
        num_steps=None if stage.num_steps is None else int(stage.num_steps),
        eta=None if stage.eta is None else float(stage.eta),
        guidance_scale=float(stage.guidance_scale),
        batch_size=int(stage.sample_batch_size),
        seed=int(stage.sample_seed),
        use_ema=bool(stage.use_ema),
        decode_quantize=None if stage.decode_quantize is None else bool(stage.decode_quantize),
    )


class SyntheticVolumes:
    """Each generator's training volumes per class, sampled (or loaded from the disk cache) on request."""

    def __init__(
        self,
        class_names: list[str],
        image_shape: tuple[int, ...],
        settings: GenerationSettings,
        cache_dir: Path,
        device: torch.device | str = "cpu",
        vqgan_ckpt: str | None = None,
        regenerate: bool = False,
        shard: RankShard | None = None,
    ):
        self.settings = settings
        self.ctx = VolumeContext(
            class_names=list(class_names),
            real={},
            real_ids={},
            image_shape=tuple(image_shape),
            settings=settings,
            samples_dir=Path(cache_dir),
            device=device,
            regenerate=regenerate,
            vqgan_ckpt=vqgan_ckpt,
            shard=shard or RankShard(),
        )
        self.regenerate = regenerate
        self._regenerated: set[str] = set()

    def get(self, spec: ModelSpec) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``({class: [n, C, D, H, W]}, info)``; ``regenerate`` resamples a generator once, not per call."""
        self.ctx.regenerate = self.regenerate and spec.key not in self._regenerated
        produced = model_volumes(spec, self.ctx)
        self._regenerated.add(spec.key)
        n = self.settings.n_per_class
        volumes = {}
        for c, v in produced.volumes.items():
            if len(v) < n:
                log.warning(
                    "%s has %d %s volume(s), fewer than n_synthetic_per_class=%d", spec.label, len(v), c, n
                )
            volumes[c] = v[:n]
        info = {
            "n_per_class": {c: len(v) for c, v in volumes.items()},
            "reused": produced.reused,
            "seconds": round(produced.seconds, 3),
            "cache_dir": str((self.ctx.samples_dir / spec.key).resolve())
            if spec.kind == "diffusion"
            else None,
        }
        return volumes, info

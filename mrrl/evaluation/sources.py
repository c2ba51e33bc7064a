"""The rows of Table 2 and their volumes.

Rows come from the experiment's stage manifests (or checkpoint paths given on the command line):

- ``vqgan``: the real test set reconstructed by the VQGAN (``encode`` → ``decode``), the limit no latent
  diffusion model with this VQGAN can beat;
- ``standard`` / ``rl``: ``n_per_class`` volumes per class sampled from the diffusion / PPO checkpoint;
- extra models (``stage.extra_models={name: source}``): a diffusion checkpoint, a folder of
  ``<class>.npy`` files, an ``.npz`` with one array per class, or a mapping ``{class: file.npy}``.

Generated (and reconstructed) volumes are cached as ``<samples_dir>/<model>/<class>.npy`` with a JSON
sidecar holding everything that decides them (checkpoint identity, sampler settings, seed, count); a
rerun with the same settings loads them instead of sampling again. The sidecar is deleted before the
array is replaced and written after it, so a crash in between can never pair new settings with old
volumes.

Under DDP (``VolumeContext.shard``) every rank samples or reconstructs an interleaved share of each class
(:mod:`mrrl.training.ranks`); the shares are gathered on every rank and rank 0 alone writes the cache. With a
deterministic sampler the volumes are the ones a single process makes; stochastic steps draw their noise
from a per-rank stream, so the world size is then part of the cache key.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mrrl.errors import ConfigError, ManifestError
from mrrl.manifest import CHECKPOINT_KEYS, resolve_checkpoint
from mrrl.training.ranks import RankShard
from mrrl.utils.io import atomic_save_npy, atomic_write_json, file_identity, json_normalise

log = logging.getLogger(__name__)

ROW_LABELS = {"vqgan": "3D-VQGAN reconstruction", "standard": "Standard diffusion", "rl": "RL fine-tuned"}


@dataclass(frozen=True)
class DefaultRow:
    key: str
    stage: str  # the stage whose manifest names the checkpoint (its CHECKPOINT_KEYS, tried in order)
    override: str  # stage config key that replaces the manifest lookup
    kind: str


DEFAULT_ROWS = (
    DefaultRow("vqgan", "vqgan", "vqgan_ckpt", "reconstruction"),
    DefaultRow("standard", "diffusion", "diffusion_ckpt", "diffusion"),
    DefaultRow("rl", "ppo", "rl_ckpt", "diffusion"),
)
# stage.ppo_checkpoint: which policy of the ppo manifest is the RL row (best = best on PPO's validation probe)
PPO_CHECKPOINT_KEYS = {"final": ("final_ckpt", "last_ckpt"), "best": ("best_ckpt",)}


@dataclass(frozen=True)
class ModelSpec:
    """One row: ``kind`` is ``reconstruction`` (VQGAN checkpoint), ``diffusion`` (diffusion/PPO checkpoint)
    or ``volumes`` (``source`` is a folder of ``<class>.npy`` or an ``.npz``; ``class_files`` a mapping)."""

    key: str
    label: str
    kind: str
    source: str
    class_files: tuple[tuple[str, str], ...] = ()

    def identity(self) -> dict[str, Any]:
        """What the row's volumes depend on: the kind and the size/mtime of every input file."""
        files = [p for _, p in self.class_files] or [self.source]
        return {"kind": self.kind, "files": [file_identity(p) for p in files]}


@dataclass(frozen=True)
class GenerationSettings:
    """How diffusion rows are sampled (everything here is part of the sample-cache key)."""

    n_per_class: int = 30
    sampler: str | None = "ddim"  # None (sampler, num_steps, eta): the checkpoint's own, see for_checkpoint
    num_steps: int | None = 100
    eta: float | None = 0.0
    guidance_scale: float = 1.0
    batch_size: int = 8
    seed: int = 0
    use_ema: bool = True
    decode_quantize: bool | None = None  # None: the checkpoint's own sampling setting

    @classmethod
    def from_config(cls, stage: DictConfig) -> GenerationSettings:
        return cls(
            n_per_class=int(stage.n_per_class),
            sampler=None if stage.sampler is None else str(stage.sampler),
            num_steps=None if stage.num_steps is None else int(stage.num_steps),
            eta=None if stage.eta is None else float(stage.eta),
            guidance_scale=float(stage.guidance_scale),
            batch_size=int(stage.sample_batch_size),
            seed=int(stage.seed),
            use_ema=bool(stage.use_ema),
            decode_quantize=None if stage.decode_quantize is None else bool(stage.decode_quantize),
        )

    def for_checkpoint(self, ckpt: str | Path) -> GenerationSettings:
        """These settings with every None sampler field taken from the checkpoint's recorded ``sampling``
        (a diffusion checkpoint: its inference sampler; a PPO checkpoint: the rollout sampler it was trained on)."""
        unset = [k for k in ("sampler", "num_steps", "eta") if getattr(self, k) is None]
        if not unset:
            return self
        from mrrl.utils.checkpoints import safe_load

        sampling = (safe_load(ckpt, mmap=True).get("hyper_parameters") or {}).get("sampling") or {}
        absent = [k for k in unset if sampling.get(k) is None]
        if absent:
            raise ConfigError(
                f"{ckpt} records no sampling {', '.join(absent)}: set stage.{' stage.'.join(absent)} explicitly"
            )
        types = {"sampler": str, "num_steps": int, "eta": float}
        return replace(self, **{k: types[k](sampling[k]) for k in unset})

    @property
    def stochastic(self) -> bool:
        if self.sampler is None or self.eta is None:
            raise ValueError("resolve the sampler with GenerationSettings.for_checkpoint first")
        return self.sampler == "ddpm" or self.eta > 0

    def cache_key(self) -> dict[str, Any]:
        key = asdict(self)
        # The initial noise is drawn for the whole class at once, so deterministic sampling (DDIM, eta 0)
        # gives the same volumes whatever the batch; stochastic steps draw their noise batch by batch.
        if None not in (self.sampler, self.eta) and not self.stochastic:
            key.pop("batch_size")
        return key


@dataclass
class VolumeContext:
    """Everything :func:`model_volumes` needs besides the row itself."""

    class_names: list[str]
    real: Mapping[str, torch.Tensor]  # real test volumes per class, [N, C, D, H, W] on the CPU
    real_ids: Mapping[str, Sequence[str]]
    image_shape: tuple[int, ...]
    settings: GenerationSettings
    samples_dir: Path
    device: torch.device | str = "cpu"
    regenerate: bool = False
    vqgan_ckpt: str | None = None  # the experiment's VQGAN: decodes samples of checkpoints that name none
    reconstruction_batch_size: int = 2
    shard: RankShard = field(default_factory=RankShard)  # this process among the DDP ranks (one by default)


@dataclass
class VolumeSet:
    volumes: dict[str, torch.Tensor]
    reused: dict[str, bool] = field(default_factory=dict)  # class -> loaded from the sample cache
    seconds: float = 0.0
    generation: dict[str, Any] | None = None  # diffusion rows: the sampler settings this row was made with


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "model"


# ---------------------------------------------------------------------------------------------- discovery


def _user_path(value: Any, what: str) -> Path:
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    return path


def _extra_spec(name: str, value: Any) -> ModelSpec:
    key = safe_name(name)
    if key in ROW_LABELS:
        raise ConfigError(f"stage.extra_models.{name}: the name is taken by a default row; pick another")
    what = f"stage.extra_models.{name}"
    if isinstance(value, Mapping) or OmegaConf.is_dict(value):
        files = tuple((str(c), str(_user_path(p, f"{what}.{c}"))) for c, p in dict(value).items())
        return ModelSpec(key, str(name), "volumes", "", files)
    path = _user_path(value, what)
    if path.is_dir() or path.suffix == ".npz":
        return ModelSpec(key, str(name), "volumes", str(path))
    return ModelSpec(key, str(name), "diffusion", str(path))


def ppo_checkpoint(cfg: DictConfig) -> str:
    choice = str(cfg.stage.ppo_checkpoint)
    if choice not in PPO_CHECKPOINT_KEYS:
        raise ConfigError(
            f"stage.ppo_checkpoint must be one of {sorted(PPO_CHECKPOINT_KEYS)}, got {choice!r}"
        )
    return choice


def discover_models(cfg: DictConfig) -> tuple[list[ModelSpec], dict[str, str]]:
    """The rows this experiment can fill, and ``{row: why it is missing}`` for the default rows it cannot.

    A checkpoint given on the command line (``stage.vqgan_ckpt`` / ``diffusion_ckpt`` / ``rl_ckpt``)
    replaces the manifest lookup and must exist.
    """
    specs: list[ModelSpec] = []
    missing: dict[str, str] = {}
    use_ema = bool(cfg.stage.use_ema)
    for row in DEFAULT_ROWS:
        override = cfg.stage[row.override]
        ckpt_keys = (
            PPO_CHECKPOINT_KEYS[ppo_checkpoint(cfg)] if row.key == "rl" else CHECKPOINT_KEYS[row.stage]
        )
        keys = [k for k in ckpt_keys if use_ema or k != "ema_ckpt"]  # ema.pt holds only EMA weights
        option = f"stage.{row.override}"
        try:
            ckpt = resolve_checkpoint(override, cfg.paths.experiment_dir, row.stage, option, keys)
        except ManifestError as exc:
            if override:  # a path the user gave is an error, not a missing row
                raise
            missing[row.key] = f"{ROW_LABELS[row.key]}: {exc}"
            continue
        specs.append(ModelSpec(row.key, ROW_LABELS[row.key], row.kind, ckpt))
    for name, value in (cfg.stage.extra_models or {}).items():
        specs.append(_extra_spec(str(name), value))
    return specs, missing


# ---------------------------------------------------------------------------------------------- volume cache


def cached_volumes(
    path: Path,
    key: Mapping[str, Any],
    compute: Callable[[], torch.Tensor],
    regenerate: bool = False,
    shard: RankShard | None = None,
) -> tuple[torch.Tensor, bool]:
    """``(volumes, reused)``: the cached ``path`` if its sidecar matches ``key``; else computed and saved.

    Under DDP, rank 0's verdict on the cache holds for every rank (they compute together or not at all),
    ``compute`` returns the gathered volumes on every rank, and only rank 0 writes.
    """
    shard = shard or RankShard()
    sidecar = path.with_suffix(".json")
    key = json_normalise(dict(key))
    hit = False
    if shard.is_zero and not regenerate and path.is_file() and sidecar.is_file():
        try:
            hit = json.loads(sidecar.read_text()) == key
        except (OSError, ValueError):
            hit = False  # unreadable: regenerate
    if shard.agree(hit):
        return torch.from_numpy(np.load(path)), True
    volumes = compute().detach().float().cpu().contiguous()
    if shard.is_zero:
        sidecar.unlink(missing_ok=True)
        atomic_save_npy(path, volumes.numpy())
        atomic_write_json(sidecar, key)
    return volumes, False


# ---------------------------------------------------------------------------------------------- volumes


def model_volumes(spec: ModelSpec, ctx: VolumeContext) -> VolumeSet:
    """The row's volumes per class (``[N, C, D, H, W]`` float32 on the CPU)."""
    start = time.monotonic()
    if spec.kind == "volumes":
        result = VolumeSet(load_volume_files(spec, ctx.class_names, ctx.image_shape))
    elif spec.kind == "reconstruction":
        result = _reconstructions(spec, ctx)
    elif spec.kind == "diffusion":
        result = _samples(spec, ctx)
    else:
        raise ValueError(f"unknown model kind {spec.kind!r}")
    result.seconds = time.monotonic() - start
    return result


def _as_volumes(array: np.ndarray, image_shape: Sequence[int], where: str) -> torch.Tensor:
    volumes = torch.from_numpy(np.asarray(array, dtype=np.float32))
    if volumes.ndim == 4 and image_shape[0] == 1:
        volumes = volumes[:, None]
    if volumes.ndim != 5 or tuple(volumes.shape[1:]) != tuple(image_shape):
        raise ConfigError(
            f"{where}: expected volumes [N, {', '.join(map(str, image_shape))}] (the preprocessed data), "
            f"got {list(array.shape)}"
        )
    if not torch.isfinite(volumes).all():
        raise ConfigError(f"{where}: volumes contain NaN or Inf")
    return volumes


def load_volume_files(spec: ModelSpec, class_names: Sequence[str], image_shape: Sequence[int]) -> dict:
    """Volumes of a ``volumes`` row: ``<dir>/<class>.npy``, an ``.npz`` keyed by class, or a mapping."""
    if spec.class_files:
        files = dict(spec.class_files)
        absent = [c for c in class_names if c not in files]
        if absent:
            raise ConfigError(f"extra model {spec.label!r} has no volumes for class(es) {absent}")
        return {c: _as_volumes(np.load(files[c]), image_shape, files[c]) for c in class_names}
    source = Path(spec.source)
    if source.suffix == ".npz":
        with np.load(source) as data:
            absent = [c for c in class_names if c not in data.files]
            if absent:
                raise ConfigError(f"{source} has no array for class(es) {absent} (found {data.files})")
            return {c: _as_volumes(data[c], image_shape, f"{source}[{c}]") for c in class_names}
    from mrrl.export.cohort import is_cohort, load_cohort_volumes

    if is_cohort(source):  # a `mrrl stage=export` cohort: its NIfTI files, back in the model range
        volumes = load_cohort_volumes(source, class_names)
        return {c: _as_volumes(volumes[c], image_shape, f"{source} ({c})") for c in class_names}
    out = {}
    for c in class_names:
        path = source / f"{c}.npy"
        if not path.is_file():
            raise ConfigError(
                f"extra model {spec.label!r}: {path} does not exist (one <class>.npy per class)"
            )
        out[c] = _as_volumes(np.load(path), image_shape, str(path))
    return out


def _reconstructions(spec: ModelSpec, ctx: VolumeContext) -> VolumeSet:
    from mrrl.vqgan.loading import load_vqgan

    net = None
    result = VolumeSet({})
    for c in ctx.class_names:
        key = {"model": spec.identity(), "class": c, "subjects": list(ctx.real_ids[c])}

        def compute(c: str = c) -> torch.Tensor:
            nonlocal net
            net = net if net is not None else load_vqgan(spec.source, ctx.device)
            real, n = ctx.real[c], len(ctx.real[c])
            share = real[ctx.shard.indices(n)]
            made = reconstruct(net, share, ctx.reconstruction_batch_size, ctx.device) if len(share) else share
            return ctx.shard.gather(made, n)

        path = ctx.samples_dir / spec.key / f"{safe_name(c)}.npy"
        result.volumes[c], result.reused[c] = cached_volumes(path, key, compute, ctx.regenerate, ctx.shard)
    return result


@torch.no_grad()
def reconstruct(vqgan, volumes: torch.Tensor, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """``decode(encode(x))`` in batches, clamped to the data range [-1, 1]."""
    out = [vqgan.reconstruct(b.to(device)).float().clamp(-1, 1).cpu() for b in volumes.split(batch_size)]
    return torch.cat(out)


def _samples(spec: ModelSpec, ctx: VolumeContext) -> VolumeSet:
    settings = ctx.settings.for_checkpoint(spec.source)  # null sampler keys: this checkpoint's own sampler
    generator_fn = None
    result = VolumeSet({})
    world = ctx.shard.world
    for index, c in enumerate(ctx.class_names):
        key = {"model": spec.identity(), "class": c, "class_index": index, **settings.cache_key()}
        if settings.stochastic and world > 1:
            key["ranks"] = world  # per-rank step noise: another world size is another sample set

        def compute(index: int = index) -> torch.Tensor:
            nonlocal generator_fn
            if generator_fn is None:
                generator_fn = load_sampler(spec.source, ctx, settings)
            # One CPU generator per class, seeded from (seed, class): adding classes or changing the batch
            # size leaves every other sample unchanged, and the standard and RL rows start from the same
            # noise, so their difference is the fine-tuning's alone. Under DDP every rank draws the
            # whole class's initial noise and samples its share of it.
            seed = settings.seed * 1_000_003 + index
            gen = torch.Generator().manual_seed(seed)
            steps = torch.Generator().manual_seed(seed * 7919 + ctx.shard.rank) if world > 1 else None
            n, share = settings.n_per_class, ctx.shard.indices(settings.n_per_class)
            made = generator_fn(index, n, gen, share, steps) if share else torch.empty(0)
            return ctx.shard.gather(made.float().clamp(-1, 1), n)

        path = ctx.samples_dir / spec.key / f"{safe_name(c)}.npy"
        result.volumes[c], result.reused[c] = cached_volumes(path, key, compute, ctx.regenerate, ctx.shard)
        result.generation = settings.cache_key()
        if tuple(result.volumes[c].shape[1:]) != tuple(ctx.image_shape):
            raise ConfigError(
                f"{spec.label} ({spec.source}) generates volumes of shape "
                f"{list(result.volumes[c].shape[1:])}, but the test data are {list(ctx.image_shape)}: "
                "evaluate with the data settings it was trained on"
            )
    return result


def load_sampler(
    ckpt: str, ctx: VolumeContext, settings: GenerationSettings | None = None
) -> Callable[..., torch.Tensor]:
    """``fn(class_index, n, generator, indices=None, step_generator=None) -> decoded volumes`` for a
    diffusion (or PPO) checkpoint (``indices``: the items of the n to make, see ``generate_volumes``).

    Samples are decoded by the VQGAN the checkpoint names (its latents are that VQGAN's); only when that
    file is gone is the experiment's VQGAN used, with a warning.
    """
    from mrrl.diffusion.generate import generate_volumes
    from mrrl.diffusion.loading import load_diffusion_with_vqgan

    settings = (settings or ctx.settings).for_checkpoint(ckpt)
    loaded, vqgan, _ = load_diffusion_with_vqgan(
        ckpt, fallback_vqgan=ctx.vqgan_ckpt, use_ema=settings.use_ema, device=ctx.device
    )
    if list(loaded.class_names) != list(ctx.class_names):
        raise ConfigError(
            f"{ckpt} was trained on classes {loaded.class_names}, the test data have {list(ctx.class_names)}"
        )
    quantize = settings.decode_quantize
    if quantize is None:
        quantize = bool((loaded.hparams.get("sampling") or {}).get("decode_quantize", True))

    def generate(
        index: int,
        n: int,
        generator: torch.Generator,
        indices: Sequence[int] | None = None,
        step_generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return generate_volumes(
            loaded.denoiser,
            vqgan,
            loaded.scale_factor,
            torch.full((n,), index, dtype=torch.long),
            loaded.latent_shape,
            num_steps=settings.num_steps,
            sampler=settings.sampler,
            eta=settings.eta,
            batch_size=settings.batch_size,
            generator=generator,
            guidance_scale=settings.guidance_scale,
            quantize=quantize,
            indices=indices,
            step_generator=step_generator,
        )

    return generate

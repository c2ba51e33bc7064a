"""Scores of one Table 2 row against the real test set: FID, precision/recall/density/coverage, diversity.

Real features are extracted once per (dataset, preprocessing, split, class, subjects, extractor identity,
image size): their statistics go through :class:`~mrrl.metrics.RealStatsCache` and the feature rows
themselves (which precision/recall/density/coverage need) are stored beside them as ``.features.npy``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mrrl.errors import ConfigError
from mrrl.metrics.diversity import ms_ssim_diversity
from mrrl.metrics.extractors import VolumeFeatureExtractor, build_extractor
from mrrl.metrics.features import extract_features
from mrrl.metrics.precision_recall import prdc
from mrrl.metrics.statistics import FeatureStatistics
from mrrl.metrics.stats_cache import RealStatsCache
from mrrl.utils.io import atomic_save_npy

ALL = "All"


def build_extractors(
    names: Sequence[str], options: Mapping[str, Mapping[str, Any]], image_shape: Sequence[int]
) -> list[VolumeFeatureExtractor]:
    """The configured extractors, ``in_channels`` set from the data unless given, sizes checked up front."""
    extractors = []
    for name in names:
        opts = dict(options.get(name) or {})
        opts.setdefault("in_channels", int(image_shape[0]))
        try:
            extractor = build_extractor(str(name), **opts)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise ConfigError(f"stage.metrics: cannot build extractor {name!r}: {exc}") from exc
        if min(image_shape[1:]) < extractor.min_size:
            raise ConfigError(
                f"extractor {name!r} needs volumes of at least {extractor.min_size}³, the data are "
                f"{list(image_shape[1:])}: raise data.image_size or choose another extractor"
            )
        extractors.append(extractor)
    if not extractors:
        raise ConfigError("stage.metrics.extractors is empty: name at least one (e.g. [random3d])")
    return extractors


def compute_real_features(
    extractor: VolumeFeatureExtractor, volumes: Tensor, batch_size: int, device: Any
) -> Tensor:
    """Feature rows of real volumes (a module-level function so tests can count the cache misses)."""
    (features,) = extract_features([extractor], volumes, batch_size, device)
    return features


class RealFeatureCache:
    """Real-set statistics (``RealStatsCache``) plus their feature rows, computed once per key.

    ``write=False`` (non-zero DDP ranks) reads the cache but never writes it.
    """

    def __init__(self, cache_dir: str | Path, write: bool = True) -> None:
        self.stats_cache = RealStatsCache(cache_dir)
        self.write = write

    def features_path(self, key: Mapping[str, Any]) -> Path:
        stats_path = self.stats_cache.path_for(key)
        return stats_path.with_name(stats_path.stem + ".features.npy")

    def get(self, key: Mapping[str, Any], compute: Callable[[], Tensor]) -> tuple[FeatureStatistics, Tensor]:
        path = self.features_path(key)
        fresh: list[Tensor] = []

        def compute_stats() -> FeatureStatistics:
            features = compute()
            fresh.append(features)
            if self.write:
                atomic_save_npy(path, features.numpy())
            return FeatureStatistics.from_features(features)

        stats = self.stats_cache.get_or_compute(key, compute_stats, write=self.write)
        if fresh:
            return stats, fresh[0]
        features = _load_rows(path, stats.n)
        if features is None:  # statistics cached without their rows (e.g. by another tool): extract again
            features = compute()
            if self.write:
                atomic_save_npy(path, features.numpy())
        return stats, features


def _load_rows(path: Path, n: int) -> Tensor | None:
    try:
        rows = torch.from_numpy(np.load(path))
    except (OSError, ValueError):
        return None
    return rows if rows.ndim == 2 and rows.shape[0] == n else None


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def real_key(
    data: Mapping[str, Any], label: str, ids: Sequence[str], extractor: VolumeFeatureExtractor
) -> dict:
    """Cache key of one real set: dataset, preprocessing, split, class, subjects, extractor, size."""
    return {
        "dataset": data["dataset"],
        "preprocessing": data["preprocessing"],
        "split": data["split"],
        "class_": label,
        "subjects": _ids_digest(ids),
        "n": len(ids),
        "extractor": extractor.identity,
        "image_size": list(data["image_shape"]),
    }


@dataclass
class RealReference:
    """Per extractor name and class (``All`` included): the real statistics and feature rows."""

    stats: dict[str, dict[str, FeatureStatistics]]
    features: dict[str, dict[str, Tensor]]


def real_reference(
    extractors: Sequence[VolumeFeatureExtractor],
    real: Mapping[str, Tensor],
    real_ids: Mapping[str, Sequence[str]],
    data: Mapping[str, Any],
    cache: RealFeatureCache,
    batch_size: int,
    device: Any,
) -> RealReference:
    ref = RealReference({}, {})
    for extractor in extractors:
        stats, feats = {}, {}
        for c, volumes in real.items():
            key = real_key(data, c, real_ids[c], extractor)
            stats[c], feats[c] = cache.get(
                key, lambda v=volumes, e=extractor: compute_real_features(e, v, batch_size, device)
            )
        all_ids = [i for c in real for i in real_ids[c]]
        stats[ALL], feats[ALL] = cache.get(
            real_key(data, ALL, all_ids, extractor), lambda f=feats: torch.cat([f[c] for c in real])
        )
        ref.stats[extractor.name], ref.features[extractor.name] = stats, feats
    return ref


def _scores(real_stats: FeatureStatistics, real: Tensor, fake: Tensor, k: int, with_prdc: bool) -> dict:
    nan = math.nan
    out = {"fid": nan, "precision": nan, "recall": nan, "density": nan, "coverage": nan}
    if len(fake) < 2:
        warnings.warn(f"FID needs >= 2 generated feature rows, got {len(fake)}", stacklevel=3)
        return out
    out["fid"] = real_stats.frechet_distance(FeatureStatistics.from_features(fake))
    if with_prdc and min(len(real), len(fake)) > k:
        out.update(prdc(real, fake, k=k))
    return out


def model_features(
    volumes: Mapping[str, Tensor], extractors: Sequence[VolumeFeatureExtractor], batch_size: int, device: Any
) -> dict[str, dict[str, Tensor]]:
    """Feature rows ``{extractor name: {class: [N·rows_per_volume, D]}}`` of one row's volumes."""
    fake = {c: extract_features(extractors, v, batch_size, device) for c, v in volumes.items()}
    return {e.name: {c: fake[c][i] for c in volumes} for i, e in enumerate(extractors)}


def score_model(
    volumes: Mapping[str, Tensor],
    extractors: Sequence[VolumeFeatureExtractor],
    reference: RealReference,
    batch_size: int,
    k: int = 3,
    with_prdc: bool = True,
    device: Any = None,
    features: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> list[dict[str, Any]]:
    """Rows ``{extractor, extractor_identity, class, n_real, n_fake, fid, precision, recall, density,
    coverage}`` per extractor and class, plus ``All`` (every class pooled). ``features``: the volumes'
    :func:`model_features`, when already extracted."""
    fake = features or model_features(volumes, extractors, batch_size, device)
    rows = []
    for extractor in extractors:
        per_class = {c: fake[extractor.name][c] for c in volumes}
        per_class[ALL] = torch.cat(list(per_class.values()))
        for c, feats in per_class.items():
            real_feats = reference.features[extractor.name][c]
            row = {
                "extractor": extractor.name,
                "extractor_identity": extractor.identity,
                "class": c,
                "n_real": len(real_feats),
                "n_fake": len(feats),
            }
            row.update(_scores(reference.stats[extractor.name][c], real_feats, feats, k, with_prdc))
            rows.append(row)
    return rows


def diversity_by_class(
    volumes: Mapping[str, Tensor], max_pairs: int, seed: int, batch_size: int, device: Any = None
) -> dict[str, float]:
    """Mean MS-SSIM over random pairs per class and over all classes pooled (NaN below 2 volumes)."""
    sets = {**volumes, ALL: torch.cat(list(volumes.values()))}
    out = {}
    for c, v in sets.items():
        if len(v) < 2:
            out[c] = math.nan
            continue
        gen = torch.Generator().manual_seed(int(seed))
        v = v.to(device) if device is not None else v
        out[c] = ms_ssim_diversity(v, max_pairs=max_pairs, generator=gen, batch_size=batch_size)
    return out

"""Per-class and overall FID (+ precision/recall/density/coverage) for several extractors at once."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mrrl.metrics.extractors import VolumeFeatureExtractor
from mrrl.metrics.precision_recall import prdc
from mrrl.metrics.statistics import FeatureStatistics

VolumeSource = Tensor | Iterable[Tensor]


def _batches(volumes: VolumeSource, batch_size: int) -> Iterable[Tensor]:
    if isinstance(volumes, Tensor):
        yield from volumes.split(batch_size)
    else:
        yield from volumes


def extract_features(
    extractors: Sequence[VolumeFeatureExtractor],
    volumes: VolumeSource,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Features of ``volumes`` (a ``[N, C, D, H, W]`` tensor or an iterable of batches) for every
    extractor, reading each batch once; returned on the CPU in float32."""
    out: list[list[Tensor]] = [[] for _ in extractors]
    for batch in _batches(volumes, batch_size):
        if device is not None:
            batch = batch.to(device)
        for feats, extractor in zip(out, extractors):
            feats.append(extractor(batch).cpu())
    return [torch.cat(f) if f else torch.empty(0, e.feature_dim) for f, e in zip(out, extractors)]


def compute_statistics(
    extractor: VolumeFeatureExtractor, volumes: VolumeSource, batch_size: int = 8, device: Any = None
) -> FeatureStatistics:
    """Feature statistics of ``volumes``, tagged with the extractor identity (for the real-stats cache)."""
    (features,) = extract_features([extractor], volumes, batch_size, device)
    return FeatureStatistics.from_features(features, meta={"extractor": extractor.identity})


def _scores(real: Tensor, fake: Tensor, k: int, with_prdc: bool) -> dict[str, float]:
    nan = float("nan")
    scores = {"fid": nan, "precision": nan, "recall": nan, "density": nan, "coverage": nan}
    if min(len(real), len(fake)) < 2:
        warnings.warn(
            f"FID needs >= 2 feature rows per side, got {len(real)} real / {len(fake)} fake", stacklevel=3
        )
        return scores
    scores["fid"] = FeatureStatistics.from_features(real).frechet_distance(
        FeatureStatistics.from_features(fake)
    )
    if with_prdc and min(len(real), len(fake)) > k:
        scores.update(prdc(real, fake, k=k))
    return scores


def compute_fid_report(
    real_volumes_by_class: Mapping[str, VolumeSource],
    fake_volumes_by_class: Mapping[str, VolumeSource],
    extractors: Sequence[VolumeFeatureExtractor],
    batch_size: int = 8,
    k: int = 3,
    with_prdc: bool = True,
    device: torch.device | str | None = None,
    all_label: str = "All",
) -> list[dict[str, Any]]:
    """One row per (extractor, class) plus an ``all_label`` row pooling every class.

    Each row: ``extractor`` (name), ``extractor_identity``, ``class``, ``n_real``/``n_fake`` (feature
    rows: volumes for 3D extractors, slices for 2D ones), ``fid``, ``precision``, ``recall``,
    ``density``, ``coverage`` (NaN where a set is too small).
    """
    if set(real_volumes_by_class) != set(fake_volumes_by_class):
        raise ValueError(
            f"real and fake classes differ: {sorted(real_volumes_by_class)} vs {sorted(fake_volumes_by_class)}"
        )
    classes = list(real_volumes_by_class)
    real = {c: extract_features(extractors, real_volumes_by_class[c], batch_size, device) for c in classes}
    fake = {c: extract_features(extractors, fake_volumes_by_class[c], batch_size, device) for c in classes}
    rows = []
    for e, extractor in enumerate(extractors):
        groups = [(c, real[c][e], fake[c][e]) for c in classes]
        groups.append((all_label, torch.cat([g[1] for g in groups]), torch.cat([g[2] for g in groups])))
        for label, r, f in groups:
            row = {"extractor": extractor.name, "extractor_identity": extractor.identity, "class": label}
            row.update(n_real=len(r), n_fake=len(f), **_scores(r, f, k, with_prdc))
            rows.append(row)
    return rows

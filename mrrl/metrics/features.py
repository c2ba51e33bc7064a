"""Feature rows and feature statistics of volumes for one or several extractors (each batch read once)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from mrrl.metrics.extractors import VolumeFeatureExtractor
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

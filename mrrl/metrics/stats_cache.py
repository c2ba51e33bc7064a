"""On-disk cache of real-data feature statistics, so each (dataset, split, class, extractor, size)
is embedded once and reused by every later evaluation."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mrrl.metrics.extractors import VolumeFeatureExtractor
from mrrl.metrics.statistics import FeatureStatistics

CACHE_FORMAT = 1


def canonical_key(key: Mapping[str, Any]) -> str:
    """Sorted-keys JSON of ``key``; extractors are replaced by their ``identity``."""

    def norm(value: Any) -> Any:
        if isinstance(value, VolumeFeatureExtractor):
            return value.identity
        if isinstance(value, Mapping):
            return {str(k): norm(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        return value

    return json.dumps({"format": CACHE_FORMAT, **norm(dict(key))}, sort_keys=True, default=str)


class RealStatsCache:
    """``get_or_compute(key, compute_fn)`` returns cached statistics or computes, stores and returns them.

    The key (e.g. ``dict(dataset=..., split=..., class_=..., extractor=extractor.identity,
    image_size=...)``) is hashed into the file name and stored inside the file, so a stale or colliding
    file is recomputed rather than trusted. Files are written atomically (temp file + ``os.replace``):
    concurrent writers (e.g. every DDP rank) cannot leave a half-written file, and the last complete
    one wins; pass ``write=False`` on non-zero ranks to follow the "only rank 0 writes" rule.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)

    def path_for(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(canonical_key(key).encode()).hexdigest()[:20]
        return self.cache_dir / f"real-stats-{digest}.npz"

    def load(self, key: Mapping[str, Any]) -> FeatureStatistics | None:
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            stats = FeatureStatistics.load(path)
        except (OSError, ValueError, KeyError):
            return None  # unreadable: recompute and overwrite
        return stats if stats.meta.get("cache_key") == canonical_key(key) else None

    def get_or_compute(
        self, key: Mapping[str, Any], compute_fn: Callable[[], FeatureStatistics], write: bool = True
    ) -> FeatureStatistics:
        cached = self.load(key)
        if cached is not None:
            return cached
        stats = compute_fn()
        stats.meta = {**stats.meta, "cache_key": canonical_key(key)}
        if write:
            stats.save(self.path_for(key))
        return stats

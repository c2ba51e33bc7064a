"""FID between sets of volumes as a torchmetrics ``Metric`` (DDP-safe feature statistics).

torchmetrics' ``FrechetInceptionDistance`` is close but not reusable here: it counts images rather
than feature rows (wrong for slice-wise extractors, where a volume gives many rows), always expects
Inception-style 2D images, and takes tr sqrt(Σ1Σ2) from the complex eigenvalues of the non-symmetric
Σ1Σ2. MONAI's ``FIDMetric`` works on a single batch of features and uses ``scipy.linalg.sqrtm``.
This module keeps torchmetrics' state layout (float64 Σx, Σxxᵀ and counts, reduced by sum) and uses
the symmetric matrix square root from :mod:`mrrl.metrics.statistics`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from mrrl.metrics.extractors import VolumeFeatureExtractor, build_extractor
from mrrl.metrics.statistics import FeatureAccumulator, FeatureStatistics, frechet_distance

__all__ = ["VolumeFID", "FeatureStatistics", "FeatureAccumulator", "frechet_distance"]


class VolumeFID(Metric):
    """Fréchet distance between the feature distributions of real and generated volumes.

    ``update(volumes, real)`` embeds a batch ``[B, C, D, H, W]`` with ``extractor`` and adds its rows
    to float64 sums that DDP ranks combine by summation. ``set_real_statistics`` replaces the real
    side by cached statistics; they are not a metric state, so ranks never add them up. With
    ``reset_real_features=False`` the real sums survive ``reset()`` (evaluate many fake sets against
    one real set).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0

    def __init__(
        self,
        extractor: VolumeFeatureExtractor | str,
        real_statistics: FeatureStatistics | None = None,
        reset_real_features: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.extractor = build_extractor(extractor) if isinstance(extractor, str) else extractor
        self.reset_real_features = reset_real_features
        dim = self.extractor.feature_dim
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self._real_stats: FeatureStatistics | None = None
        if real_statistics is not None:
            self.set_real_statistics(real_statistics)

    def set_real_statistics(self, stats: FeatureStatistics | None) -> None:
        """Use precomputed real statistics (e.g. from :class:`RealStatsCache`); ``None`` goes back to
        real volumes. Statistics tagged with a different extractor identity are refused."""
        if stats is not None:
            if stats.dim != self.extractor.feature_dim:
                raise ValueError(
                    f"statistics have {stats.dim} features, the extractor {self.extractor.feature_dim}"
                )
            tagged = stats.meta.get("extractor")
            if tagged is not None and tagged != self.extractor.identity:
                raise ValueError(
                    f"cached real statistics were computed with extractor {tagged}, "
                    f"not {self.extractor.identity}; recompute them"
                )
        self._real_stats = stats

    def update(self, volumes: Tensor, real: bool) -> None:
        if real and self._real_stats is not None:
            raise RuntimeError(
                "real statistics were set with set_real_statistics(); do not also update with real volumes"
            )
        features = self.extractor(volumes.to(self.device)).to(torch.float64)
        side = "real" if real else "fake"
        getattr(self, f"{side}_sum").add_(features.sum(0))
        getattr(self, f"{side}_outer").add_(features.T @ features)
        getattr(self, f"{side}_n").add_(features.shape[0])

    def _side(self, side: str) -> FeatureStatistics:
        if side == "real" and self._real_stats is not None:
            return self._real_stats
        n = int(getattr(self, f"{side}_n"))
        if n < 2:
            raise RuntimeError(f"FID needs at least 2 {side} feature rows, got {n}")
        meta = {"extractor": self.extractor.identity}
        return FeatureStatistics.from_sums(
            n, getattr(self, f"{side}_sum"), getattr(self, f"{side}_outer"), meta
        )

    def compute(self) -> Tensor:
        real, fake = self._side("real"), self._side("fake")
        return torch.tensor(frechet_distance(real.mean, real.cov, fake.mean, fake.cov), dtype=torch.float64)

    def statistics(self, real: bool = True) -> FeatureStatistics:
        """Statistics of one side, gathered over DDP ranks (e.g. to fill the real-statistics cache)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=not self._is_synced):
            return self._side("real" if real else "fake")

    def reset(self) -> None:
        if self.reset_real_features:
            super().reset()
            return
        kept = {k: getattr(self, k).clone() for k in ("real_sum", "real_outer", "real_n")}
        super().reset()
        for k, v in kept.items():
            setattr(self, k, v)

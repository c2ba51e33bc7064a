"""Gaussian feature statistics and the Fréchet distance between them.

Everything here is float64 on the CPU: the matrices are at most a few thousand wide, and doing the
algebra in one place and one precision keeps FID values reproducible across devices.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _f64(x: ArrayLike) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _sym(m: Tensor) -> Tensor:
    return 0.5 * (m + m.T)


def _clean_eigvals(evals: Tensor) -> Tensor:
    """Zero eigenvalues that are round-off (below the usual rank tolerance ``n·eps·max|λ|``); their square
    roots (~1e-8 each) would otherwise add up to a visible error for rank-deficient covariances."""
    tol = evals.shape[-1] * torch.finfo(evals.dtype).eps * evals.abs().max().clamp_min(1e-300)
    return torch.where(evals > tol, evals, torch.zeros_like(evals))


def psd_sqrt(m: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (round-off eigenvalues set to 0)."""
    evals, evecs = torch.linalg.eigh(_sym(m))
    return (evecs * _clean_eigvals(evals).sqrt()) @ evecs.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """tr sqrt(Σ1 Σ2), computed from the symmetric PSD matrix sqrt(Σ1) Σ2 sqrt(Σ1).

    That matrix is similar to Σ1 Σ2, so it has the same (real, non-negative) eigenvalues, but a symmetric
    eigensolver gives them without the complex round-off that a general ``sqrtm`` produces when Σ1 Σ2 is
    singular (rank-deficient covariances, N < feature dim).
    """
    s1 = psd_sqrt(_f64(sigma1))
    inner = _sym(s1 @ _sym(_f64(sigma2)) @ s1)
    return float(_clean_eigvals(torch.linalg.eigvalsh(inner)).sqrt().sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance ‖μ1-μ2‖² + tr(Σ1 + Σ2 - 2·sqrt(Σ1 Σ2)) between two Gaussians, in float64.

    The result is a squared distance; round-off below zero (identical inputs) is returned as 0.
    """
    mu1, mu2, sigma1, sigma2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    dim = mu1.shape[-1]
    if mu1.shape != (dim,) or mu2.shape != (dim,):
        raise ValueError(
            f"means must be vectors of the same length, got {tuple(mu1.shape)} and {tuple(mu2.shape)}"
        )
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"covariances must be {dim}x{dim}, got {tuple(sigma1.shape)} and {tuple(sigma2.shape)}"
        )
    diff = mu1 - mu2
    value = (
        float(diff @ diff) + float(sigma1.trace() + sigma2.trace()) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    )
    return max(value, 0.0)


@dataclass
class FeatureAccumulator:
    """Streaming float64 sums (count, Σx, Σxxᵀ) of feature rows; merge by adding, as DDP ranks do.

    Covariance from these sums loses precision only when |mean| ≫ std by ~1e6, far from what
    network features look like, so no shifted/Welford form is needed.
    """

    dim: int
    n: int = 0
    total: Tensor = field(default=None)  # type: ignore[assignment]
    outer: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = torch.zeros(self.dim, dtype=torch.float64)
        if self.outer is None:
            self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, features: ArrayLike) -> FeatureAccumulator:
        x = _f64(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape [N, {self.dim}], got {tuple(x.shape)}")
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x
        return self

    def merge(self, other: FeatureAccumulator) -> FeatureAccumulator:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge feature dims {self.dim} and {other.dim}")
        return FeatureAccumulator(
            self.dim, self.n + other.n, self.total + other.total, self.outer + other.outer
        )

    def statistics(self, meta: dict[str, Any] | None = None) -> FeatureStatistics:
        return FeatureStatistics.from_sums(self.n, self.total, self.outer, meta=meta)


@dataclass
class FeatureStatistics:
    """Mean and (unbiased) covariance of N feature rows, float64 on the CPU.

    ``meta`` is free-form JSON-able metadata (extractor identity, dataset, ...). ``save`` writes
    ``mu``/``sigma``/``n`` into an ``.npz``, the layout pytorch-fid uses, so its stats files load too.
    """

    n: int
    mean: Tensor
    cov: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.n = int(self.n)
        self.mean, self.cov = _f64(self.mean), _f64(self.cov)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_sums(
        cls, n: int | Tensor, total: ArrayLike, outer: ArrayLike, meta: dict[str, Any] | None = None
    ) -> FeatureStatistics:
        n = int(n)
        if n < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {n}")
        total, outer = _f64(total), _f64(outer)
        mean = total / n
        cov = _sym((outer - n * torch.outer(mean, mean)) / (n - 1))
        return cls(n, mean, cov, dict(meta or {}))

    @classmethod
    def from_features(cls, features: ArrayLike, meta: dict[str, Any] | None = None) -> FeatureStatistics:
        x = _f64(features)
        return FeatureAccumulator(x.shape[1]).update(x).statistics(meta)

    def sums(self) -> tuple[int, Tensor, Tensor]:
        """(n, Σx, Σxxᵀ) that reproduce these statistics, for merging with streamed features."""
        return (
            self.n,
            self.n * self.mean,
            (self.n - 1) * self.cov + self.n * torch.outer(self.mean, self.mean),
        )

    def frechet_distance(self, other: FeatureStatistics) -> float:
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (an ``.npz``) atomically: a temp file in the same folder, then ``os.replace``."""
        arrays = {
            "mu": self.mean.numpy(),
            "sigma": self.cov.numpy(),
            "n": np.asarray(self.n, dtype=np.int64),
            "meta": np.asarray(json.dumps(self.meta, sort_keys=True, default=str)),
        }
        return atomic_write_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStatistics:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
            n = int(data["n"]) if "n" in data.files else 0
            return cls(n, data["mu"], data["sigma"], meta)


def atomic_write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Save ``arrays`` so that readers see either the old file or the complete new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

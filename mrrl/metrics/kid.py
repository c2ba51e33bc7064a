"""Kernel Inception Distance: the unbiased squared MMD with a cubic polynomial kernel (Bińkowski et al. 2018).

Unlike FID, the estimator is unbiased at every sample size, so it stays meaningful with the 30-odd volumes
per class of a medical test split. torchmetrics' ``KernelInceptionDistance`` owns an Inception network and
averages over random subsets; here the features come from mrrl's own extractors and the bootstrap
(:mod:`mrrl.metrics.intervals`) needs the kernel matrices themselves, so the few lines live here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _f64(x: Tensor | np.ndarray) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    """``k(x, y) = (x·y / d + coef) ** degree`` for every pair of rows (``d``: the feature dimension)."""
    x, y = _f64(x), _f64(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"features must be [N, D] with the same D, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return (x @ y.T / x.shape[1] + coef) ** degree


def mmd2_unbiased(k_xx: Tensor, k_yy: Tensor, k_xy: Tensor) -> float:
    """The unbiased MMD² from the three kernel matrices (diagonals of ``k_xx``/``k_yy`` left out)."""
    m, n = k_xx.shape[0], k_yy.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 rows on each side, got {m} and {n}")
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2.0 * k_xy.mean())


def kid(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """KID between two sets of feature rows ``[N, D]`` (may be slightly negative: it is unbiased)."""
    real, fake = _f64(real), _f64(fake)
    return mmd2_unbiased(
        polynomial_kernel(real, real, degree, coef),
        polynomial_kernel(fake, fake, degree, coef),
        polynomial_kernel(real, fake, degree, coef),
    )

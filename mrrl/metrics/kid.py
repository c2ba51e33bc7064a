"""Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel.

``k(x, y) = (x·y / d + 1)³`` on feature rows of dimension ``d``; the estimator averages the within-set
kernels without their diagonals (unbiased, may be slightly negative) and allows sets of different sizes
(torchmetrics' ``poly_mmd`` assumes equal sizes). Unlike FID it is unbiased at small n, which is why the
PPO probe and small evaluations report it beside FID.
"""

from __future__ import annotations

import torch
from torch import Tensor


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    """``(x yᵀ / d + coef)^degree`` for rows of ``x [m, d]`` and ``y [n, d]``, in float64."""
    x, y = x.double(), y.double()
    return (x @ y.T / x.shape[1] + coef) ** degree


def kernel_inception_distance(real: Tensor, fake: Tensor, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD² between feature rows ``real [m, d]`` and ``fake [n, d]`` (m, n ≥ 2)."""
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"KID needs feature rows [m, d] and [n, d], got {list(real.shape)} and {list(fake.shape)}"
        )
    m, n = real.shape[0], fake.shape[0]
    if min(m, n) < 2:
        raise ValueError(f"KID needs at least 2 feature rows per side, got {m} real and {n} generated")
    k_xx = polynomial_kernel(real, real, degree, coef)
    k_yy = polynomial_kernel(fake, fake, degree, coef)
    k_xy = polynomial_kernel(real, fake, degree, coef)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * k_xy.mean())

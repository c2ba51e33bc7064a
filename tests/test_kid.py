"""KID: the unbiased cubic-kernel MMD² against a direct double loop over the pairs."""

from __future__ import annotations

import itertools

import pytest
import torch

from mrrl.metrics.kid import kernel_inception_distance, polynomial_kernel


def _kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return polynomial_kernel(a, b).mean()


def direct_kid(x: torch.Tensor, y: torch.Tensor) -> float:
    d = x.shape[1]

    def k(a, b):
        return (float(a.double() @ b.double()) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_the_double_loop_and_is_unbiased_near_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(7, 5, generator=gen), torch.randn(4, 5, generator=gen) + 0.5
    assert kernel_inception_distance(real, fake) == pytest.approx(direct_kid(real, fake), rel=1e-10)
    assert kernel_inception_distance(real, fake) > 0.1
    # Same distribution: the unbiased estimate averages to 0 within its standard error; the biased
    # V-statistic (diagonals included) stays clearly positive.
    pairs = [(torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)) for _ in range(300)]
    same = torch.tensor([kernel_inception_distance(a, b) for a, b in pairs])
    biased = torch.tensor(
        [float(_kernel_mean(a, a) + _kernel_mean(b, b) - 2 * _kernel_mean(a, b)) for a, b in pairs]
    )
    se = float(same.std() / len(same) ** 0.5)
    assert abs(float(same.mean())) < 4 * se < float(biased.mean())
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(real[:1], fake)
    with pytest.raises(ValueError, match=r"\[m, d\]"):
        kernel_inception_distance(real, fake[:, :3])

"""KID, the fast exact FID, bootstrap intervals and the split-half floor (mrrl.metrics.kid / intervals)."""

from __future__ import annotations

import math

import pytest
import torch

from mrrl.metrics.intervals import (
    VERDICT_BETTER,
    VERDICT_NONE,
    bootstrap_scores,
    fid_from_rows,
    gap_share,
    split_half_floor,
    verdict,
)
from mrrl.metrics.kid import kid
from mrrl.metrics.statistics import FeatureStatistics


def _kid_reference(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD² with k(a, b) = (a·b/d + 1)³, written as the O(n²) double loops of the paper."""
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_direct_double_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(7, 5, generator=gen, dtype=torch.float64) + 0.5
    assert kid(x, y) == pytest.approx(_kid_reference(x, y), rel=1e-10)


def test_kid_is_unbiased_for_one_gaussian():
    """Mean over many small draws from one distribution ≈ 0 (a biased estimator would stay positive)."""
    gen = torch.Generator().manual_seed(1)
    values = [kid(torch.randn(10, 4, generator=gen), torch.randn(10, 4, generator=gen)) for _ in range(400)]
    mean = sum(values) / len(values)
    sem = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5
    assert abs(mean) < 3 * sem
    shifted = [
        kid(torch.randn(10, 4, generator=gen), torch.randn(10, 4, generator=gen) + 1) for _ in range(50)
    ]
    assert sum(shifted) / len(shifted) > 10 * sem


def test_fid_from_rows_equals_gaussian_frechet_distance():
    gen = torch.Generator().manual_seed(2)
    for n, m, d in ((12, 20, 64), (40, 30, 8)):  # fewer rows than dimensions, and more
        x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        y = 1.3 * torch.randn(m, d, generator=gen, dtype=torch.float64) + 0.2
        expected = FeatureStatistics.from_features(x).frechet_distance(FeatureStatistics.from_features(y))
        assert fid_from_rows(x, y) == pytest.approx(expected, rel=1e-8, abs=1e-9)


def test_bootstrap_interval_covers_the_true_kid():
    """Known answer: the population MMD² of two Gaussians, estimated once from 4000 rows per side."""
    gen = torch.Generator().manual_seed(3)
    d, shift = 4, 0.6

    def draw(n, offset):
        return torch.randn(n, d, generator=gen, dtype=torch.float64) + offset

    truth = kid(draw(4000, 0.0), draw(4000, shift))
    covered, trials = 0, 30
    for trial in range(trials):
        real, fake = {"A": draw(30, 0.0)}, {"model": {"A": draw(60, shift)}}
        est = bootstrap_scores(real, fake, n_boot=100, seed=trial)["scores"]["kid"]["model"]["A"]
        assert est["low"] <= est["value"] <= est["high"]
        covered += est["low"] <= truth <= est["high"]
    assert covered / trials >= 0.8


def test_gap_closure_and_verdict():
    gen = torch.Generator().manual_seed(4)
    real = {c: torch.randn(30, 6, generator=gen) for c in ("A", "B")}
    fake = {
        "vqgan": {c: torch.randn(40, 6, generator=gen) for c in real},
        "standard": {c: torch.randn(40, 6, generator=gen) + 1.5 for c in real},
        "rl": {c: torch.randn(40, 6, generator=gen) + 0.5 for c in real},
    }
    out = bootstrap_scores(real, fake, n_boot=50, seed=0)
    for metric in ("fid", "kid"):
        for c in ("A", "B", "All"):
            gap = out["gap_closed"][metric][c]
            assert 30 < gap["value"] < 100 and gap["low"] > 0
            assert out["verdict"][metric][c] == VERDICT_BETTER
    same = bootstrap_scores(real, {**fake, "rl": fake["standard"]}, n_boot=50, seed=0)
    assert same["verdict"]["fid"]["All"] == VERDICT_NONE
    assert gap_share(2.0, 1.0, 0.0) == 50.0 and math.isnan(gap_share(1.0, 0.5, 2.0))
    assert verdict(-0.1, -0.01) == "RL worse"


def test_paired_difference_between_two_rows():
    gen = torch.Generator().manual_seed(5)
    real = {c: torch.randn(30, 6, generator=gen) for c in ("A", "B")}
    near = {c: torch.randn(40, 6, generator=gen) + 0.2 for c in real}
    far = {c: torch.randn(40, 6, generator=gen) + 1.5 for c in real}
    out = bootstrap_scores(
        real, {"far": far, "near": near}, n_boot=50, seed=0, pairs=[("far", "near"), ("near", "far")]
    )
    forward, backward = out["pairs"]
    for metric in ("fid", "kid"):
        for c in ("A", "B", "All"):
            est = forward["difference"][metric][c]
            assert est["low"] > 0 and forward["verdict"][metric][c] == "near better"
            assert backward["difference"][metric][c]["value"] == pytest.approx(-est["value"])
            assert backward["verdict"][metric][c] == "near better"
    with pytest.raises(ValueError, match=r"pair \(far, rl\): no row named rl"):
        bootstrap_scores(real, {"far": far}, n_boot=2, pairs=[("far", "rl")])


def test_split_half_floor_is_small_for_real_vs_real():
    gen = torch.Generator().manual_seed(5)
    real = {c: torch.randn(30, 6, generator=gen) for c in ("A", "B")}
    floor = split_half_floor(real, n_splits=20, seed=0)
    shifted = fid_from_rows(real["A"], torch.randn(30, 6, generator=gen) + 2)
    assert floor["fid"]["A"]["high"] < shifted
    assert floor["kid"]["All"]["n_half"] == 30
    assert floor["kid"]["A"]["low"] < 0.05
    assert math.isnan(split_half_floor({"A": torch.randn(3, 6)}, n_splits=5)["fid"]["A"]["value"])


def test_slices_of_a_volume_are_resampled_together():
    """A 2D extractor gives several rows per volume; the bootstrap and the floor draw whole volumes."""
    gen = torch.Generator().manual_seed(6)
    real = {"A": torch.randn(8 * 3, 4, generator=gen)}
    out = bootstrap_scores(real, {"m": {"A": torch.randn(10 * 3, 4, generator=gen)}}, 5, rows_per_volume=3)
    assert out["scores"]["fid"]["m"]["A"]["low"] <= out["scores"]["fid"]["m"]["A"]["high"]
    assert split_half_floor(real, 3, rows_per_volume=3)["fid"]["A"]["n_half"] == 4
    with pytest.raises(ValueError, match="rows_per_volume"):
        bootstrap_scores({"A": torch.randn(7, 4)}, {"m": {"A": torch.randn(9, 4)}}, 2, rows_per_volume=3)


def test_gram_path_equals_the_direct_scores_on_duplicated_rows():
    """A bootstrap replicate scored from Gram matrices and counts equals FID/KID of the duplicated rows."""
    import numpy as np

    from mrrl.metrics.intervals import _Grams

    gen = torch.Generator().manual_seed(7)
    real, fake = torch.randn(20, 16, generator=gen), torch.randn(30, 16, generator=gen) + 0.3
    grams = _Grams(_Grams.real(real), fake)
    rng = np.random.default_rng(0)
    for _ in range(3):
        ir, jf = rng.integers(0, 20, 20), rng.integers(0, 30, 30)
        fid, kid_value = grams.scores(ir, jf)
        assert fid == pytest.approx(fid_from_rows(real[ir], fake[jf]), rel=1e-7)
        assert kid_value == pytest.approx(kid(real[ir], fake[jf]), rel=1e-7, abs=1e-12)

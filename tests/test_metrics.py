"""Tests for mrrl.metrics: Fréchet distance, extractors, features, cache, PR/DC, MS-SSIM diversity."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.linalg
import torch
from monai.networks.layers import GaussianFilter

from mrrl.metrics.diversity import ms_ssim_diversity, ms_ssim_settings
from mrrl.metrics.extractors import build_extractor
from mrrl.metrics.features import compute_statistics, extract_features
from mrrl.metrics.precision_recall import density_coverage, precision_recall
from mrrl.metrics.pretrained import find_medicalnet_weights, load_medicalnet_state
from mrrl.metrics.statistics import FeatureAccumulator, FeatureStatistics, frechet_distance
from mrrl.metrics.stats_cache import RealStatsCache


def gaussian_features(n: int, dim: int, seed: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return scale * rng.normal(size=(n, dim)) @ mix + rng.normal(size=dim)


def fd_of(x: np.ndarray, y: np.ndarray) -> float:
    a, b = FeatureStatistics.from_features(x), FeatureStatistics.from_features(y)
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def brain_volumes(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Smooth brain-like phantoms in [-1, 1]: head ellipsoid, textured brain, two dark ventricles."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.linspace(-1, 1, size)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, 1, 1, 1, generator=g) - 0.5

    centre = 0.1 * u(3)
    radii = torch.tensor([0.8, 0.9, 0.75]).view(1, 3, 1, 1, 1) * (1 + 0.15 * u(3))
    dz, dy, dx = (torch.stack([z, y, x])[None] - centre).unbind(1)
    r = (dz / radii[:, 0]) ** 2 + (dy / radii[:, 1]) ** 2 + (dx / radii[:, 2]) ** 2
    vent = (dz / 0.18) ** 2 + (dy / 0.35) ** 2 + ((dx.abs() - 0.15 * (1 + u(1)[:, 0])) / 0.08) ** 2
    texture = GaussianFilter(3, sigma=1.5)(torch.randn(n, 1, size, size, size, generator=g))[:, 0]
    texture = texture / texture.std()
    vol = torch.full_like(r, -1.0)
    vol = torch.where(r <= 1.0, torch.full_like(r, 0.1), vol)
    vol = torch.where(r <= 0.7, 0.45 + 0.15 * texture + 0.2 * u(1)[:, 0], vol)
    vol = torch.where(vent <= 1.0, torch.full_like(r, -0.5), vol)
    return vol.clamp(-1, 1).unsqueeze(1)


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_self_zero_symmetric_and_translation():
    x, y = gaussian_features(400, 16, 0), gaussian_features(400, 16, 1, scale=1.5)
    assert fd_of(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fd_of(x, y) > 1.0
    assert fd_of(x, y) == pytest.approx(fd_of(y, x), rel=1e-10)
    delta = np.linspace(-2, 3, 16)
    assert fd_of(x, x + delta) == pytest.approx(float(delta @ delta), rel=1e-9)


def test_frechet_matches_scipy_sqrtm():
    x, y = gaussian_features(500, 32, 2), gaussian_features(300, 32, 3, scale=0.7)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    reference = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2) == pytest.approx(
        reference, rel=1e-6
    )


def test_frechet_stable_for_rank_deficient_covariances():
    x, y = gaussian_features(12, 64, 4), gaussian_features(9, 64, 5)  # N < F: singular covariances
    value = fd_of(x, y)
    assert np.isfinite(value) and value > 0
    assert fd_of(x, x) == pytest.approx(0.0, abs=1e-8)
    delta = np.full(64, 0.5)
    assert fd_of(x, x + delta) == pytest.approx(float(delta @ delta), rel=1e-8)
    # independent reference: tr sqrt(S1 S2) = sum of sqrt of the (real, >= 0) eigenvalues of S1 S2
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    diff = x.mean(0) - y.mean(0)
    assert value == pytest.approx(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, rel=1e-6)


def test_feature_statistics_streaming_save_load(tmp_path):
    x = gaussian_features(90, 8, 6)
    acc = FeatureAccumulator(8)
    for chunk in np.array_split(x, 3):
        acc.update(torch.from_numpy(chunk))
    merged = FeatureAccumulator(8).update(x[:40]).merge(FeatureAccumulator(8).update(x[40:]))
    for stats in (acc.statistics(), merged.statistics()):
        assert stats.n == 90
        np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.cov.numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    stats = FeatureStatistics.from_features(x, meta={"extractor": "e#1"})
    path = stats.save(tmp_path / "sub" / "stats.npz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.npz"]  # no temp file left behind
    loaded = FeatureStatistics.load(path)
    assert loaded.n == 90 and loaded.meta == {"extractor": "e#1"}
    assert torch.equal(loaded.mean, stats.mean) and torch.equal(loaded.cov, stats.cov)
    n, total, outer = loaded.sums()
    again = FeatureStatistics.from_sums(n, total, outer)
    torch.testing.assert_close(again.cov, stats.cov, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatistics.from_features(x[:1])


# --------------------------------------------------------------------------- extractors

DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from mrrl.metrics.extractors import build_extractor
    torch.set_num_threads(1)
    torch.manual_seed(12345)  # a different global RNG state must not matter
    x = torch.linspace(-1, 1, 2 * 20 ** 3).reshape(2, 1, 20, 20, 20).sin()
    out = {}
    for name, opts in (("random3d", {"seed": 7}), ("random2d", {"seed": 7, "slice_size": 32})):
        e = build_extractor(name, **opts)
        out[name] = (e.identity, e(x))
    torch.save(out, sys.argv[1])
    """
)


def test_random_extractors_deterministic_in_and_across_processes(tmp_path):
    x = torch.linspace(-1, 1, 2 * 20**3).reshape(2, 1, 20, 20, 20).sin()
    proc = subprocess.Popen([sys.executable, "-c", DETERMINISM_SCRIPT, str(tmp_path / "f.pt")])
    ours = {}
    for name, opts in (("random3d", {"seed": 7}), ("random2d", {"seed": 7, "slice_size": 32})):
        torch.manual_seed(0)
        state = torch.get_rng_state()
        a = build_extractor(name, **opts)
        assert torch.equal(torch.get_rng_state(), state), "building an extractor must not consume global RNG"
        torch.manual_seed(99)
        b = build_extractor(name, **opts)
        assert a.identity == b.identity
        fa = a(x)
        assert torch.equal(fa, b(x))
        other = build_extractor(name, **{**opts, "seed": 8})
        assert other.identity != a.identity and not torch.allclose(other(x), fa)
        ours[name] = (a.identity, fa)
    assert proc.wait(timeout=120) == 0
    theirs = torch.load(tmp_path / "f.pt")
    for name, (identity, feats) in ours.items():
        assert theirs[name][0] == identity
        torch.testing.assert_close(theirs[name][1], feats, rtol=1e-5, atol=1e-6)


def test_extractor_shapes_channels_and_errors():
    e3 = build_extractor("random3d", in_channels=2)
    e2 = build_extractor("random2d", in_channels=2, axes=(0, 2), n_slices=2, slice_size=32)
    v = torch.rand(3, 2, 16, 20, 18) * 2 - 1
    assert e3(v).shape == (3, e3.feature_dim)
    f2 = e2(v)
    assert f2.shape == (3 * 2 * 2, 512) and e2.rows_per_volume() == 4
    # volume-major rows: features of volume 1 do not depend on volume 0
    torch.testing.assert_close(e2(v[1:2]), f2[4:8], rtol=1e-4, atol=1e-5)
    assert not e3.training and not any(p.requires_grad for p in e3.parameters())
    with pytest.raises(ValueError, match="in_channels"):
        e3(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="at least 16"):
        e3(torch.zeros(1, 2, 12, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        e3(torch.full((1, 2, 16, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_extractor("vgg")


@pytest.mark.parametrize(
    "name,opts", [("random3d", {}), ("random2d", {"slice_size": 32, "n_slices": 3})], ids=["3d", "2d"]
)
def test_fid_grows_with_noise_and_blur(name, opts):
    extractor = build_extractor(name, **opts)
    real = FeatureStatistics.from_features(extractor(brain_volumes(8, 24, seed=0)))
    fake = brain_volumes(8, 24, seed=1)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(fake.shape, generator=g)

    def fid(volumes: torch.Tensor) -> float:
        return real.frechet_distance(FeatureStatistics.from_features(extractor(volumes)))

    noisy = [fid(fake + s * noise) for s in (0.0, 0.05, 0.15, 0.4)]
    blurred = [fid(fake)] + [fid(GaussianFilter(3, sigma=s)(fake)) for s in (0.6, 1.2, 2.4)]
    assert all(b > a for a, b in zip(noisy, noisy[1:])), noisy
    assert all(b > a for a, b in zip(blurred, blurred[1:])), blurred


def test_medicalnet_missing_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # no weights downloaded by other tools either
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        build_extractor("medicalnet", arch="resnet10", weights_path=tmp_path / "nope.pth")
    msg = str(err.value)
    assert "resnet_10_23dataset.pth" in msg and "huggingface.co/TencentMedicalNet/MedicalNet-Resnet10" in msg
    assert "metrics.extractor_options.weights_path=" in msg
    with pytest.raises(FileNotFoundError, match="resnet_18_23dataset.pth"):
        build_extractor("medicalnet", arch="resnet18")


def test_medicalnet_weights_found_in_the_torch_hub_and_hugging_face_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert find_medicalnet_weights("resnet10", None) is None
    snapshot = tmp_path / "hf" / "models--TencentMedicalNet--MedicalNet-Resnet10" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "resnet_10_23dataset.pth").write_bytes(b"x")
    assert find_medicalnet_weights("resnet10", None) == snapshot / "resnet_10_23dataset.pth"
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "resnet_10_23dataset.pth").write_bytes(b"x")
    assert find_medicalnet_weights("resnet10", None) == hub / "resnet_10_23dataset.pth"  # torch hub first
    assert (
        find_medicalnet_weights("resnet10", tmp_path / "elsewhere.pth") is None
    )  # a given path is not replaced


def test_medicalnet_loads_tencent_style_checkpoint(tmp_path):
    from monai.networks.nets import resnet10

    torch.manual_seed(3)
    source = resnet10(
        spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B", bias_downsample=False
    )
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(512, 32, 2, 2, 2)  # segmentation head: ignored
    torch.save({"state_dict": state}, tmp_path / "resnet_10_23dataset.pth")

    e = build_extractor("medicalnet", weights_path=tmp_path, in_channels=2)  # a folder holding the file works
    assert torch.equal(e.net.conv1.weight, source.conv1.weight)
    assert e.net.layer4[0].conv1.dilation == (4, 4, 4) and e.net.layer4[0].conv1.stride == (1, 1, 1)
    v = brain_volumes(2, 16, seed=0).repeat(1, 2, 1, 1, 1)
    feats = e(v)
    assert feats.shape == (2, 1024) == (2, e.feature_dim) and torch.isfinite(feats).all()
    # intensity normalisation inside: an affine change of the foreground does not change features
    fg = v > -0.95
    torch.testing.assert_close(e(torch.where(fg, 0.5 * v + 0.1, v)), feats, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="not a MedicalNet checkpoint"):
        load_medicalnet_state(
            e.net, _save(tmp_path / "bad.pth", {"state_dict": {"module.foo": torch.zeros(1)}})
        )


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_inception_without_torch_fidelity_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch_fidelity" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        build_extractor("inception2d")


# --------------------------------------------------------------------------- real-statistics cache


def test_real_stats_cache_reused(tmp_path):
    extractor = build_extractor("random3d")
    real = brain_volumes(6, 16, seed=0)
    cache = RealStatsCache(tmp_path / "cache")
    key = {"dataset": "phantom", "split": "test", "class": "tumor", "extractor": extractor, "image_size": 16}
    calls = []

    def compute():
        calls.append(1)
        return compute_statistics(extractor, real, batch_size=4)

    first = cache.get_or_compute(key, compute)
    second = cache.get_or_compute(dict(reversed(list(key.items()))), compute)  # key order does not matter
    assert len(calls) == 1 and cache.path_for(key).is_file()
    assert torch.equal(first.cov, second.cov) and second.meta["extractor"] == extractor.identity
    cache.get_or_compute({**key, "split": "train"}, compute)
    assert len(calls) == 2


# --------------------------------------------------------------------------- PR / DC, diversity, report


def test_precision_recall_density_coverage():
    real = torch.from_numpy(gaussian_features(300, 8, 7))
    same = precision_recall(real, real, k=3)
    assert same == {"precision": 1.0, "recall": 1.0}
    dc = density_coverage(real, real, k=3, chunk_size=64)  # chunking must not change results
    assert dc["coverage"] == 1.0 and 0.9 < dc["density"] < 1.5
    fresh = precision_recall(real, torch.from_numpy(gaussian_features(300, 8, 7)[::-1].copy()), chunk_size=50)
    assert fresh == same
    shifted = real + 3.0 * real.std(0)
    far = precision_recall(real, shifted, k=3)
    assert far["precision"] < 0.3 and far["recall"] < 0.3
    assert density_coverage(real, shifted)["coverage"] < 0.3


def test_ms_ssim_diversity_identical_vs_independent():
    assert (
        ms_ssim_settings((32, 32, 32))["kernel_size"] == 7
        and len(ms_ssim_settings((32,) * 3)["weights"]) == 3
    )
    assert (
        len(ms_ssim_settings((64,) * 3)["weights"]) == 4 and len(ms_ssim_settings((128,) * 3)["weights"]) == 5
    )
    one = brain_volumes(1, 32, seed=0)
    copies = one.repeat(4, 1, 1, 1, 1)
    assert ms_ssim_diversity(copies) == pytest.approx(1.0, abs=1e-4)
    noise = torch.rand(4, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert ms_ssim_diversity(noise) < 0.2
    brains = brain_volumes(6, 32, seed=1)
    value = ms_ssim_diversity(brains, max_pairs=5, generator=torch.Generator().manual_seed(1))
    assert ms_ssim_diversity(noise) < value < 0.999


def test_extract_features_reads_tensors_or_batches():
    extractors = [build_extractor("random3d"), build_extractor("random2d", slice_size=32, n_slices=2)]
    real = {"CN": brain_volumes(6, 16, seed=0)}
    by_tensor = extract_features(extractors, real["CN"], batch_size=4)
    by_batches = extract_features(extractors, list(real["CN"].split(4)))
    assert (
        all(torch.allclose(a, b) for a, b in zip(by_tensor, by_batches))
        and by_tensor[1].shape[0] == 6 * 3 * 2
    )
    (f3d,) = extract_features(extractors[:1], real["CN"], batch_size=5)
    assert f3d.shape == (6, 512)

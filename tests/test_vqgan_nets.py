"""Tests for mrrl.vqgan (networks): VQGAN generator, EMA quantiser, discriminators, GAN and perceptual losses (CPU, tiny)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mrrl.vqgan.discriminators import (
    SliceDiscriminator,
    VolumeDiscriminator,
    axial_slices,
    random_axial_slices,
)
from mrrl.vqgan.gan_losses import (
    PerceptualLoss,
    PerceptualWeightsMissingError,
    adaptive_adversarial_weight,
    adversarial_factor,
    build_perceptual_loss,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
)
from mrrl.vqgan.networks import VQGAN
from mrrl.vqgan.quantizer import VectorQuantizerEMA, nearest_codes

REPO = Path(__file__).resolve().parents[1]


def tiny_vqgan(**kw) -> VQGAN:
    cfg = dict(channels=(4, 8), num_res_blocks=1, codebook_size=32, codebook_dim=4)
    cfg.update(kw)
    return VQGAN(**cfg)


def smooth_volumes(n: int = 2, size: int = 16) -> torch.Tensor:
    """Smooth zero-mean patterns in [-0.8, 0.8], shape [n, 1, size, size, size] (no constant fits them)."""
    g = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(g, g, g, indexing="ij")
    vols = [0.8 * torch.sin(2.5 * xx + 1.5 * yy + i) * torch.cos(2 * zz - yy + 0.5 * i) for i in range(n)]
    return torch.stack(vols)[:, None]


# ------------------------------------------------------------------------------------------------ VQGAN shapes


@pytest.mark.parametrize(
    "spatial, channels, factor, levels",
    [
        ((16, 16, 16), 1, 4, (4, 8)),
        ((32, 32, 32), 1, 4, (4, 8)),
        ((16, 24, 32), 2, 4, (4, 8)),
        ((16, 16, 16), 1, 8, (4, 8, 8)),
        ((16, 24, 32), 2, 8, (4, 8, 8)),
        ((16, 24, 32), 1, 4, (4, 8, 8)),  # extra keep-resolution level
    ],
)
def test_vqgan_forward_backward_shapes(spatial, channels, factor, levels):
    torch.manual_seed(0)
    model = tiny_vqgan(in_channels=channels, downsample_factor=factor, channels=levels)
    x = torch.rand(2, channels, *spatial) * 2 - 1
    out = model(x)
    latent = tuple(s // factor for s in spatial)
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (2, *latent) and out.indices.dtype == torch.long
    assert out.vq_loss.ndim == 0 and torch.isfinite(out.vq_loss)
    (F.l1_loss(out.reconstruction, x) + out.vq_loss).backward()
    first_conv = next(p for n, p in model.encoder.named_parameters() if n.endswith("weight"))
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0  # straight-through reaches encoder
    assert model.last_layer_weight.grad is not None

    model.eval()
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, 4, *latent) == model.latent_shape(x.shape)
        assert model.latent_shape(spatial) == (4, *latent) == model.latent_shape((channels, *spatial))
        assert model.encode_pre_quant(x).shape == z.shape
        assert model.decode(z).shape == x.shape
        assert model.reconstruct(x).shape == x.shape
        # encode returns code vectors: every latent vector is a row of the codebook
        rows = z.movedim(1, -1).reshape(-1, 4)
        assert (rows[:, None] == model.quantizer.codebook[None]).all(-1).any(1).all()
        # decode(quantize=True) snaps continuous latents (e.g. diffusion samples) to the codebook first
        codes = model.quantizer.codebook
        gaps = torch.cdist(codes, codes, compute_mode="donot_use_mm_for_euclid_dist")
        step = 0.4 * gaps[gaps > 0].min()  # less than half the distance between distinct codes
        noise = torch.randn_like(z)
        noisy = z + step * noise / noise.norm(dim=1, keepdim=True)
        torch.testing.assert_close(model.decode(noisy, quantize=True), model.decode(z))
        idx = model.quantize(z).indices
        torch.testing.assert_close(model.decode_indices(idx), model.decode(z))


def test_vqgan_rejects_bad_shapes_and_config():
    model = tiny_vqgan()
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 1, 16, 18, 16))
    with pytest.raises(ValueError, match="divisible"):
        model.latent_shape((16, 16, 10))
    with pytest.raises(ValueError, match="channels"):
        model.latent_shape((2, 16, 16, 16))
    with pytest.raises(ValueError, match="power of two"):
        tiny_vqgan(downsample_factor=6)
    with pytest.raises(ValueError, match="levels"):
        tiny_vqgan(downsample_factor=8, channels=(4, 8))
    with pytest.raises(TypeError):
        VQGAN(not_a_key=1)


def test_vqgan_codebook_is_not_a_parameter_and_encode_does_not_update():
    torch.manual_seed(0)
    model = tiny_vqgan()
    names = {n for n, _ in model.named_parameters()}
    assert not any("quantizer" in n for n in names)
    assert {"quantizer.embedding", "quantizer.ema_count", "quantizer.ema_sum"} <= set(model.state_dict())
    before = model.quantizer.codebook.clone()
    model.train()
    model.encode(torch.rand(1, 1, 16, 16, 16))  # utilities never move the codebook, even in train mode
    model.decode(torch.randn(1, 4, 4, 4, 4), quantize=True)
    torch.testing.assert_close(model.quantizer.codebook, before, rtol=0, atol=0)
    model.eval()
    model(torch.rand(1, 1, 16, 16, 16))  # forward in eval mode: no EMA update either
    torch.testing.assert_close(model.quantizer.codebook, before, rtol=0, atol=0)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = tiny_vqgan(dead_code_threshold=0.0)
    ckpt = tiny_vqgan(dead_code_threshold=0.0, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    for m in (plain, ckpt):
        out = m(x)
        (F.l1_loss(out.reconstruction, x) + out.vq_loss).backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_tiny_vqgan_learns_to_reconstruct():
    """A real learning check: L1 on two smooth volumes drops below half of both the initial loss and the
    best constant prediction within 80 Adam steps (about 1 s on one core)."""
    torch.manual_seed(0)
    x = smooth_volumes()
    best_constant = (x - x.median()).abs().mean().item()
    model = tiny_vqgan(channels=(8, 16), codebook_size=64, ema_decay=0.9)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        out = model(x)
        rec = F.l1_loss(out.reconstruction, x)
        opt.zero_grad()
        (rec + out.vq_loss).backward()
        opt.step()
        losses.append(rec.item())
    model.eval()
    with torch.no_grad():
        final = F.l1_loss(model.reconstruct(x), x).item()
    assert final < 0.5 * losses[0] and final < 0.5 * best_constant, (losses[0], best_constant, final)
    assert out.stats["perplexity"] > 8  # the codebook did not collapse onto a few codes


# ------------------------------------------------------------------------------------------------ quantiser


def test_chunked_search_equals_unchunked_reference():
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, 8, generator=g)
    codebook = torch.randn(64, 8, generator=g)
    ref = torch.cdist(flat.double(), codebook.double()).argmin(1)  # full N x K matrix, float64
    full = nearest_codes(flat, codebook, chunk_size=10**6)
    assert torch.equal(full, ref)
    for chunk in (1, 7, 128, 999):
        assert torch.equal(nearest_codes(flat, codebook, chunk_size=chunk), full)
    q_small = VectorQuantizerEMA(64, 8, chunk_size=3)
    q_big = VectorQuantizerEMA(64, 8, chunk_size=10**6)
    q_big.load_state_dict(q_small.state_dict())
    z = torch.randn(2, 8, 4, 5, 6, generator=g)
    assert torch.equal(q_small(z, update=False).indices, q_big(z, update=False).indices)


def test_quantizer_outputs_straight_through_and_commitment():
    torch.manual_seed(0)
    q = VectorQuantizerEMA(16, 3, commitment_cost=0.5).eval()
    z = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    out = q(z)
    expected = q.embed(out.indices)
    torch.testing.assert_close(out.quantized, expected)
    torch.testing.assert_close(out.loss, 0.5 * F.mse_loss(z, expected))
    out.quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through: identity gradient
    assert list(q.parameters()) == []


def test_ema_moves_used_codes_toward_inputs_exactly():
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [50.0, 50.0]])
    q = VectorQuantizerEMA(4, 2, decay=0.8, epsilon=0.0, dead_code_threshold=0.0)
    q.embedding.copy_(codes)
    q.ema_sum.copy_(codes)
    # 3 vectors near code 0 (mean (1, 1)), 1 vector near code 1; codes 2 and 3 unused
    flat = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 1.0], [12.0, 0.0]])
    z = flat.t().reshape(1, 2, 4, 1, 1)
    q.train()
    out = q(z)
    assert out.indices.flatten().tolist() == [0, 0, 0, 1]
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])
    sums = torch.stack([flat[:3].sum(0), flat[3], torch.zeros(2), torch.zeros(2)])
    ema_count = 0.8 * torch.ones(4) + 0.2 * counts
    ema_sum = 0.8 * codes + 0.2 * sums
    torch.testing.assert_close(q.ema_count, ema_count)
    torch.testing.assert_close(q.codebook, ema_sum / ema_count[:, None])
    # used codes moved toward their inputs; the unused ones kept their place
    assert (q.codebook[0] - torch.tensor([1.0, 1.0])).norm() < (codes[0] - torch.tensor([1.0, 1.0])).norm()
    assert (q.codebook[1] - flat[3]).norm() < (codes[1] - flat[3]).norm()
    torch.testing.assert_close(q.codebook[2:], codes[2:])


def test_codebook_untouched_by_optimizer_and_moved_by_ema():
    torch.manual_seed(0)
    model = tiny_vqgan()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert all(p is not model.quantizer.embedding for g in opt.param_groups for p in g["params"])
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    out = model(x)  # training-mode forward updates the EMA codebook
    after_ema = model.quantizer.codebook.clone()
    (F.l1_loss(out.reconstruction, x) + out.vq_loss).backward()
    assert model.quantizer.embedding.grad is None
    opt.step()
    torch.testing.assert_close(model.quantizer.codebook, after_ema, rtol=0, atol=0)


def test_dead_codes_restart_and_usage_recovers():
    torch.manual_seed(0)
    k = 16
    q = VectorQuantizerEMA(k, 4, decay=0.9, dead_code_threshold=1.0)
    far = 100.0 + torch.randn(k, 4)  # codebook far from the data
    q.embedding.copy_(far)
    q.ema_sum.copy_(far)
    data = lambda: torch.randn(4, 4, 4, 4, 4)  # noqa: E731  # 256 vectors per batch ~ N(0, 1)

    with torch.no_grad():
        first = q.eval()(data())
    assert first.stats["usage"] == 1 / k and first.stats["perplexity"] == pytest.approx(1.0)
    q.train()
    out = q(data())
    assert out.stats["restarted"] == k - 1  # every code but the one nearest the data
    assert (q.codebook.norm(dim=1) < 20).all()  # restarted from encoder outputs
    for _ in range(10):
        out = q(data())
    assert out.stats["usage"] > 0.8
    assert out.stats["perplexity"] > k / 2

    frozen = VectorQuantizerEMA(k, 4, decay=0.9, dead_code_threshold=0.0)
    frozen.embedding.copy_(far)
    frozen.ema_sum.copy_(far)
    assert frozen(data()).stats["restarted"] == 0


def test_stats_are_in_valid_ranges():
    k = 8
    q = VectorQuantizerEMA(k, 2).eval()
    z = q.codebook.t().reshape(1, 2, k, 1, 1).repeat(1, 1, 1, 3, 1)  # every code used equally
    out = q(z)
    assert out.stats["perplexity"] == pytest.approx(k, rel=1e-5)
    assert out.stats["usage"] == 1.0 and out.stats["restarted"] == 0
    out = q(torch.randn(3, 2, 5, 5, 5))
    assert 1.0 <= out.stats["perplexity"] <= k and 0.0 < out.stats["usage"] <= 1.0


_DDP_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from mrrl.vqgan.quantizer import VectorQuantizerEMA
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    ema = VectorQuantizerEMA(16, 3, decay=0.5, dead_code_threshold=0.0)
    restart = VectorQuantizerEMA(16, 3, decay=0.5, dead_code_threshold=1.0)
    restart.embedding.add_(100.0)  # far from the data: all codes but one are dead after the first step
    restart.ema_sum.add_(100.0)
    torch.manual_seed(100 + rank)  # different data (and random state) on each rank
    z = torch.randn(2, 3, 4, 4, 4)
    ema.train()(z)
    restart.train()(z)
    torch.save({"z": z, "ema": ema.state_dict(), "restart": restart.state_dict()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    """
)


def test_ddp_ema_statistics_are_all_reduced_and_restarts_synchronised(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DDP_WORKER, str(r), str(port), str(tmp_path)],
            env=env,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in ("ema", "restart"):
        for name, value in r0[key].items():
            torch.testing.assert_close(value, r1[key][name], rtol=0, atol=0, msg=f"{key}.{name}")
    # the all-reduced EMA equals a single process seeing both ranks' data
    torch.manual_seed(0)
    ref = VectorQuantizerEMA(16, 3, decay=0.5, dead_code_threshold=0.0).train()
    ref(torch.cat([r0["z"], r1["z"]]))
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(r0["ema"][name], value, msg=name)
    # restarts happened, with the same replacement vectors on both ranks, drawn from rank 0's encoder outputs
    rank0_rows = r0["z"].movedim(1, -1).reshape(-1, 3)
    codes = r1["restart"]["embedding"]
    from_rank0 = (codes[:, None] == rank0_rows[None]).all(-1).any(1)
    assert from_rank0.sum() == 15  # every code but the one that was used (and moved by the EMA)


# ------------------------------------------------------------------------------------------------ discriminators


def test_patch_discriminators_return_logits_and_features():
    torch.manual_seed(0)
    d3 = VolumeDiscriminator(in_channels=2, channels=4, num_layers=2)
    vol = torch.randn(2, 2, 16, 24, 32)
    out = d3(vol)
    assert out.logits.shape == (2, 1, *d3.output_size(vol.shape[2:]))
    assert len(out.features) == 3 and all(f.shape[0] == 2 for f in out.features)
    d2 = SliceDiscriminator(in_channels=2, channels=4, num_layers=2, norm="INSTANCE")
    sl = random_axial_slices(vol, 3)
    out2 = d2(sl)
    assert out2.logits.shape == (6, 1, *d2.output_size(sl.shape[2:]))
    with pytest.raises(ValueError, match="too small"):
        VolumeDiscriminator(channels=4, num_layers=3)(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ValueError):
        d2(vol)


def test_random_axial_slices_shape_axis_and_determinism():
    b, c, d, h, w = 2, 2, 5, 6, 10
    bb = torch.arange(b).view(b, 1, 1, 1, 1)
    cc = torch.arange(c).view(1, c, 1, 1, 1)
    ww = torch.arange(w).view(1, 1, 1, 1, w)
    vol = (1000 * bb + 100 * cc + ww).float().expand(b, c, d, h, w).contiguous()
    vol = vol + 0.001 * torch.arange(d).view(1, 1, d, 1, 1)  # marks the D axis too
    slices, idx = random_axial_slices(vol, 4, torch.Generator().manual_seed(0), return_indices=True)
    assert slices.shape == (b * 4, c, d, h) and idx.shape == (b, 4)
    for bi in range(b):
        assert len(set(idx[bi].tolist())) == 4  # distinct within a volume
        for j in range(4):
            s = slices[bi * 4 + j]
            for ci in range(c):
                torch.testing.assert_close(s[ci], vol[bi, ci, :, :, idx[bi, j]])  # slice along the last axis
    again = random_axial_slices(vol, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, slices)
    torch.testing.assert_close(axial_slices(vol, idx), slices)
    _, idx = random_axial_slices(vol, 6, torch.Generator().manual_seed(1), margin=0.2, return_indices=True)
    assert idx.min() >= 2 and idx.max() <= 7
    with pytest.raises(ValueError):
        random_axial_slices(vol, 7, margin=0.2)


# ------------------------------------------------------------------------------------------------ GAN losses


def test_hinge_losses_on_hand_made_logits():
    big, small = torch.full((2, 1, 3, 3, 3), 5.0), torch.full((2, 1, 3, 3, 3), -5.0)
    zero = torch.zeros(2, 1, 3, 3, 3)
    assert discriminator_loss(big, small, "hinge") == 0.0  # confident and right: no loss
    assert discriminator_loss(zero, zero, "hinge") == pytest.approx(1.0)
    assert discriminator_loss(small, big, "hinge") == pytest.approx(6.0)  # confident and wrong
    assert generator_loss(big, "hinge") == pytest.approx(-5.0)
    assert generator_loss(small, "hinge") == pytest.approx(5.0)
    # several discriminators (3D + 2D) are averaged
    assert discriminator_loss([big, zero], [small, zero], "hinge") == pytest.approx(0.5)


def test_non_saturating_and_least_squares_losses():
    big, small, zero = torch.full((4,), 10.0), torch.full((4,), -10.0), torch.zeros(4)
    assert discriminator_loss(big, small, "non_saturating") < 1e-4
    assert discriminator_loss(zero, zero, "non_saturating") == pytest.approx(math.log(2))
    assert generator_loss(zero, "non_saturating") == pytest.approx(math.log(2))
    assert generator_loss(big, "non_saturating") < generator_loss(zero, "non_saturating")
    assert generator_loss(small, "non_saturating") == pytest.approx(10.0, abs=1e-3)  # does not saturate
    assert discriminator_loss(torch.ones(4), zero, "least_squares") == 0.0
    assert generator_loss(zero, "least_squares") == pytest.approx(1.0)
    fake = torch.zeros(4, requires_grad=True)
    generator_loss(fake, "non_saturating").backward()
    assert (fake.grad < 0).all()  # gradient descent raises the fake logits
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss(zero, "wasserstein")


def test_feature_matching_loss():
    real = [torch.randn(2, 4, 3, 3, 3), torch.randn(2, 8, 2, 2, 2)]
    assert feature_matching_loss(real, [r.clone() for r in real]) == 0.0
    fake = [(r + 1.0).requires_grad_() for r in real]
    real = [r.requires_grad_() for r in real]
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert all(r.grad is None for r in real) and all(f.grad is not None for f in fake)
    with pytest.raises(ValueError):
        feature_matching_loss(real, fake[:1])


def test_adaptive_adversarial_weight():
    torch.manual_seed(0)
    model = tiny_vqgan()
    disc = VolumeDiscriminator(channels=4, num_layers=2)
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    out = model(x)
    rec = F.l1_loss(out.reconstruction, x)
    gan = generator_loss(disc(out.reconstruction).logits)
    last = model.last_layer_weight
    w = adaptive_adversarial_weight(rec, gan, last)
    assert torch.isfinite(w) and w > 0 and not w.requires_grad
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, last, retain_graph=True)[0]
    torch.testing.assert_close(w, g_rec.norm() / (g_gan.norm() + 1e-4))
    assert last.grad is None  # autograd.grad writes no .grad
    assert adaptive_adversarial_weight(rec, gan, last, max_weight=1e-3) == pytest.approx(1e-3)
    assert adaptive_adversarial_weight(rec, gan, last, fixed_weight=0.1) == pytest.approx(0.1)
    (rec + w * gan).backward()  # the graph is still usable for the real backward pass
    unrelated = torch.zeros((), requires_grad=True) * 2
    assert adaptive_adversarial_weight(rec.detach().requires_grad_(), unrelated, last) == 0.0


def test_adversarial_factor_warmup():
    assert adversarial_factor(0, 100) == 0.0
    assert adversarial_factor(99, 100) == 0.0
    assert adversarial_factor(100, 100) == 1.0
    assert adversarial_factor(5, 0) == 1.0
    assert adversarial_factor(100, 100, ramp_steps=4) == 0.25
    assert adversarial_factor(103, 100, ramp_steps=4) == 1.0


# ------------------------------------------------------------------------------------------------ perceptual


@pytest.fixture
def offline_empty_caches(tmp_path, monkeypatch):
    """Empty torch hub / Hugging Face caches and no network at all."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_network(*args, **kwargs):
        raise AssertionError("the perceptual loss tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return tmp_path


def test_perceptual_loss_missing_weights_gives_clear_error(offline_empty_caches):
    assert build_perceptual_loss(0.0) is None  # off by default: nothing is looked up
    expected = offline_empty_caches / "torch" / "hub" / "checkpoints" / "resnet_10_23dataset.pth"
    with pytest.raises(PerceptualWeightsMissingError) as err:
        build_perceptual_loss(1.0)
    msg = str(err.value)
    assert str(expected) in msg and "stage.perceptual_weight=0" in msg and "weights_path" in msg
    with pytest.raises(PerceptualWeightsMissingError, match="does not exist"):
        PerceptualLoss(weights_path=offline_empty_caches / "nope.pth")
    with pytest.raises(ValueError, match="unknown perceptual network"):
        PerceptualLoss(network="alex")


def test_perceptual_loss_loads_local_weights(offline_empty_caches):
    from monai.networks.nets.resnet import ResNetFeatures

    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in ResNetFeatures("resnet10", pretrained=False).state_dict().items()}
    target = offline_empty_caches / "torch" / "hub" / "checkpoints" / "resnet_10_23dataset.pth"
    target.parent.mkdir(parents=True)
    torch.save({"state_dict": state}, target)  # MedicalNet's layout: nested, DataParallel prefixes
    loss_fn = PerceptualLoss()  # found in the torch hub checkpoint folder
    assert loss_fn.weights_path == str(target)
    torch.testing.assert_close(loss_fn.net.conv1.weight, state["module.conv1.weight"])
    x = torch.rand(1, 2, 16, 16, 16) * 2 - 1
    y = (x + 0.5 * torch.randn_like(x)).requires_grad_()
    assert loss_fn(x, x) < 1e-6
    loss = loss_fn(y, x)
    assert loss > 0
    loss.backward()
    assert y.grad is not None and all(p.grad is None for p in loss_fn.parameters())
    loss_fn.train()
    assert not loss_fn.net.training  # frozen BatchNorm statistics

    wrong = offline_empty_caches / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    with pytest.raises(RuntimeError, match="wrong.pth"):
        PerceptualLoss(weights_path=wrong)

"""Schedules, samplers, log-probabilities and noised reconstruction of mrrl.diffusion (CPU, tiny shapes)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn
from torch.distributions import Normal, kl_divergence

from mrrl.diffusion.sampling import (
    gaussian_kl,
    latent_moments,
    noised_reconstruction,
    randn,
    sample,
    scale_factor_from_moments,
    std_from_moments,
    step_log_prob,
    step_mean_std,
)
from mrrl.diffusion.schedules import DiffusionSchedule, inference_timesteps
from mrrl.diffusion.unet import DenoiserModel, build_denoiser

LATENT = (4, 8, 8, 8)
DIMS = (1, 2, 3, 4)


def tiny_denoiser(
    prediction_type: str = "epsilon", cfg: bool = False, attention: bool = False, seed: int = 0
):
    """A 2-level MONAI UNet with its zero-initialised convolutions randomised: at MONAI's init the output
    is 0 and every residual block is the identity, so labels and timesteps would change nothing."""
    torch.manual_seed(seed)
    model = build_denoiser(
        latent_channels=LATENT[0],
        num_classes=2,
        schedule=DiffusionSchedule(prediction_type=prediction_type),
        classifier_free_guidance=cfg,
        channels=(8, 16),
        attention_levels=(False, attention),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=8,
    )
    for p in model.unet.parameters():
        if not p.any():
            nn.init.normal_(p, std=0.1)
    return model.eval()


class FakeUNet(nn.Module):
    """A cheap network with MONAI's call signature for 1000-step loops: near the optimal denoiser of
    N(0, I) data (eps = sqrt(1 - a_t) x_t, v = 0), so the chain stays bounded, plus small learnable terms."""

    def __init__(self, schedule: DiffusionSchedule, channels: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 1)
        self.emb = nn.Embedding(num_classes, channels)
        self.register_buffer("sqrt_1ma", (1 - schedule.alphas_cumprod).sqrt().float())
        self.epsilon = schedule.prediction_type == "epsilon"

    def forward(self, x, timesteps, class_labels):
        ideal = self.sqrt_1ma[timesteps].reshape(-1, 1, 1, 1, 1) * x if self.epsilon else 0.0
        return ideal + 0.1 * torch.tanh(self.conv(x)) + 0.1 * self.emb(class_labels)[:, :, None, None, None]


def fake_denoiser(prediction_type: str = "epsilon") -> DenoiserModel:
    torch.manual_seed(0)
    schedule = DiffusionSchedule(prediction_type=prediction_type)
    return DenoiserModel(FakeUNet(schedule), schedule).eval()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def model() -> DenoiserModel:
    return tiny_denoiser()


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.tensor([0, 1])


# ------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", ["linear_beta", "scaled_linear_beta", "cosine"])
def test_schedule_matches_monai(name):
    schedule = DiffusionSchedule(schedule=name)
    assert schedule.scheduler.clip_sample is False
    for monai in (DDPMScheduler(schedule=name), DDIMScheduler(schedule=name)):
        assert torch.equal(schedule.alphas_cumprod.float(), monai.alphas_cumprod)
    x0, noise, t = torch.randn(3, *LATENT), torch.randn(3, *LATENT), torch.tensor([0, 500, 999])
    expected = DDPMScheduler(schedule=name).add_noise(x0, noise, t)
    assert torch.allclose(schedule.add_noise(x0, noise, t), expected)


@pytest.mark.parametrize("offset", [0, 1])
def test_inference_timesteps_match_monai_ddim(offset):
    monai = DDIMScheduler(steps_offset=offset)
    for n in (1, 7, 10, 50, 100) + ((1000,) if offset == 0 else ()):
        monai.set_timesteps(n)
        assert torch.equal(inference_timesteps(1000, n, steps_offset=offset), monai.timesteps)
    schedule = DiffusionSchedule(steps_offset=offset)
    assert torch.equal(schedule.timesteps(10), inference_timesteps(1000, 10, offset))


def test_prev_timesteps_and_lookup():
    schedule = DiffusionSchedule()
    steps, prevs = schedule.timesteps(10), schedule.prev_timesteps(10)
    assert torch.equal(prevs[:-1], steps[1:]) and prevs[-1] == -1
    assert torch.equal(schedule.prev_timestep(steps, 10), prevs)
    with pytest.raises(ValueError, match="not steps"):
        schedule.prev_timestep(998, 10)
    with pytest.raises(ValueError, match="repeats"):
        inference_timesteps(1000, 1000, steps_offset=1)
    assert schedule.alpha_bar(-1) == 1.0
    assert DiffusionSchedule(set_alpha_to_one=False).alpha_bar(-1) == schedule.alphas_cumprod[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_eps_x0_inverts_training_target(prediction_type):
    schedule = DiffusionSchedule(schedule="cosine", prediction_type=prediction_type)
    x0, noise, t = torch.randn(3, *LATENT), torch.randn(3, *LATENT), torch.tensor([3, 400, 990])
    x_t = schedule.add_noise(x0, noise, t)
    eps, x0_hat = schedule.eps_x0(schedule.training_target(x0, noise, t), x_t, t)
    assert torch.allclose(eps, noise, atol=1e-4) and torch.allclose(x0_hat, x0, atol=1e-3)


# ----------------------------------------------------------------------------- one step against MONAI


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_monai(prediction_type, eta):
    n = 20
    monai = DDIMScheduler(clip_sample=False, prediction_type=prediction_type)
    monai.set_timesteps(n)
    schedule = DiffusionSchedule(prediction_type=prediction_type)
    for t in (999, 500, 0):  # 0 is the last step (lands on alpha_cumprod 1)
        out, x_t = torch.randn(2, *LATENT), torch.randn(2, *LATENT)
        expected, _ = monai.step(out, t, x_t, eta=eta, generator=gen(t))
        mean, std = step_mean_std(schedule, out, x_t, t, t - 1000 // n, "ddim", eta)
        x_prev = mean + std * randn(out.shape, gen(t), "cpu", out.dtype) if eta > 0 else mean
        assert torch.allclose(x_prev, expected, atol=1e-5, rtol=1e-4), t


def test_ddpm_step_matches_monai():
    monai = DDPMScheduler(clip_sample=False)
    monai.set_timesteps(1000)
    schedule = DiffusionSchedule()
    for t in (999, 300, 1, 0):
        out, x_t = torch.randn(2, *LATENT), torch.randn(2, *LATENT)
        expected, _ = monai.step(out, t, x_t, generator=gen(t))
        mean, std = step_mean_std(schedule, out, x_t, t, t - 1, "ddpm")
        x_prev = mean + std * randn(out.shape, gen(t), "cpu", out.dtype) if t > 0 else mean
        # at t = 0 MONAI's float32 beta_0 / (1 - alpha_cumprod_0) is 1 only to ~1e-4; ours is float64
        assert torch.allclose(x_prev, expected, atol=1e-5, rtol=1e-4 if t > 0 else 1e-3), t


def test_ddpm_over_subsequence_is_ddim_eta_one():
    """The DDPM posterior over a timestep subsequence equals DDIM with eta = 1 (Song et al.)."""
    schedule = DiffusionSchedule(schedule="cosine")
    for t, s in zip(schedule.timesteps(10).tolist(), schedule.prev_timesteps(10).tolist()):
        out, x_t = torch.randn(2, *LATENT, dtype=torch.float64), torch.randn(2, *LATENT, dtype=torch.float64)
        ddpm = step_mean_std(schedule, out, x_t, t, s, "ddpm")
        ddim = step_mean_std(schedule, out, x_t, t, s, "ddim", eta=1.0)
        assert torch.allclose(ddpm[0], ddim[0], atol=1e-8) and torch.allclose(ddpm[1], ddim[1]), t


@torch.no_grad()
def _monai_loop(scheduler, model, labels, noise, generator, **step_kwargs):
    x = noise
    for t in scheduler.timesteps:
        out = model(x, int(t), labels)
        x, _ = scheduler.step(out, int(t), x, generator=generator, **step_kwargs)
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_full_1000_step_ddim_matches_monai(eta):
    model, labels = fake_denoiser("v_prediction"), torch.tensor([0, 2])
    monai = DDIMScheduler(clip_sample=False, prediction_type="v_prediction")
    monai.set_timesteps(1000)  # the only step count where MONAI lands on its own next timestep
    g = gen(5)
    noise = torch.randn(2, 4, 4, 4, 4, generator=g)
    expected = _monai_loop(monai, model, labels, noise, g, eta=eta)
    ours = sample(model, labels, 1000, "ddim", eta=eta, generator=gen(5), shape=(4, 4, 4, 4))
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4)


def test_full_1000_step_ddpm_matches_monai():
    model, labels = fake_denoiser(), torch.tensor([1, 2])
    monai = DDPMScheduler(clip_sample=False)
    monai.set_timesteps(1000)
    g = gen(6)
    noise = torch.randn(2, 4, 4, 4, 4, generator=g)
    expected = _monai_loop(monai, model, labels, noise, g)
    ours = sample(model, labels, 1000, "ddpm", generator=gen(6), shape=(4, 4, 4, 4))
    # MONAI's last step scales x0 by float32 beta_0 / (1 - alpha_cumprod_0) = 1 +- 1e-4 (ours: exactly 1)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------- log-probs


def test_step_log_prob_is_normal_log_prob_and_peaks_at_mean(model, labels):
    _, traj = sample(model, labels, 4, "ddim", eta=1.0, generator=gen(), shape=LATENT, return_trajectory=True)
    assert traj.stochastic[:-1].all()
    for i in range(traj.num_steps - 1):
        x_t, x_prev, t = traj.latents[i], traj.latents[i + 1], traj.timesteps[i]
        step = step_log_prob(model, x_t, x_prev, t, labels, num_steps=4, eta=1.0)
        normal = Normal(step.mean, step.std)
        assert torch.allclose(step.log_prob, normal.log_prob(x_prev).mean(DIMS))
        assert torch.allclose(step.log_prob, traj.log_probs[:, i])
        summed = step_log_prob(model, x_t, x_prev, t, labels, num_steps=4, eta=1.0, reduce="sum")
        assert torch.allclose(summed.log_prob, normal.log_prob(x_prev).sum(DIMS))
        at_mean = step_log_prob(model, x_t, step.mean, t, labels, num_steps=4, eta=1.0).log_prob
        nudged = step.mean + 0.1 * step.std * torch.randn_like(step.mean)
        off_mean = step_log_prob(model, x_t, nudged, t, labels, num_steps=4, eta=1.0).log_prob
        assert (at_mean > off_mean).all() and (at_mean > step.log_prob).all()


@pytest.mark.parametrize(("sampler", "cfg_scale"), [("ddim", 1.0), ("ddpm", 1.0), ("ddim", 3.0)])
def test_recomputed_log_probs_give_ratio_exactly_one(sampler, cfg_scale, labels):
    model = tiny_denoiser(cfg=cfg_scale != 1.0)
    model.schedule = model.schedule.replace(steps_offset=1, set_alpha_to_one=False)  # DDPO convention
    _, traj = sample(
        model, labels, 5, sampler, 1.0, gen(3), LATENT, return_trajectory=True, guidance_scale=cfg_scale
    )
    assert traj.stochastic.all() and torch.isfinite(traj.log_probs).all()
    traj = traj.to("cpu")
    for i in range(traj.num_steps):
        new = step_log_prob(
            model,
            traj.latents[i],
            traj.latents[i + 1],
            traj.timesteps[i].expand(2),
            traj.labels,
            prev_t=traj.prev_timesteps[i],
            sampler=traj.sampler,
            eta=traj.eta,
            guidance_scale=traj.guidance_scale,
        )
        assert torch.equal(torch.exp(new.log_prob - traj.log_probs[:, i]), torch.ones(2)), i


def test_step_log_prob_is_differentiable(labels):
    model = tiny_denoiser()
    _, traj = sample(model, labels, 3, "ddpm", generator=gen(), shape=LATENT, return_trajectory=True)
    assert traj.latents[1].grad_fn is None  # sampling itself records no graph
    step = step_log_prob(
        model, traj.latents[0], traj.latents[1], traj.timesteps[0], labels, num_steps=3, sampler="ddpm"
    )
    step.log_prob.sum().backward()
    assert model.unet.conv_in.conv.weight.grad.abs().sum() > 0


def test_per_sample_timesteps(model, labels):
    """PPO minibatches mix steps: per-sample t gives each sample its own step's log-prob."""
    _, traj = sample(model, labels, 4, "ddim", eta=1.0, generator=gen(), shape=LATENT, return_trajectory=True)
    steps = [0, 2]
    x_t = torch.stack([traj.latents[s][b] for b, s in enumerate(steps)])
    x_prev = torch.stack([traj.latents[s + 1][b] for b, s in enumerate(steps)])
    step = step_log_prob(model, x_t, x_prev, traj.timesteps[steps], labels, num_steps=4, eta=1.0)
    expected = torch.stack([traj.log_probs[b, s] for b, s in enumerate(steps)])
    assert torch.allclose(step.log_prob, expected, atol=1e-5)


def test_deterministic_last_step_has_no_log_prob(model, labels):
    _, traj = sample(model, labels, 3, "ddim", eta=1.0, generator=gen(), shape=LATENT, return_trajectory=True)
    assert traj.stochastic.tolist() == [True, True, False]
    assert torch.isnan(traj.log_probs[:, -1]).all() and torch.isfinite(traj.log_probs[:, :-1]).all()
    with pytest.raises(ValueError, match="std = 0"):
        step_log_prob(model, traj.latents[-2], traj.latents[-1], 0, labels, prev_t=-1, eta=1.0)
    _, traj = sample(model, labels, 3, "ddim", eta=0.0, generator=gen(), shape=LATENT, return_trajectory=True)
    assert not traj.stochastic.any()
    with pytest.raises(ValueError, match="eta"):
        step_log_prob(model, traj.latents[0], traj.latents[1], 999, labels, num_steps=3)


def test_gaussian_kl_closed_form():
    a, b, std = torch.randn(2, *LATENT), torch.randn(2, *LATENT), torch.full((2, 1, 1, 1, 1), 0.3)
    expected = kl_divergence(Normal(a, std.expand_as(a)), Normal(b, std.expand_as(b))).mean(DIMS)
    assert torch.allclose(gaussian_kl(a, b, std), expected)
    assert torch.equal(gaussian_kl(a, a, std), torch.zeros(2))
    with pytest.raises(ValueError, match="std = 0"):
        gaussian_kl(a, b, torch.zeros_like(std))


# ------------------------------------------------------------------------------------------ sampling


def test_sampling_reproducible_and_seed_dependent(model, labels):
    for sampler, eta in (("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)):
        first = sample(model, labels, 3, sampler, eta, gen(1), LATENT)
        assert torch.equal(first, sample(model, labels, 3, sampler, eta, gen(1), LATENT))
        assert not torch.allclose(first, sample(model, labels, 3, sampler, eta, gen(2), LATENT))
        assert first.shape == (2, *LATENT) and first.dtype == torch.float32 and torch.isfinite(first).all()


def test_class_conditioning_changes_output(model):
    noise = torch.randn(1, *LATENT, generator=gen())
    x0 = sample(model, torch.tensor([0]), 3, noise=noise)
    x1 = sample(model, torch.tensor([1]), 3, noise=noise)
    assert (x0 - x1).abs().max() > 1e-3


def test_prediction_types_both_sample(labels):
    noise = torch.randn(2, *LATENT, generator=gen())
    eps = sample(tiny_denoiser("epsilon"), labels, 3, noise=noise)
    v = sample(tiny_denoiser("v_prediction"), labels, 3, noise=noise)
    assert torch.isfinite(eps).all() and torch.isfinite(v).all() and not torch.allclose(eps, v)


def test_classifier_free_guidance(labels):
    model = tiny_denoiser(cfg=True)
    x, t = torch.randn(2, *LATENT, generator=gen()), 500
    cond, uncond = model(x, t, labels), model(x, t, torch.full_like(labels, model.null_label))
    assert torch.equal(model.predict(x, t, labels, 1.0), cond)
    assert torch.allclose(model.predict(x, t, labels, 0.0), uncond, atol=1e-5)  # batch 2B vs B kernels
    assert torch.allclose(model.predict(x, t, labels, 2.0), 2 * cond - uncond, atol=1e-5)
    noise = torch.randn(2, *LATENT, generator=gen())
    guided = sample(model, labels, 3, noise=noise, guidance_scale=1.0)
    assert torch.equal(guided, sample(model, labels, 3, noise=noise))
    assert not torch.allclose(guided, sample(model, labels, 3, noise=noise, guidance_scale=3.0))
    with pytest.raises(ValueError, match="classifier_free_guidance"):
        tiny_denoiser().predict(x, t, labels, 2.0)


def test_ddpm_with_few_steps(model, labels):
    x, traj = sample(model, labels, 10, "ddpm", generator=gen(), shape=LATENT, return_trajectory=True)
    assert torch.isfinite(x).all() and len(traj.latents) == 11
    assert traj.stochastic[:-1].all() and not traj.stochastic[-1]
    assert not torch.allclose(x, sample(model, labels, 10, "ddim", generator=gen(), shape=LATENT))


def test_dtype_and_attention():
    model = tiny_denoiser(attention=True).double()
    out = sample(model, torch.tensor([1]), 2, generator=gen(), shape=LATENT)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    model = model.to(torch.bfloat16)  # the network runs in bf16, the latent chain stays float32
    out = sample(model, torch.tensor([1]), 2, generator=gen(), shape=LATENT)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------- noised reconstruction


def test_noised_reconstruction_t0_is_identity(model, labels):
    latents = torch.randn(2, *LATENT)
    assert torch.equal(noised_reconstruction(model, latents, labels, 0, 10, generator=gen()), latents)


def test_noised_reconstruction_full_t_starts_from_noise(model, labels):
    latents = torch.randn(2, *LATENT, generator=gen(9))
    _, traj = noised_reconstruction(
        model, latents, labels, 4, 4, eta=1.0, generator=gen(), return_trajectory=True
    )
    assert int(traj.timesteps[0]) == 999 and traj.num_steps == 4
    start = traj.latents[0]
    corr = torch.corrcoef(torch.stack([start.flatten(), latents.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.06
    assert abs(float(start.std()) - 1.0) < 0.05


def test_noised_reconstruction_starts_where_the_sampler_would_be(model, labels):
    latents, noise, n, t = torch.randn(2, *LATENT), torch.randn(2, *LATENT), 10, 3
    _, traj = noised_reconstruction(model, latents, labels, t, n, noise=noise, return_trajectory=True)
    assert torch.equal(traj.timesteps, model.schedule.timesteps(n)[n - t :])
    assert torch.equal(traj.latents[0], model.schedule.add_noise(latents, noise, int(traj.timesteps[0])))
    one_step = noised_reconstruction(model, latents, labels, 1, n, generator=gen())
    assert (one_step - latents).abs().max() < 0.1  # t = 1: alpha_cumprod(0) ~ 1, almost the input


# ----------------------------------------------------------------------------------------- latent scale


def test_latent_moments_combine_across_ranks():
    latents = 3.0 * torch.randn(10, 4, 4, 4, 4, generator=gen()) + 0.5
    ranks = [latents[:3], latents[3:4], latents[4:]]  # unequal shards, as with DDP's last batch
    moments = sum(latent_moments(shard) for shard in ranks)  # what all_reduce(SUM) computes
    assert torch.allclose(moments, latent_moments(latents))
    expected_std = latents.double().std(unbiased=False).item()
    assert std_from_moments(moments) == pytest.approx(expected_std, rel=1e-9)
    assert scale_factor_from_moments(moments) == pytest.approx(1.0 / expected_std, rel=1e-9)
    with pytest.raises(ValueError, match="std"):
        scale_factor_from_moments(latent_moments(torch.ones(8)))


def test_drop_labels():
    model = tiny_denoiser(cfg=True)
    labels = torch.zeros(1000, dtype=torch.long)
    dropped = model.drop_labels(labels, 0.3, gen())
    assert set(dropped.unique().tolist()) == {0, model.null_label}
    assert 0.25 < (dropped == model.null_label).float().mean() < 0.35
    assert torch.equal(model.drop_labels(labels, 0.0), labels)

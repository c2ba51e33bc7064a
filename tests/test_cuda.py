"""Mixed precision and CUDA correctness: bf16 autocast stays out of the quantiser's distances and the
sampler's log-prob arithmetic (float32), the rollout log-prob ratio is 1, samples follow the seed.

The CUDA tests skip without a GPU (they run in the GPU check's window: ``benchmarks/gpu_check.sh`` runs this
file first). The CPU tests run everywhere with ``torch.autocast('cpu', dtype=torch.bfloat16)``, which lowers
the same matrix products to bf16, so a regression is caught without a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import tiny_checkpoints

from mrrl.diffusion.sampling import sample, step_log_prob, step_mean_std
from mrrl.diffusion.schedules import DiffusionSchedule
from mrrl.diffusion.unet import build_denoiser
from mrrl.vqgan.quantizer import VectorQuantizerEMA, nearest_codes

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU (no device here); run in a GPU window: benchmarks/gpu_check.sh"
)
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
CLASSES = ["HGG", "LGG"]


def bf16(device: str):
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


@contextlib.contextmanager
def deterministic_cudnn():
    """cuDNN picks algorithms per run unless told not to: bitwise comparisons need fixed ones."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def tiny_denoiser(device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_denoiser(
        4,
        2,
        DiffusionSchedule(steps_offset=1, set_alpha_to_one=False),
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=8,
    )
    with torch.no_grad():  # MONAI zero-initialises the output conv: an untrained model would ignore x_t
        for param in model.parameters():
            if param.abs().sum() == 0:
                param.normal_(0, 0.02)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------- quantiser


def close_call_codes(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and codes far from the origin: the bf16 cross term ``x·e`` loses the digits that decide."""
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(64, 8, generator=gen) + 3.0
    flat = torch.randn(512, 8, generator=gen) + 3.0
    return flat.to(device), codebook.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_codes_ignore_bf16_autocast(device: str) -> None:
    flat, codebook = close_call_codes(device)
    reference = nearest_codes(flat, codebook, chunk_size=100)
    with bf16(device):
        assert torch.equal(nearest_codes(flat, codebook, chunk_size=100), reference)
    # the same search on bf16 inputs: upcast, not rounded further
    halves = nearest_codes(flat.bfloat16(), codebook, chunk_size=100)
    assert torch.equal(halves, nearest_codes(flat.bfloat16().float(), codebook, chunk_size=100))


@pytest.mark.parametrize("device", DEVICES)
def test_quantiser_runs_in_float32_under_autocast(device: str) -> None:
    flat, codebook = close_call_codes(device)
    quantizer = VectorQuantizerEMA(64, 8, dead_code_threshold=0.0).to(device).eval()
    quantizer.embedding.copy_(codebook)
    z = flat.reshape(8, 4, 4, 4, 8).movedim(-1, 1).contiguous()  # [B, D, 4, 4, 4]
    reference = quantizer(z, update=False)
    with bf16(device):
        out = quantizer(z.bfloat16(), update=False)  # an encoder under autocast hands over bf16
    assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32
    expected = nearest_codes(z.bfloat16().float().movedim(1, -1).reshape(-1, 8), codebook, 32768)
    assert torch.equal(out.indices.flatten(), expected)
    assert (out.indices == reference.indices).float().mean() > 0.9  # the input rounding moves few codes


# ------------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("device", DEVICES)
def test_step_mean_is_float32_from_a_bf16_model_output(device: str) -> None:
    schedule = DiffusionSchedule(steps_offset=1, set_alpha_to_one=False)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 4, 4, 4, generator=gen).to(device)
    output = torch.randn(2, 4, 4, 4, 4, generator=gen).to(device)
    t, prev_t = torch.tensor([500, 500]), torch.tensor([480, 480])
    up = output.bfloat16().float()
    reference, std_ref = step_mean_std(schedule, up, x_t, t, prev_t, "ddim", 1.0)
    rounded, _ = step_mean_std(schedule, up, x_t.bfloat16().float(), t, prev_t, "ddim", 1.0)
    with bf16(device):
        mean, std = step_mean_std(schedule, output.bfloat16(), x_t, t, prev_t, "ddim", 1.0)
        mean_b, _ = step_mean_std(schedule, output.bfloat16(), x_t.bfloat16(), t, prev_t, "ddim", 1.0)
    assert mean.dtype == torch.float32 and torch.equal(mean, reference) and torch.equal(std, std_ref)
    # a bf16 chain (a rounded buffer) is upcast and computed in float32, not kept in bf16
    assert mean_b.dtype == torch.float32 and torch.equal(mean_b, rounded)


def rollout_and_recompute(device: str, autocast: bool, batch: int = 4, steps: int = 4):
    """A recorded DDIM (eta 1) trajectory and each step's log-prob recomputed on the same model and batch."""
    model = tiny_denoiser(device)
    labels = torch.tensor([0, 1] * (batch // 2), device=device)
    context = bf16(device) if autocast else contextlib.nullcontext()
    with context:
        _, trajectory = sample(
            model,
            labels,
            steps,
            "ddim",
            eta=1.0,
            generator=torch.Generator(device=device).manual_seed(0),
            shape=(4, 4, 4, 4),
            return_trajectory=True,
        )
        recomputed = []
        with torch.no_grad():
            for j in range(trajectory.num_steps):
                step = step_log_prob(
                    model,
                    trajectory.latents[j],
                    trajectory.latents[j + 1],
                    int(trajectory.timesteps[j]),
                    labels,
                    prev_t=int(trajectory.prev_timesteps[j]),
                    sampler="ddim",
                    eta=1.0,
                )
                recomputed.append(step.log_prob)
    return trajectory, torch.stack(recomputed, dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_recomputed_log_probs_give_ratio_one(device: str, autocast: bool) -> None:
    with deterministic_cudnn():
        trajectory, recomputed = rollout_and_recompute(device, autocast)
    assert trajectory.log_probs.dtype == torch.float32 and recomputed.dtype == torch.float32
    assert all(x.dtype == torch.float32 for x in trajectory.latents)
    ratio = torch.exp(recomputed - trajectory.log_probs)
    assert torch.equal(ratio, torch.ones_like(ratio)), (ratio - 1).abs().max()


# ------------------------------------------------------------------------------------- PPO, seeds, VQGAN


def ppo_rollout(device: str, autocast: bool, tmp_path):
    """PPOModule's own rollout on ``device`` (its decode and reward included), clip range 1e-4 (DDPO)."""
    from test_ppo import mean_intensity_reward, ppo_cfg

    from mrrl.ppo.module import PPOModule

    ckpts = tiny_checkpoints(tmp_path, CLASSES)
    module = PPOModule(ckpts["diffusion"], ckpts["vqgan"], CLASSES, ppo_cfg(train={"clip_range": 1e-4}))
    module.reward_fn = mean_intensity_reward
    module = module.to(device)
    context = bf16(device) if autocast else contextlib.nullcontext()
    with context:
        buffer = module.rollout()
    return module, buffer, context


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_ppo_rollout_ratio_is_one(device: str, autocast: bool, tmp_path) -> None:
    """The update's recomputed log-probs on the unchanged policy, whole rollout batch: ratio exactly 1."""
    with deterministic_cudnn():
        module, buffer, context = ppo_rollout(device, autocast, tmp_path)
        n, k = buffer["log_probs"].shape
        idx = torch.arange(n)
        with context:
            for j in range(k):
                _, kl, stats = module._step_terms(buffer, idx, j, torch.ones(n, device=device))
                assert float(stats["approx_kl"]) == 0.0 and float(stats["clip_fraction"]) == 0.0, (j, stats)
                assert float(kl.detach()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_ppo_minibatch_ratio_stays_inside_the_clip_range(device: str, autocast: bool, tmp_path) -> None:
    """A minibatch smaller than the rollout batch runs other kernels (cuDNN picks per shape): the ratio may
    move off 1 by rounding, but never by the clip range 1e-4, or every step would be clipped spuriously."""
    module, buffer, context = ppo_rollout(device, autocast, tmp_path)
    n, k = buffer["log_probs"].shape
    idx = torch.arange(n // 2)
    with context:
        for j in range(k):
            _, _, stats = module._step_terms(buffer, idx, j, torch.ones(len(idx), device=device))
            assert float(stats["clip_fraction"]) == 0.0, (j, stats)


@pytest.mark.parametrize("device", DEVICES)
def test_samples_are_reproducible_from_a_seed(device: str) -> None:
    model = tiny_denoiser(device)
    labels = torch.tensor([0, 1, 0, 1], device=device)

    def draw(seed: int, gen_device: str = device) -> torch.Tensor:
        with deterministic_cudnn(), bf16(device):
            return sample(
                model,
                labels,
                5,
                "ddim",
                eta=1.0,
                generator=torch.Generator(device=gen_device).manual_seed(seed),
                shape=(4, 4, 4, 4),
            )

    first, again, other = draw(0), draw(0), draw(1)
    assert first.device.type == device and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # a CPU generator drives sampling on any device (noise drawn on the CPU, then moved): also reproducible
    assert torch.equal(draw(0, "cpu"), draw(0, "cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_vqgan_under_bf16_autocast_picks_the_float32_codes(device: str) -> None:
    from mrrl.vqgan.networks import VQGAN

    torch.manual_seed(0)
    vqgan = VQGAN(channels=[8, 16], num_res_blocks=1, downsample_factor=4, codebook_size=32, codebook_dim=4)
    vqgan = vqgan.to(device).eval()
    x = torch.rand(2, 1, 16, 16, 16, device=device) * 2 - 1
    with torch.no_grad(), bf16(device):
        z_e = vqgan.encode_pre_quant(x)  # bf16 under autocast
        out = vqgan.quantize(z_e, update=False)
        volume = vqgan.decode(out.quantized)
    assert out.quantized.dtype == torch.float32 and torch.isfinite(volume).all()
    flat = z_e.float().movedim(1, -1).reshape(-1, z_e.shape[1])
    assert torch.equal(out.indices.flatten(), nearest_codes(flat, vqgan.quantizer.codebook.float(), 32768))

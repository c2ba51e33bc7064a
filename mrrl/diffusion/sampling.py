"""DDIM / DDPM samplers with per-step Gaussian log-probabilities, noised reconstruction, latent scaling.

Every reverse step is a Gaussian policy ``x_prev ~ N(mean(x_t, t), std_t^2 I)`` (DDPO):

* ``ddim``: mean = sqrt(a_s) x0 + sqrt(1 - a_s - std^2) eps, std = eta * sqrt((1-a_s)/(1-a_t) (1-a_t/a_s))
  (Song et al. eq. 12/16, identical to MONAI's ``DDIMScheduler.step``); eta = 0 is deterministic.
* ``ddpm``: the posterior q(x_s | x_t, x0) of the trained schedule over the sampler's timestep
  subsequence; with 1000 steps this is MONAI's ``DDPMScheduler.step`` (fixed_small variance).

where a = alpha_cumprod, t the current and s the landing timestep (the next timestep of the sampler's
sequence; -1 after the last step, i.e. the schedule's final alpha_cumprod).

The last step of a schedule with the default ``steps_offset=0`` goes from t = 0 to alpha_cumprod 1 and
has std = 0 for both samplers: it is deterministic and has no log-probability. Trajectories mark such
steps (``Trajectory.stochastic``) and ``step_log_prob`` raises on them; use
``schedule.replace(steps_offset=1, set_alpha_to_one=False)`` to make every step stochastic.

Randomness: every function takes a ``torch.Generator``; noise is drawn on the latents' device (a
generator on another device is used where it lives and the noise moved). Seeding generators
differently per DDP rank (e.g. ``seed + rank``) is the caller's job - equal seeds give equal samples
on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from mrrl.diffusion.schedules import DiffusionSchedule, expand_like
from mrrl.diffusion.unet import DenoiserModel

SAMPLERS = ("ddim", "ddpm")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepLogProb:
    """One reverse step under the sampler's Gaussian policy.

    ``log_prob`` is ``[B]`` (mean or sum over latent dims), ``mean`` has the latents' shape and ``std``
    is ``[B, 1, 1, 1, 1]`` (broadcastable against the latents).
    """

    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class Trajectory:
    """What a sampler did, step by step: everything PPO needs to recompute log-probs.

    Step i goes from ``latents[i]`` at ``timesteps[i]`` to ``latents[i + 1]`` at ``prev_timesteps[i]``
    (-1: past the last step). ``log_probs[:, i]`` is the step's log-prob (mean over latent dims), NaN
    where the step is deterministic (``stochastic[i]`` False, std = 0). ``sampler``, ``eta`` and
    ``guidance_scale`` are the settings to pass back to ``step_log_prob``.
    """

    latents: list[torch.Tensor]
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    log_probs: torch.Tensor
    stds: torch.Tensor
    labels: torch.Tensor
    sampler: str
    eta: float
    guidance_scale: float

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> torch.Tensor:
        """Bool ``[num_steps]``: steps with std > 0, the only ones with a log-probability."""
        return self.stds > 0

    def to(self, device: torch.device | str) -> Trajectory:
        """A copy on ``device`` (keep PPO rollout buffers on the CPU)."""
        return replace(
            self,
            latents=[x.to(device) for x in self.latents],
            log_probs=self.log_probs.to(device),
            labels=self.labels.to(device),
        )


# ----------------------------------------------------------------------------------------------- noise


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise on ``device``; drawn where the generator lives when that is another device."""
    device = torch.device(device)
    if generator is None or generator.device.type == device.type:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


# ------------------------------------------------------------------------------------ one reverse step


def _check_sampler(sampler: str, eta: float | None) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "ddim" and (eta is None or eta < 0):
        raise ValueError(f"DDIM needs eta >= 0, got {eta}")


def _alphas(
    schedule: DiffusionSchedule, t: int | torch.Tensor, prev_t: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    a_t, a_s = schedule.alpha_bar(t), schedule.alpha_bar(prev_t)
    if bool((a_s < a_t).any()):
        raise ValueError("prev_t must be a lower noise level than t (reverse steps only)")
    return a_t, a_s


def step_std(
    schedule: DiffusionSchedule,
    t: int | torch.Tensor,
    prev_t: int | torch.Tensor,
    sampler: str = "ddim",
    eta: float = 0.0,
) -> torch.Tensor:
    """Policy std of the step t -> prev_t (float64, CPU, scalar or ``[B]``); 0 means deterministic.

    Needs no model output, so callers can tell stochastic steps apart without touching the GPU.
    """
    _check_sampler(sampler, eta)
    a_t, a_s = _alphas(schedule, t, prev_t)
    std = ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)).sqrt()  # DDPM posterior std = DDIM eta=1
    return eta * std if sampler == "ddim" else std


def step_mean_std(
    schedule: DiffusionSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    prev_t: int | torch.Tensor,
    sampler: str = "ddim",
    eta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Gaussian reverse step x_t (at t) -> x_prev (at prev_t) for one model output.

    ``t`` and ``prev_t`` are scalars or per-sample ``[B]`` (CPU tensors avoid a device sync);
    coefficients are computed in float64 and cast to the working dtype: ``x_t``'s, but never below
    float32, with autocast off (a bf16 model output is upcast first), so the policy's mean and the
    log-probabilities built on it do not depend on the mixed-precision setting. Returns ``mean`` (shape
    of x_t) and ``std`` (``[B, 1, 1, 1, 1]``), both in the working dtype.
    """
    std = step_std(schedule, t, prev_t, sampler, eta)
    a_t, a_s = _alphas(schedule, t, prev_t)
    work = torch.promote_types(x_t.dtype, torch.float32)
    with torch.autocast(device_type=x_t.device.type, enabled=False):
        x_t, model_output = x_t.to(work), model_output.to(work)
        eps, x0 = schedule.eps_x0(model_output, x_t, t)
        if sampler == "ddim":
            direction = (1.0 - a_s - std**2).clamp(min=0.0).sqrt()
            mean = expand_like(a_s.sqrt(), x_t) * x0 + expand_like(direction, x_t) * eps
        else:
            x0_coef = a_s.sqrt() * (1.0 - a_t / a_s) / (1.0 - a_t)
            xt_coef = (a_t / a_s).sqrt() * (1.0 - a_s) / (1.0 - a_t)
            mean = expand_like(x0_coef, x_t) * x0 + expand_like(xt_coef, x_t) * x_t
    return mean, expand_like(std.expand(x_t.shape[0]), x_t)


def _reduce(values: torch.Tensor, reduce: str) -> torch.Tensor:
    dims = tuple(range(1, values.ndim))
    if reduce == "mean":
        return values.mean(dim=dims)
    if reduce == "sum":
        return values.sum(dim=dims)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def _check_std(std: torch.Tensor) -> None:
    if not bool((std > 0).all()):
        raise ValueError(
            "std = 0 at this step: the transition is deterministic and has no log-probability. This is the "
            "last step of a schedule with steps_offset=0 (or any DDIM step with eta=0); skip it "
            "(Trajectory.stochastic) or use schedule.replace(steps_offset=1, set_alpha_to_one=False) and eta > 0"
        )


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean"
) -> torch.Tensor:
    """log N(x; mean, std^2 I), ``[B]``, averaged (DDPO/PPO convention) or summed over latent dims.

    Computed in float32 or wider; raises when std = 0.
    """
    _check_std(std)
    return _log_prob(x, mean, std, reduce)


def _log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """The one implementation used by the sampler and ``step_log_prob`` alike (bitwise-equal ratios)."""
    work = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, mean, std = x.to(work), mean.to(work), std.to(work)
        log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
        return _reduce(log_prob, reduce)


def gaussian_kl(
    mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor, reduce: str = "mean"
) -> torch.Tensor:
    """KL(N(mean_a, std^2) || N(mean_b, std^2)) = |mean_a - mean_b|^2 / (2 std^2), reduced like log-probs.

    The closed-form per-step KL between the fine-tuned and the frozen reference policy.
    """
    _check_std(std)
    work = torch.promote_types(mean_a.dtype, torch.float32)
    with torch.autocast(device_type=mean_a.device.type, enabled=False):
        kl = (mean_a.to(work) - mean_b.to(work)) ** 2 / (2 * std.to(work) ** 2)
        return _reduce(kl, reduce)


def step_log_prob(
    model: DenoiserModel,
    x_t: torch.Tensor,
    x_prev: torch.Tensor,
    t: int | torch.Tensor,
    labels: torch.Tensor,
    *,
    prev_t: int | torch.Tensor | None = None,
    num_steps: int | None = None,
    sampler: str = "ddim",
    eta: float | None = None,
    guidance_scale: float = 1.0,
    reduce: str = "mean",
) -> StepLogProb:
    """Log-prob of the transition x_t -> x_prev under the model's sampler policy (differentiable).

    ``t`` / ``prev_t`` are scalars or per-sample ``[B]`` (PPO may shuffle steps across samples). Give
    ``prev_t`` (as recorded in ``Trajectory.prev_timesteps``) or ``num_steps`` to derive it. ``eta`` is
    required for DDIM. Raises on deterministic steps (std = 0). Called on an unchanged model with a
    trajectory's values it reproduces the sampler's log-prob bit for bit (deterministic kernels assumed).
    """
    _check_sampler(sampler, eta)
    if (prev_t is None) == (num_steps is None):
        raise ValueError("give exactly one of prev_t or num_steps")
    if prev_t is None:
        prev_t = model.schedule.prev_timestep(t, num_steps)
    eta = eta or 0.0
    _check_std(step_std(model.schedule, t, prev_t, sampler, eta))  # on the CPU: no device sync
    x_t = x_t.to(model.device)
    output = model.predict(x_t, t, labels, guidance_scale)
    mean, std = step_mean_std(model.schedule, output, x_t, t, prev_t, sampler, eta)
    log_prob = _log_prob(x_prev.to(mean.device, mean.dtype), mean, std, reduce)
    return StepLogProb(log_prob=log_prob, mean=mean, std=std)


# --------------------------------------------------------------------------------------------- loops


def _denoise(
    model: DenoiserModel,
    x: torch.Tensor,
    labels: torch.Tensor,
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    sampler: str,
    eta: float,
    generator: torch.Generator | None,
    guidance_scale: float,
    record: bool,
    round_to: torch.dtype | None = None,
) -> tuple[torch.Tensor, Trajectory | None]:
    """Run the reverse steps ``timesteps[i] -> prev_timesteps[i]`` from x; optionally record them.

    ``round_to``: every latent of the chain (x_T included) is rounded to this dtype and back before it is
    used, so a buffer stored in that dtype holds exactly the chain whose log-probs were recorded.
    """
    batch = x.shape[0]
    if round_to is not None:
        x = x.to(round_to).to(x.dtype)
    latents, log_probs, stds = [x], [], []
    for t, prev_t in zip(timesteps.tolist(), prev_timesteps.tolist()):
        # CPU timesteps and a CPU std: the loop never waits for the device
        t_vec, prev_vec = torch.full((batch,), t), torch.full((batch,), prev_t)
        std_t = float(step_std(model.schedule, t, prev_t, sampler, eta))
        output = model.predict(x, t_vec, labels, guidance_scale)
        mean, std = step_mean_std(model.schedule, output, x, t_vec, prev_vec, sampler, eta)
        x = mean + std * randn(tuple(x.shape), generator, x.device, x.dtype) if std_t > 0 else mean
        if round_to is not None:
            x = x.to(round_to).to(x.dtype)
        if record:
            nan = x.new_full((batch,), math.nan, dtype=torch.promote_types(x.dtype, torch.float32))
            log_probs.append(_log_prob(x, mean, std) if std_t > 0 else nan)
            stds.append(std_t)
            latents.append(x)
    if not record:
        return x, None
    trajectory = Trajectory(
        latents=latents,
        timesteps=timesteps.cpu(),
        prev_timesteps=prev_timesteps.cpu(),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else x.new_zeros((batch, 0)),
        stds=torch.tensor(stds, dtype=torch.float64),
        labels=labels,
        sampler=sampler,
        eta=eta,
        guidance_scale=guidance_scale,
    )
    return x, trajectory


def _initial_noise(
    model: DenoiserModel,
    batch: int,
    shape: tuple[int, ...] | None,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if noise is not None:
        if noise.shape[0] != batch:
            raise ValueError(f"noise has batch {noise.shape[0]}, labels have {batch}")
        return noise.to(model.device, model.latent_dtype)
    if shape is None:
        raise ValueError("give the per-sample latent shape (C, D, H, W) or the initial noise")
    return randn((batch, *shape), generator, model.device, model.latent_dtype)


@torch.no_grad()
def sample(
    model: DenoiserModel,
    labels: torch.Tensor,
    num_steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    shape: tuple[int, ...] | None = None,
    return_trajectory: bool = False,
    guidance_scale: float = 1.0,
    noise: torch.Tensor | None = None,
    round_to: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Trajectory]:
    """Generate latents for class ``labels`` (``[B]``) with ``num_steps`` DDIM or DDPM steps.

    Args:
        shape: per-sample latent shape ``(C, D, H, W)``; not needed when ``noise`` is given.
        noise: the initial x_T ``[B, C, D, H, W]``; drawn from ``generator`` otherwise (first draw).
        eta: DDIM stochasticity (0 deterministic, 1 as DDPO); ignored by DDPM.
        return_trajectory: also return the :class:`Trajectory` (latents kept on the model's device).
        round_to: round every latent of the chain to this dtype (and back) before it is used: PPO's
            low-precision rollout buffer then stores exactly what the log-probs were computed on.

    Runs under ``no_grad`` in the model's current mode (call ``model.eval()`` first); latents are on
    the model's device in float32 (or wider); use :func:`step_log_prob` for gradients.
    """
    _check_sampler(sampler, eta)
    labels = labels.to(model.device).long()
    x = _initial_noise(model, labels.shape[0], shape, noise, generator)
    timesteps = model.schedule.timesteps(num_steps)
    prev_timesteps = model.schedule.prev_timesteps(num_steps)
    x, trajectory = _denoise(
        model,
        x,
        labels,
        timesteps,
        prev_timesteps,
        sampler,
        eta,
        generator,
        guidance_scale,
        return_trajectory,
        round_to,
    )
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def noised_reconstruction(
    model: DenoiserModel,
    latents: torch.Tensor,
    labels: torch.Tensor,
    t: int,
    num_steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
    noise: torch.Tensor | None = None,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Trajectory]:
    """Noise clean latents forward to sampler step ``num_steps - t``, then denoise the last ``t`` steps.

    The forward noise brings the latents to the timestep a ``num_steps`` sampler would be at after
    ``num_steps - t`` of its steps (``schedule.timesteps(num_steps)[num_steps - t]``); the same sampler
    then runs its remaining ``t`` steps. ``t = 0`` returns the latents unchanged, ``t = num_steps``
    starts from the first (almost pure-noise) timestep. ``noise`` (the forward noise) is drawn from
    ``generator`` first when not given.
    """
    _check_sampler(sampler, eta)
    if not 0 <= t <= num_steps:
        raise ValueError(f"t must be in [0, num_steps={num_steps}], got {t}")
    labels = labels.to(model.device).long()
    x0 = latents.to(model.device, model.latent_dtype)
    start = num_steps - t
    timesteps = model.schedule.timesteps(num_steps)[start:]
    prev_timesteps = model.schedule.prev_timesteps(num_steps)[start:]
    if t == 0:
        x_start = x0.clone()
    else:
        noise = _initial_noise(model, x0.shape[0], tuple(x0.shape[1:]), noise, generator)
        x_start = model.schedule.add_noise(x0, noise, int(timesteps[0]))
    x, trajectory = _denoise(
        model,
        x_start,
        labels,
        timesteps,
        prev_timesteps,
        sampler,
        eta,
        generator,
        guidance_scale,
        return_trajectory,
    )
    return (x, trajectory) if return_trajectory else x


# ------------------------------------------------------------------------------------- latent scaling


def latent_moments(latents: torch.Tensor) -> torch.Tensor:
    """``[sum, sum of squares, count]`` of all latent values in float64, ready for ``all_reduce(SUM)``."""
    values = latents.detach().to(torch.float64)
    count = torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
    return torch.stack([values.sum(), (values**2).sum(), count])


def std_from_moments(moments: torch.Tensor) -> float:
    """Population standard deviation from summed ``latent_moments``."""
    total, total_sq, count = (float(v) for v in moments.to(torch.float64))
    if count <= 0:
        raise ValueError("no latent values to compute a standard deviation from")
    mean = total / count
    return math.sqrt(max(total_sq / count - mean**2, 0.0))


def scale_factor_from_moments(moments: torch.Tensor, eps: float = 1e-8) -> float:
    """The latent scale factor 1 / std (latents * scale have unit variance, as the sampler's noise)."""
    std = std_from_moments(moments)
    if std < eps:
        raise ValueError(f"latent std {std:.3g} is ~0: cannot compute a scale factor (collapsed latents?)")
    return 1.0 / std

"""Noise schedules: MONAI's DDPM training schedule plus the inference-time helpers the samplers need.

The training schedule (betas, alphas_cumprod, ``add_noise``) comes from MONAI's ``DDPMScheduler``;
what MONAI does not offer - arbitrary (t -> prev_t) transitions for DDIM/DDPM over a timestep
subsequence, log-probabilities - lives in :mod:`mrrl.diffusion.sampling` and uses this module.

Two MONAI behaviours are deliberately worked around here:

* MONAI clips the predicted x0 to [-1, 1] by default, which is wrong for latents, so the scheduler
  is always built with ``clip_sample=False`` and we never use its ``step``.
* ``Scheduler.add_noise`` re-assigns ``self.alphas_cumprod`` to the dtype of the samples it is
  called with (bf16 would permanently degrade it), so we keep our own float64 copy taken at
  construction and call ``add_noise`` in float32 or wider.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.schedulers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SCHEDULES = ("linear_beta", "scaled_linear_beta", "cosine", "sigmoid_beta")


def build_scheduler(
    num_train_timesteps: int = 1000,
    schedule: str = "linear_beta",
    prediction_type: str = "epsilon",
    **schedule_args: Any,
) -> DDPMScheduler:
    """MONAI ``DDPMScheduler`` for training; ``clip_sample`` is always off (latents are not in [-1, 1])."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        schedule=schedule,
        prediction_type=prediction_type,
        clip_sample=False,
        **schedule_args,
    )


def inference_timesteps(
    num_train_timesteps: int, num_steps: int, steps_offset: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Decreasing timesteps of a ``num_steps`` sampler, spaced exactly as MONAI's ``DDIMScheduler.set_timesteps``.

    ``linspace(T - 1 - offset, 0, num_steps).round() + offset``: starts at T - 1 (offset 0) and ends at
    ``steps_offset``. Raises when rounding would repeat a timestep (a zero-length step).
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if not 0 <= steps_offset < num_train_timesteps:
        raise ValueError(f"steps_offset must be in [0, {num_train_timesteps}), got {steps_offset}")
    start = num_train_timesteps - 1 - steps_offset
    timesteps = torch.linspace(start, 0, num_steps, device=device).round().long() + steps_offset
    if num_steps > 1 and not bool((timesteps[:-1] > timesteps[1:]).all()):
        raise ValueError(
            f"num_steps={num_steps} with steps_offset={steps_offset} repeats timesteps after rounding; "
            "use fewer steps or steps_offset=0"
        )
    return timesteps


def expand_like(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample (``[B]``) or scalar coefficients -> broadcastable against ``x`` on its device and dtype."""
    values = values.to(device=x.device, dtype=x.dtype)
    if values.ndim == 0:
        return values
    return values.reshape(-1, *([1] * (x.ndim - 1)))


def _as_long(t: int | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t).long().cpu()


class DiffusionSchedule:
    """The noise schedule of one diffusion model, shared by training, sampling and PPO.

    Args:
        num_train_timesteps: T, the number of training timesteps.
        schedule: MONAI noise schedule name (``linear_beta``, ``scaled_linear_beta``, ``cosine``, ...).
        prediction_type: what the network predicts: ``epsilon``, ``v_prediction`` or ``sample``.
        steps_offset: added to the inference timesteps (as MONAI/diffusers DDIM). With the default 0 the
            last sampler step goes from t = 0 to the clean sample and is deterministic (sigma = 0) for
            DDIM and DDPM alike; ``steps_offset=1`` with ``set_alpha_to_one=False`` (Stable Diffusion /
            DDPO convention) makes every step stochastic, so every step has a log-probability.
        set_alpha_to_one: alpha_cumprod "after" the last step: 1 (True) or alphas_cumprod[0] (False).
        schedule_args: passed to the MONAI schedule function (e.g. ``beta_start``, ``beta_end``).

    Timesteps below 0 (the sampler uses -1) mean "past the last step" and map to the final alpha_cumprod.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        prediction_type: str = "epsilon",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        **schedule_args: Any,
    ) -> None:
        self.scheduler = build_scheduler(num_train_timesteps, schedule, prediction_type, **schedule_args)
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.steps_offset = steps_offset
        self.set_alpha_to_one = set_alpha_to_one
        self._config = dict(
            num_train_timesteps=num_train_timesteps,
            schedule=schedule,
            prediction_type=prediction_type,
            steps_offset=steps_offset,
            set_alpha_to_one=set_alpha_to_one,
            **schedule_args,
        )
        self._alphas_cumprod = self.scheduler.alphas_cumprod.detach().to("cpu", torch.float64).clone()
        final = torch.ones((), dtype=torch.float64) if set_alpha_to_one else self._alphas_cumprod[0]
        self._final_alpha_cumprod = final.clone()

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this schedule (store them in checkpoints)."""
        return dict(self._config)

    def replace(self, **overrides: Any) -> DiffusionSchedule:
        """A copy with some settings changed, e.g. ``replace(steps_offset=1, set_alpha_to_one=False)``."""
        return DiffusionSchedule(**{**self._config, **overrides})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config.items())
        return f"DiffusionSchedule({args})"

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t for t = 0..T-1 (float64, CPU; a copy of MONAI's values)."""
        return self._alphas_cumprod

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        return self._final_alpha_cumprod

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        """alpha_bar at (scalar or per-sample) timesteps, float64 on CPU; t < 0 -> final alpha_cumprod."""
        t = _as_long(t)
        if bool((t >= self.num_train_timesteps).any()):
            raise ValueError(f"timesteps must be < {self.num_train_timesteps}, got max {int(t.max())}")
        values = self._alphas_cumprod[t.clamp(min=0)]
        return torch.where(t < 0, self._final_alpha_cumprod, values)

    def timesteps(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The ``num_steps`` decreasing sampler timesteps (MONAI DDIM spacing, with this schedule's offset)."""
        return inference_timesteps(self.num_train_timesteps, num_steps, self.steps_offset, device)

    def prev_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Where each sampler step lands: the next timestep of the sequence, -1 after the last one.

        Note: MONAI's ``DDIMScheduler.step`` instead lands on ``t - T // num_steps``, which differs by one
        timestep from the next element of its own linspace sequence for most ``num_steps``; we use the
        sequence so that the noise level a step produces is the one the model sees next.
        """
        timesteps = self.timesteps(num_steps, device)
        return torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])

    def prev_timestep(self, t: int | torch.Tensor, num_steps: int) -> torch.Tensor:
        """The landing timestep of the sampler step that starts at ``t`` in a ``num_steps`` sampler."""
        table = torch.full((self.num_train_timesteps,), -2, dtype=torch.long)
        table[self.timesteps(num_steps)] = self.prev_timesteps(num_steps)
        t = _as_long(t)
        prev = table[t.clamp(0, self.num_train_timesteps - 1)]
        if bool((prev == -2).any()) or bool((t < 0).any()):
            raise ValueError(f"timestep(s) {t.tolist()} are not steps of a {num_steps}-step sampler")
        return prev

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) via MONAI's ``add_noise``, computed in float32 or wider and returned in x0's dtype."""
        work = torch.promote_types(x0.dtype, torch.float32)
        t = torch.as_tensor(t, device=x0.device).long().expand(x0.shape[0])
        return self.scheduler.add_noise(x0.to(work), noise.to(work), t).to(x0.dtype)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """What the network should predict at (x0, noise, t) for this schedule's prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        work = torch.promote_types(x0.dtype, torch.float32)
        t = torch.as_tensor(t, device=x0.device).long().expand(x0.shape[0])
        return self.scheduler.get_velocity(x0.to(work), noise.to(work), t).to(x0.dtype)

    def eps_x0(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a model output at (x_t, t) to (predicted noise, predicted x0); never clipped."""
        alpha_bar = self.alpha_bar(t)
        sqrt_a = expand_like(alpha_bar.sqrt(), x_t)
        sqrt_1ma = expand_like((1.0 - alpha_bar).sqrt(), x_t)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - sqrt_1ma * eps) / sqrt_a
        elif self.prediction_type == "v_prediction":
            x0 = sqrt_a * x_t - sqrt_1ma * model_output
            eps = sqrt_a * model_output + sqrt_1ma * x_t
        else:  # "sample"
            x0 = model_output
            eps = (x_t - sqrt_a * x0) / sqrt_1ma
        return eps, x0

"""PPO's typed settings: one frozen dataclass per group of ``conf/stage/ppo.yaml`` (built with
:func:`mrrl.settings.from_config`; the YAML holds every default).

``PPOSettings`` is what :class:`~mrrl.ppo.module.PPOModule` reads; the stage's inputs (checkpoints, ``force``,
``speed``, ``trainer``) are read by the stage script. Values are checked here, where they enter, with errors
that name the config key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mrrl.errors import ConfigError

BUFFER_DTYPE_NAMES = ("float32", "bfloat16")
PROBE_SPLITS = ("val", "train")  # never "test": the test split is the headline evaluation's alone
PROBE_SELECT = ("kid", "fid")


@dataclass(frozen=True)
class SampleSettings:
    """``stage.sample``: the rollout sampler (what the policy is optimised on, recorded in ppo_final.ckpt)."""

    sampler: str
    num_steps: int  # K: sampler steps per rollout
    eta: float  # DDIM stochasticity, > 0 (the policy is Gaussian)
    batch_size: int  # volumes sampled per rank per iteration (class-balanced)
    buffer_dtype: str  # float32 | bfloat16: the rollout latents kept on the CPU
    decode_quantize: bool

    def __post_init__(self) -> None:
        if float(self.eta) <= 0:
            raise ConfigError(
                "stage.sample.eta must be > 0: PPO needs a stochastic sampler (DDIM with eta > 0)"
            )
        if self.buffer_dtype not in BUFFER_DTYPE_NAMES:
            raise ConfigError(
                f"stage.sample.buffer_dtype must be one of {sorted(BUFFER_DTYPE_NAMES)}, got {self.buffer_dtype!r}"
            )


@dataclass(frozen=True)
class KLSettings:
    """``stage.train.kl``: β of the per-step KL to the frozen pretrained policy, fixed or adaptive."""

    coef: float  # β (the starting β when adaptive)
    adaptive: bool
    target: float
    error_clip: float
    horizon: float


@dataclass(frozen=True)
class TrainSettings:
    """``stage.train``: the clipped-surrogate updates of one iteration and their optimiser."""

    lr: float
    betas: tuple[float, float] | list[float]
    weight_decay: float
    grad_clip: float | None  # null/0: no gradient clipping
    clip_range: float  # PPO ratio clip
    batch_size: int  # minibatch of trajectories per optimiser step
    inner_epochs: int  # passes over the rollout per iteration
    timestep_fraction: float  # fraction of the trained steps per minibatch (random subset)
    min_step_std: float  # steps with σ_t below this are not trained
    trainable: str | list[str]  # all | regexes over UNet parameter names
    kl: KLSettings


@dataclass(frozen=True)
class RewardSettings:
    """``stage.reward``: the multi-scale reward and the per-class normalisation of its advantages."""

    w3d: float
    w2d: float
    r3d_ckpt: str | list[str] | None  # null: the reward stage's manifest; a list: ensemble members
    r2d_ckpt: str | list[str] | None
    uncertainty_penalty: float  # λ of mean − λ·std over ensemble members
    stat_buffer: int  # recent rewards per class used for normalisation
    stat_min_count: int  # below this many, the gathered batch's statistics are used
    adv_clip: float  # advantages are clipped to ±adv_clip


@dataclass(frozen=True)
class ProbeSettings:
    """``stage.probe``: the held-out FID/KID probe and the best-on-validation checkpoint (0 = off)."""

    every: int
    n: int  # generated volumes per class per probe
    split: str  # val | train, never test
    extractor: str
    extractor_options: dict[str, Any]
    select: str  # kid | fid: the metric ppo_best.ckpt minimises

    def __post_init__(self) -> None:
        if self.split not in PROBE_SPLITS:
            raise ConfigError(
                f"stage.probe.split must be one of {PROBE_SPLITS} (the test split is for the final "
                f"evaluation only), got {self.split!r}"
            )
        if self.select not in PROBE_SELECT:
            raise ConfigError(f"stage.probe.select must be kid or fid, got {self.select!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.every) and int(self.every) > 0


@dataclass(frozen=True)
class FigureSettings:
    """``stage.figures``: sample slices logged every ``every`` iterations."""

    every: int
    volumes: int


@dataclass(frozen=True)
class PPOSettings:
    """Everything :class:`~mrrl.ppo.module.PPOModule` reads from ``stage=ppo``."""

    seed: int
    sample: SampleSettings
    train: TrainSettings
    reward: RewardSettings
    probe: ProbeSettings
    figures: FigureSettings


def ppo_settings(stage: Any) -> PPOSettings:
    """``PPOSettings`` from the composed ``cfg.stage`` of ``stage=ppo`` (every key required)."""
    from mrrl.settings import from_config

    return from_config(PPOSettings, stage, "stage")

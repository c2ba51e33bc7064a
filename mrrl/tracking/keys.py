"""What each stage sends to W&B, and the axis its curves are read against: the one list of key names.

Keys are templates: ``{cls}`` is a class name (HGG, LGG, AD, CN), ``{model}`` an evaluated row (``vqgan``,
``standard``, ``rl``), ``{reward}`` a PPO reward model (``total``, ``r3d``, ``r2d``), ``{trajectory}`` a reward
data trajectory (``synthetic``, ``reconstruction``, ``fade``). The helpers of :mod:`mrrl.tracking.wandb_run` build the
keys they log from these templates; the dashboard (:mod:`mrrl.dashboard.spec`) may only plot keys named here,
and the tests check that the stages really log them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Lightning's logging step: optimiser batches (the VQGAN's generator steps; the same for both optimisers).
STEP = "trainer/global_step"
PPO_ITERATION = "ppo/iteration"  # one PPO iteration = one rollout + update = one Lightning batch
SAMPLER_STEPS = "reward_data/steps"  # the sampler steps of a reward-data group (S or t)


@dataclass(frozen=True)
class StageKeys:
    """One stage's W&B keys: curves (against ``axis``), images, summary values and tables."""

    axis: str
    curves: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    summary: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    # Globs routed to ``axis`` with define_metric (Lightning routes everything else to trainer/global_step).
    axis_globs: tuple[str, ...] = field(default=())
    # Keys logged only when defined (e.g. the gap closed needs standard worse than the limit).
    optional: tuple[str, ...] = ()
    # Images logged during training, at the axis value of their scalars (False: one end-of-stage figure).
    images_on_axis: bool = True


STAGES: dict[str, StageKeys] = {
    "vqgan": StageKeys(
        axis=STEP,
        curves=(
            "train/loss",
            "train/l1",
            "val/l1",
            "val/psnr",
            "val/ssim",
            "val/codebook_usage",
            "val/perplexity",
        ),
        images=("val/reconstruction",),
        summary=("final/val/l1", "final/val/psnr", "final/val/ssim", "final/val/codebook_usage"),
    ),
    "diffusion": StageKeys(
        axis=STEP,
        curves=("train/loss", "val/loss", "val/loss_raw"),
        images=("val/samples",),
        summary=("final/global_step", "final/scale_factor"),
    ),
    "reward_data": StageKeys(
        axis=SAMPLER_STEPS,
        curves=(
            "reward_data/fid/{trajectory}/{cls}",
            "reward_data/reward/{trajectory}/{cls}",
            "reward_data/vqgan_limit/{cls}",
        ),
        images=("reward_data/fid_vs_steps",),
        summary=("reward_data/vqgan_limit/{cls}", "reward_data/num_volumes"),
        tables=("reward_data/groups",),
        axis_globs=("reward_data/fid/*", "reward_data/reward/*", "reward_data/vqgan_limit/*"),
        images_on_axis=False,
        optional=("reward_data/fid/fade/{cls}",),  # only with stage.fade_levels
    ),
    "reward": StageKeys(
        axis=STEP,
        curves=("train/loss", "val/mse", "val/spearman", "val/rank_acc"),
        summary=("final/val/mse", "final/val/spearman", "final/val/rank_acc", "final/train/spearman"),
        tables=("reward/scores",),
    ),
    "ppo": StageKeys(
        axis=PPO_ITERATION,
        curves=(
            "ppo/reward_mean",
            "ppo/kl",
            "ppo/approx_kl",
            "ppo/clip_fraction",
            "ppo/kl_coef",
            "ppo/policy_loss",
            "reward/{reward}_{cls}",
            "fid/{cls}",
            "kid/{cls}",
            "fid/mean",
            "kid/mean",
        ),
        images=("ppo/samples",),
        summary=("final/iterations", "final/probe/best_iteration", "final/probe/best_score"),
        axis_globs=("ppo/*", "reward/*", "fid/*", "kid/*", "probe/*"),
        optional=("reward/r3d_{cls}", "reward/r2d_{cls}"),  # absent at weight 0 (ablation_3d_only: w2d=0)
    ),
    "evaluate": StageKeys(
        axis=STEP,
        summary=(
            "evaluate/fid/{model}/{cls}",
            "evaluate/kid/{model}/{cls}",
            "evaluate/precision/{model}/{cls}",
            "evaluate/recall/{model}/{cls}",
            "evaluate/density/{model}/{cls}",
            "evaluate/coverage/{model}/{cls}",
            "evaluate/diversity/{model}/{cls}",
            "evaluate/gap_closed/{cls}",
        ),
        images=("evaluate/samples_{cls}",),
        tables=("evaluate/table2",),
        optional=(
            "evaluate/precision/{model}/{cls}",  # PRDC: with more volumes than stage.metrics.prdc_k
            "evaluate/recall/{model}/{cls}",
            "evaluate/density/{model}/{cls}",
            "evaluate/coverage/{model}/{cls}",
            "evaluate/gap_closed/{cls}",  # only where standard is worse than the VQGAN limit
        ),
        images_on_axis=False,
    ),
    "classify": StageKeys(
        axis=STEP,
        curves=("train/loss", "val/loss", "val/accuracy", "val/auc"),
        summary=("test/accuracy", "test/f1", "test/auc"),
    ),
}

CLASSIFY_FIELDS = ("protocol", "seed", "phase")  # config fields that tell classify's runs apart
REWARD_FIELDS = ("reward_model",)  # config field of the reward stage's one run per model

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def key_pattern(template: str) -> re.Pattern[str]:
    """A template as a regular expression: each ``{name}`` matches one key segment (no ``/``)."""
    parts = _PLACEHOLDER.split(template)
    regex = "".join(re.escape(p) if i % 2 == 0 else r"[^/]+?" for i, p in enumerate(parts))
    return re.compile(f"^{regex}$")


def matches(template: str, keys) -> list[str]:
    """The logged ``keys`` a template stands for."""
    pattern = key_pattern(template)
    return sorted(k for k in keys if pattern.match(k))


def expand(template: str, **values) -> list[str]:
    """Concrete keys of a template: every combination of the given values (lists) of its placeholders."""
    names = _PLACEHOLDER.findall(template)
    missing = [n for n in names if n not in values]
    if missing:
        raise KeyError(f"{template}: no values for {missing}")
    out = [template]
    for name in dict.fromkeys(names):
        out = [k.replace("{" + name + "}", str(v)) for k in out for v in values[name]]
    return out


def stage_keys(stage: str) -> StageKeys:
    if stage not in STAGES:
        raise KeyError(f"no W&B keys for stage {stage!r}; known: {', '.join(STAGES)}")
    return STAGES[stage]

"""The dashboard's panels, declared once: section, title, kind, the stage (job type) whose runs it shows, x
axis, and the key templates of :mod:`mrrl.tracking.keys` it plots. The builder turns this into W&B
panels; the tests check that every key here is one a stage logs."""

from __future__ import annotations

from dataclasses import dataclass, field

from mrrl.tracking.keys import PPO_ITERATION, SAMPLER_STEPS, STEP


@dataclass(frozen=True)
class Panel:
    section: str
    title: str
    kind: str  # line | bar | media | table
    stage: str  # the job type whose runs hold the keys
    keys: tuple[str, ...]
    x: str | None = None  # line panels: the axis
    group_by: tuple[str, ...] = field(default=())  # config fields W&B aggregates over (mean ± std)


KINDS = ("line", "bar", "media", "table")

PANELS: tuple[Panel, ...] = (
    # The paper's RL figure: held-out FID per class beside the learned reward per class, per PPO iteration.
    Panel("PPO", "Held-out FID per class", "line", "ppo", ("fid/{cls}", "fid/mean"), PPO_ITERATION),
    Panel("PPO", "Held-out KID per class", "line", "ppo", ("kid/{cls}", "kid/mean"), PPO_ITERATION),
    Panel("PPO", "Reward per class", "line", "ppo", ("reward/total_{cls}",), PPO_ITERATION),
    Panel(
        "PPO",
        "Reward per model and class",
        "line",
        "ppo",
        ("reward/r3d_{cls}", "reward/r2d_{cls}"),
        PPO_ITERATION,
    ),
    Panel("PPO", "KL to the pretrained model", "line", "ppo", ("ppo/kl", "ppo/approx_kl"), PPO_ITERATION),
    Panel("PPO", "Clip fraction", "line", "ppo", ("ppo/clip_fraction",), PPO_ITERATION),
    Panel("PPO", "PPO samples", "media", "ppo", ("ppo/samples",)),
    # Reward data: FID against sampler steps per trajectory (fade: % of contrast kept), with the VQGAN limit.
    Panel(
        "Reward data",
        "FID vs sampler steps",
        "line",
        "reward_data",
        (
            "reward_data/fid/synthetic/{cls}",
            "reward_data/fid/reconstruction/{cls}",
            "reward_data/fid/fade/{cls}",
            "reward_data/vqgan_limit/{cls}",
        ),
        SAMPLER_STEPS,
    ),
    Panel("Reward data", "Reward groups", "table", "reward_data", ("reward_data/groups",)),
    # Reward models: ranking accuracy (and friends) per model run.
    Panel("Reward models", "Ranking accuracy", "line", "reward", ("val/rank_acc",), STEP),
    Panel("Reward models", "Spearman", "line", "reward", ("val/spearman",), STEP),
    Panel(
        "Reward models",
        "Final reward-model metrics",
        "bar",
        "reward",
        ("final/val/rank_acc", "final/val/spearman", "final/val/mse"),
    ),
    # Table 2 and Table 3.
    Panel("Table 2", "Table 2 (FID/KID with intervals)", "table", "evaluate", ("evaluate/table2",)),
    Panel(
        "Table 2",
        "FID per model and class",
        "bar",
        "evaluate",
        ("evaluate/fid/{model}/{cls}", "evaluate/fid/{model}/All"),
    ),
    Panel(
        "Table 2",
        "Gap closed by RL (%)",
        "bar",
        "evaluate",
        ("evaluate/gap_closed/{cls}", "evaluate/gap_closed/All"),
    ),
    Panel(
        "Table 3",
        "Test scores per protocol (mean ± std over seeds)",
        "bar",
        "classify",
        ("test/accuracy", "test/f1", "test/auc"),
        group_by=("protocol",),
    ),
    # Sample grids and training curves.
    Panel("Samples", "VQGAN reconstructions", "media", "vqgan", ("val/reconstruction",)),
    Panel("Samples", "Diffusion samples", "media", "diffusion", ("val/samples",)),
    Panel("Samples", "Evaluation samples", "media", "evaluate", ("evaluate/samples_{cls}",)),
    Panel("Training", "VQGAN PSNR / SSIM", "line", "vqgan", ("val/psnr", "val/ssim"), STEP),
    Panel("Training", "VQGAN codebook usage", "line", "vqgan", ("val/codebook_usage",), STEP),
    Panel("Training", "Diffusion loss", "line", "diffusion", ("train/loss", "val/loss"), STEP),
)

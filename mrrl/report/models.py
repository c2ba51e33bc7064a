"""The models before RL: the VQGAN's reconstruction metrics, the diffusion model, the reward dataset (FID
and reward per group) and the reward models (MSE, Spearman, pairwise ranking accuracy of R3D and R2D)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mrrl.report.experiment import Context, stage_hint
from mrrl.utils.markdown import MISSING, fmt, fmt_fid, image, is_finite, md_table

VQGAN_METRICS = {
    "val/l1": ("L1", 4),
    "val/psnr": ("PSNR (dB)", 2),
    "val/ssim": ("SSIM", 4),
    "val/codebook_usage": ("codebook usage", 3),
    "val/perplexity": ("codebook perplexity", 1),
}
REWARD_MODELS = {"r3d": "R3D (3D CNN, whole volume)", "r2d": "R2D (2D CNN, axial slices)"}


def section_vqgan(ctx: Context) -> list[str]:
    lines: list[str] = []
    out = ctx.exp.outputs("vqgan")
    if out is None:
        return [stage_hint(ctx.exp, "vqgan")]
    val = out.get("val") or {}
    known = [
        (label, fmt(val.get(key), digits)) for key, (label, digits) in VQGAN_METRICS.items() if key in val
    ]
    other = [(key, fmt(v, 4)) for key, v in val.items() if key not in VQGAN_METRICS]
    lines += md_table(["Metric", "Value"], known + other)
    facts = []
    if out.get("latent_shape"):
        facts.append(f"latent {' × '.join(str(s) for s in out['latent_shape'])}")
    if out.get("codebook_size"):
        facts.append(f"codebook {out['codebook_size']}")
    if out.get("best_ckpt"):
        facts.append(f"checkpoint `{out['best_ckpt']}`")
    if facts:
        lines += ["", "; ".join(facts) + "."]
    figures = sorted((ctx.exp.dir / "vqgan" / "figures").glob("*.png"))
    if figures:
        lines += ["", "Latest validation reconstruction (input beside reconstruction):", ""]
        lines += image(figures[-1], ctx.report_dir, "VQGAN reconstruction")
    return lines


def section_diffusion(ctx: Context) -> list[str]:
    lines: list[str] = []
    out = ctx.exp.outputs("diffusion")
    if out is None:
        return [stage_hint(ctx.exp, "diffusion")]
    sampling = out.get("sampling") or {}
    rows = [
        ["training steps", out.get("global_step", MISSING)],
        ["best val/loss (EMA)", fmt(out.get("val_loss"), 4)],
        ["latent shape", " × ".join(str(s) for s in out.get("latent_shape") or []) or MISSING],
        ["latent scale factor", fmt(out.get("scale_factor"), 4)],
    ]
    if out.get("prediction_type"):
        rows.append(["prediction type", out["prediction_type"]])
    if sampling:
        rows.append(["sampler", f"{sampling.get('sampler')}, {sampling.get('num_steps')} steps"])
    return lines + md_table(["", "Value"], rows)


def section_reward_data(ctx: Context) -> list[str]:
    lines: list[str] = []
    out = ctx.exp.outputs("reward_data")
    if out is None:
        return [stage_hint(ctx.exp, "reward_data")]
    rows = [
        [
            g.get("trajectory"),
            g.get("steps"),
            g.get("class"),
            g.get("count", MISSING),
            fmt_fid(g.get("fid")),
            fmt(g.get("reward")),
            fmt(g.get("seconds"), 1),
        ]
        for g in out.get("groups") or []
    ]
    lines += md_table(["Trajectory", "Steps", "Class", "Volumes", "FID", "Reward", "Time (s)"], rows)
    limits = out.get("vqgan_limit_fid") or {}
    if limits:
        parts = ", ".join(f"{c} {fmt_fid(v)}" for c, v in limits.items())
        lines += ["", f"VQGAN reconstruction limit (FID of the real volumes' reconstructions): {parts}."]
    extractor = out.get("extractor") or {}
    name = extractor.get("name") if isinstance(extractor, Mapping) else extractor
    total = f"{fmt(out.get('seconds'), 0)} s" if is_finite(out.get("seconds")) else MISSING
    lines += [
        "",
        f"{out.get('num_volumes', MISSING)} volumes in {total}; FID feature extractor `{name}`.",
        "",
    ]
    lines += image(ctx.exp.locate("reward_data", out.get("fid_plot")), ctx.report_dir, "FID vs steps")
    return lines


def section_reward_models(ctx: Context) -> list[str]:
    lines: list[str] = []
    out = ctx.exp.outputs("reward")
    if out is None:
        return [stage_hint(ctx.exp, "reward")]
    models = out.get("models") or {}
    rows = []
    for kind, result in models.items():
        for split in ("val", "train"):
            m = (result or {}).get(split) or {}
            if m:
                label = REWARD_MODELS.get(kind, kind)
                rows.append([label, (result or {}).get("arch", MISSING), split, *_reward_cells(m)])
    lines += md_table(["Model", "Arch", "Split", "MSE", "Spearman", "Ranking acc."], rows)
    split = out.get("split") or {}
    if split:
        lines += [
            "",
            f"Held-out split `{split.get('mode')}`: {split.get('num_train', MISSING)} training / "
            f"{split.get('num_val', MISSING)} validation volumes. Ranking accuracy: share of volume pairs "
            "from different groups ordered as their rewards.",
        ]
    for kind, result in models.items():
        plot = ctx.exp.locate("reward", (result or {}).get("group_plot"))
        lines += ["", *image(plot, ctx.report_dir, f"{kind} predicted vs true reward per group")]
    return lines


def _reward_cells(metrics: Mapping[str, Any]) -> list[str]:
    return [fmt(metrics.get("mse"), 4), fmt(metrics.get("spearman")), fmt(metrics.get("rank_acc"))]

"""PPO fine-tuning: its settings, first/last values of every logged curve, and the curves' figure, plotted
from the CSV log (of the finished run, else of the run still in progress)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mrrl.report.experiment import PPO_FIGURE, Context, Experiment, stage_hint
from mrrl.utils.io import read_metrics_csv
from mrrl.utils.markdown import MISSING, image, is_finite, md_table


def _ppo_log_dir(exp: Experiment) -> tuple[Path | None, bool]:
    """(log folder, finished): the manifest's CSV log, else the log of a run still in progress."""
    out = exp.outputs("ppo")
    if out is not None:
        csv_path = exp.locate("ppo", out.get("metrics_csv"))
        if csv_path is not None:
            return csv_path.parent, True
    log_dir = exp.dir / "ppo" / "logs"
    return (log_dir, out is not None) if any(log_dir.glob("metrics*.csv")) else (None, out is not None)


def ppo_series(rows: Sequence[Mapping[str, str]]) -> dict[str, list[tuple[float, float]]]:
    """``{column: [(iteration, value), ...]}`` of the numeric PPO columns (blank cells skipped).

    The x axis is ``ppo/iteration`` (one PPO iteration = one rollout + update), else the logged step.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        x = row.get("ppo/iteration")
        x = x if is_finite(x) else row.get("step")
        if not is_finite(x):
            continue
        for key, value in row.items():
            if key in ("step", "epoch", "ppo/iteration") or not is_finite(value):
                continue
            series.setdefault(key, []).append((float(x), float(value)))
    return series


def _class_columns(series: Mapping[str, Any], prefix: str) -> list[str]:
    return sorted(k for k in series if k.startswith(prefix) and not k.endswith("/mean"))


def plot_ppo_curves(series: Mapping[str, Sequence[tuple[float, float]]], path: Path) -> Path:
    """Reward per class (and the mean), KL to the pretrained model and, if logged, the FID probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward (total)", ["ppo/reward_mean", *_class_columns(series, "reward/total_")]),
        ("KL to the pretrained model", ["ppo/kl"]),
    ]
    fid = _class_columns(series, "fid/")
    if fid:
        panels.append(("FID probe", fid))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = series.get(key) or []
            if points:
                style = "o-" if title == "FID probe" else ("k--" if key == "ppo/reward_mean" else "-")
                label = (
                    "all classes"
                    if key == "ppo/reward_mean"
                    else key.split("/", 1)[-1].removeprefix("total_")
                )
                ax.plot(*zip(*points), style, label=label, lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _first_last(points: Sequence[tuple[float, float]] | None) -> list[str]:
    if not points:
        return [MISSING, MISSING]
    return [f"{points[0][1]:.4g}", f"{points[-1][1]:.4g}"]


def _ppo_settings(config: Mapping[str, Any]) -> str:
    """``Reward = 0.5·R3D + 0.5·R2D, KL coefficient 0.01, 50 sampler steps per rollout.`` (what is known).

    Reads the grouped ``stage.reward`` / ``stage.train.kl`` / ``stage.sample`` layout, and the flat keys of
    manifests written before the PPO config was grouped."""
    stage = config.get("stage") or {}
    reward = stage.get("reward") if isinstance(stage.get("reward"), Mapping) else stage
    kl = (stage.get("train") or {}).get("kl") or {}
    sample = stage.get("sample") or {}
    w3d, w2d = reward.get("w3d"), reward.get("w2d")
    kl_coef = kl.get("coef", stage.get("kl_coef"))
    num_steps = sample.get("num_steps", stage.get("num_steps"))
    parts = []
    if w3d is not None and w2d is not None:
        parts.append(f"Reward = {w3d}·R3D + {w2d}·R2D")
    if kl_coef is not None:
        parts.append(f"KL coefficient {kl_coef}")
    if num_steps is not None:
        parts.append(f"{num_steps} sampler steps per rollout")
    return ", ".join(parts) + "." if parts else ""


def section_ppo(ctx: Context) -> list[str]:
    lines: list[str] = []
    log_dir, finished = _ppo_log_dir(ctx.exp)
    out = ctx.exp.outputs("ppo") or {}
    if not finished:
        lines += [stage_hint(ctx.exp, "ppo")]
        if log_dir is None:
            return lines
        lines += ["", "The curves below come from the log of the unfinished run."]
    settings = _ppo_settings((ctx.exp.manifests.get("ppo") or {}).get("config") or {})
    if settings:
        lines += [settings, ""]
    if out:
        lines += [
            f"{out.get('iterations', MISSING)} iterations, {out.get('skipped_updates', 0)} skipped updates; "
            f"fine-tuned checkpoint `{out.get('final_ckpt') or out.get('best_ckpt')}`.",
            "",
        ]
    series = ppo_series(read_metrics_csv(log_dir)) if log_dir is not None else {}
    if not series:
        return lines + ["_No PPO metrics were logged (`logger=none`?)._"]
    keys = ["ppo/reward_mean", *_class_columns(series, "reward/"), "ppo/kl", *_class_columns(series, "fid/")]
    rows = [[f"`{k}`", *_first_last(series.get(k))] for k in keys if k in series]
    lines += md_table(["Metric", "First", "Last"], rows)
    figure = plot_ppo_curves(series, ctx.figure_dir / PPO_FIGURE)
    return lines + ["", *image(figure, ctx.report_dir, "PPO reward and KL")]

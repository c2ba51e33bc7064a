"""``python -m mrrl.report <experiment_dir>``: one Markdown report of everything an experiment produced.

:func:`write_report` reads the stage manifests under ``<experiment_dir>`` (never a checkpoint: it is fast
and needs no GPU) and writes ``<experiment_dir>/report.md`` with

* Table 1 (subjects per split and class), the VQGAN's reconstruction metrics, the diffusion model;
* the reward dataset (FID and reward per group, the FID-vs-steps plot) and the reward models (MSE,
  Spearman, pairwise ranking accuracy of R3D and R2D);
* PPO reward / KL (and FID-probe) curves, plotted from the CSV log into ``report_figures/ppo_curves.png``;
* Table 2 (FID per class of the VQGAN limit, the standard and the RL model per extractor, the gap closed by
  RL as computed by the evaluate stage), the mid-slice figures, Table 3 (classification mean ± std);
* Table 5 when ablation experiments (``ablation_*`` beside this one in the same run root, made from this
  experiment) exist: FID "All" and accuracy of the full framework and of every ablation.

Stages that have not run are named with the command that runs them; a partial experiment gives a partial
report. ``mrrl-pipeline`` writes the report after its last stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrrl.classify.report import fmt_difference
from mrrl.evaluation.tables import calibration_section, headline_section
from mrrl.utils.io import atomic_write_text, read_metrics_csv

REPORT_NAME = "report.md"
FIGURE_DIR = "report_figures"
PPO_FIGURE = "ppo_curves.png"
STAGES = ("check_data", "vqgan", "diffusion", "reward_data", "reward", "ppo", "evaluate", "classify")
# Stages an ablation takes from its base experiment when its config lists no pipeline stages.
BASE_STAGES = ("check_data", "vqgan", "diffusion")
KNOWN_ABLATIONS = {
    "ablation_sparse_steps": "Sparse steps (1, 50, 99)",
    "ablation_3d_only": "3D reward only (w2d = 0)",
}
ROW_LABELS = {"vqgan": "3D-VQGAN reconstruction (limit)", "standard": "Standard diffusion", "rl": "RL (ours)"}
SPLIT_LABELS = {"train": "Training", "val": "Validation", "test": "Testing", "total": "Total"}
VQGAN_METRICS = {
    "val/l1": ("L1", 4),
    "val/psnr": ("PSNR (dB)", 2),
    "val/ssim": ("SSIM", 4),
    "val/codebook_usage": ("codebook usage", 3),
    "val/perplexity": ("codebook perplexity", 1),
}
CLASSIFY_METRICS = (("accuracy", "Accuracy"), ("f1", "F1 score"), ("auc", "AUC"))
REWARD_MODELS = {"r3d": "R3D (3D CNN, whole volume)", "r2d": "R2D (2D CNN, axial slices)"}

# The paper's published numbers, for reference beside ours (its FID feature extractor differs from ours:
# compare the gap closed by RL and the orderings, not the values).
PAPER_TABLE2 = {
    "brats2019": {
        "classes": ("HGG", "LGG", "All"),
        "vqgan": (25.82, 35.14, 24.64),
        "standard": (53.98, 62.28, 50.38),
        "rl": (40.11, 51.86, 38.05),
    },
    "oasis1": {
        "classes": ("AD", "CN", "All"),
        "vqgan": (33.81, 30.51, 29.42),
        "standard": (68.21, 60.70, 57.45),
        "rl": (61.88, 55.84, 52.92),
    },
}
PAPER_TABLE3 = {  # (accuracy, F1, AUC), each (mean, std)
    "brats2019": {
        "real": ((0.59, 0.07), (0.67, 0.04), (0.65, 0.07)),
        "standard": ((0.62, 0.05), (0.68, 0.04), (0.65, 0.08)),
        "rl": ((0.71, 0.02), (0.71, 0.01), (0.74, 0.03)),
    },
    "oasis1": {
        "real": ((0.76, 0.03), (0.75, 0.04), (0.81, 0.01)),
        "standard": ((0.77, 0.03), (0.75, 0.03), (0.80, 0.02)),
        "rl": ((0.78, 0.04), (0.77, 0.03), (0.86, 0.06)),
    },
}
PAPER_TABLE5 = (  # BraTS 2019: (configuration, FID All, accuracy)
    ("Full framework", 38.05, 0.71),
    ("Sparse steps (1, 50, 99)", 47.05, 0.67),
    ("3D reward only", 43.92, 0.69),
)


# ---------------------------------------------------------------------------------------------- experiment


@dataclass
class Experiment:
    """The finished stage manifests of one experiment folder, and why the others are absent."""

    dir: Path
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, experiment_dir: str | Path) -> Experiment:
        exp = cls(Path(experiment_dir))
        for stage in STAGES:
            manifest, problem = _load_manifest(exp.dir / stage / "manifest.json")
            if manifest is not None:
                exp.manifests[stage] = manifest
            else:
                exp.problems[stage] = problem
        return exp

    def outputs(self, stage: str) -> dict[str, Any] | None:
        manifest = self.manifests.get(stage)
        return None if manifest is None else dict(manifest.get("outputs") or {})

    @property
    def config(self) -> dict[str, Any]:
        """The composed config of the first stage that saved one (every stage shares the top-level keys)."""
        return next((m["config"] for m in self.manifests.values() if isinstance(m.get("config"), dict)), {})

    @property
    def name(self) -> str:
        return str(self.config.get("experiment_name") or self.dir.name)

    @property
    def selector(self) -> str:
        """The command-line argument that selects this experiment: ``experiment=<name>`` when a config of
        that name exists, else ``experiment_name=<name> …`` (with the overrides the run was started with)."""
        from mrrl.cli import CONFIG_DIR

        if (Path(CONFIG_DIR) / "experiment" / f"{self.name}.yaml").is_file():
            return f"experiment={self.name}"
        return f"experiment_name={self.name} <the run's other overrides>"

    @property
    def dataset(self) -> str | None:
        data = self.config.get("data") or {}
        summary = self.outputs("check_data") or (self.outputs("vqgan") or {}).get("data") or {}
        return data.get("name") or summary.get("dataset")

    @property
    def base_experiment(self) -> str | None:
        """For an ablation: the experiment whose VQGAN / diffusion model it reuses."""
        return (self.config.get("ablation") or {}).get("base_experiment")

    def shared(self, stage: str) -> bool:
        """An ablation's stage it does not run itself but takes from its base experiment."""
        if not self.base_experiment:
            return False
        own = (self.config.get("pipeline") or {}).get("stages")
        return stage not in own if own else stage in BASE_STAGES

    def locate(self, stage: str, path: str | None) -> Path | None:
        """A file a manifest names (stored absolute), looked up inside this folder first, so a copied or
        moved experiment links its own files; else the stored path if it still exists."""
        if not path:
            return None
        stored = Path(path)
        run_dir = (self.manifests.get(stage) or {}).get("run_dir")
        if run_dir:
            try:
                inside = self.dir / stage / stored.relative_to(run_dir)
            except ValueError:
                inside = None
            if inside is not None and inside.exists():
                return inside
        return stored if stored.exists() else None


def _load_manifest(path: Path) -> tuple[dict[str, Any] | None, str]:
    if not path.is_file():
        return None, "has not run"
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"has an unreadable manifest ({exc})"
    if payload.get("status") != "complete":
        return None, "did not finish"
    return payload, ""


# ---------------------------------------------------------------------------------------------- formatting


def _finite(value: Any) -> bool:
    try:
        return value is not None and value != "" and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def fmt(value: Any, digits: int = 3) -> str:
    """Fixed decimals; ``–`` for missing/NaN."""
    return f"{float(value):.{digits}f}" if _finite(value) else "–"


def fmt_fid(value: Any) -> str:
    """Four significant digits (FIDs range from 0.01 with random features to hundreds)."""
    return f"{float(value):.4g}" if _finite(value) else "–"


def fmt_pm(stats: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.710 ± 0.020`` (the mean alone when there is no std, e.g. one seed)."""
    stats = stats or {}
    mean, std = stats.get("mean"), stats.get("std")
    return f"{fmt(mean, digits)} ± {fmt(std, digits)}" if _finite(std) else fmt(mean, digits)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _link(path: Path | None, report_dir: Path) -> str | None:
    return None if path is None else Path(os.path.relpath(path, report_dir)).as_posix()


def _image(path: Path | None, report_dir: Path, alt: str) -> list[str]:
    rel = _link(path, report_dir)
    return [] if rel is None else [f"![{alt}]({rel})", ""]


def _stage_hint(exp: Experiment, stage: str) -> str:
    """Why a stage's section is empty and what produces it."""
    base = exp.base_experiment
    if exp.shared(stage):
        return (
            f"_`{stage}` is shared with the base experiment `{base}`: see "
            f"[its report](../{base}/{REPORT_NAME})._"
        )
    why = exp.problems.get(stage, "has not run")
    return (
        f"_Missing: the `{stage}` stage {why} — run `mrrl stage={stage} {exp.selector}` "
        f"(or `mrrl-pipeline {exp.selector}`, which runs every unfinished stage)._"
    )


# ---------------------------------------------------------------------------------------------- sections


@dataclass
class Context:
    exp: Experiment
    report_dir: Path
    figure_dir: Path
    ablations: dict[str, Experiment]


def section_overview(ctx: Context) -> list[str]:
    exp = ctx.exp
    lines = [f"# mrrl report: {exp.name}", ""]
    meta = [f"experiment folder `{exp.dir}`"]
    if exp.dataset:
        meta.append(f"dataset `{exp.dataset}`")
    if exp.base_experiment:
        meta.append(
            f"ablation of [`{exp.base_experiment}`](../{exp.base_experiment}/{REPORT_NAME}) "
            "(Table 5 there compares it with the full framework)"
        )
    lines += ["; ".join(meta) + f". Written {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    rows = []
    for stage in STAGES:
        manifest = exp.manifests.get(stage)
        shared = exp.shared(stage) and manifest is None
        status = "done" if manifest else (f"from `{exp.base_experiment}`" if shared else exp.problems[stage])
        rows.append([f"`{stage}`", status, (manifest or {}).get("finished_at", "")])
    lines += md_table(["Stage", "Status", "Finished"], rows)
    missing = [s for s in STAGES if s not in exp.manifests and not exp.shared(s)]
    if missing:
        lines += [
            "",
            f"Missing stages: {', '.join(f'`{s}`' for s in missing)} — "
            f"`mrrl-pipeline {exp.selector}` runs them (finished stages are skipped).",
        ]
    return lines


def _data_summary(exp: Experiment) -> dict[str, Any] | None:
    return exp.outputs("check_data") or (exp.outputs("vqgan") or {}).get("data")


def section_table1(ctx: Context) -> list[str]:
    lines: list[str] = []
    summary = _data_summary(ctx.exp)
    if not summary or "counts" not in summary:
        return [_stage_hint(ctx.exp, "check_data")]
    cols = [*summary.get("classes", []), "All"]
    rows = [
        [SPLIT_LABELS.get(split, split), *(counts.get(c, "–") for c in cols)]
        for split, counts in summary["counts"].items()
    ]
    lines += md_table(["Split", *cols], rows)
    shape = summary.get("image_shape") or []
    modalities = ", ".join(summary.get("modalities") or [])
    if shape:
        size = "×".join(str(s) for s in shape[1:])
        lines += [
            "",
            f"Dataset `{summary.get('dataset')}` ({modalities}), preprocessed to {shape[0]} × {size}.",
        ]
    if summary.get("split_file"):
        lines += [f"Split file: `{summary['split_file']}`."]
    return lines


def section_vqgan(ctx: Context) -> list[str]:
    lines: list[str] = []
    out = ctx.exp.outputs("vqgan")
    if out is None:
        return [_stage_hint(ctx.exp, "vqgan")]
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
        lines += _image(figures[-1], ctx.report_dir, "VQGAN reconstruction")
    return lines


def section_diffusion(ctx: Context) -> list[str]:
    lines: list[str] = []
    out = ctx.exp.outputs("diffusion")
    if out is None:
        return [_stage_hint(ctx.exp, "diffusion")]
    sampling = out.get("sampling") or {}
    rows = [
        ["training steps", out.get("global_step", "–")],
        ["best val/loss (EMA)", fmt(out.get("val_loss"), 4)],
        ["latent shape", " × ".join(str(s) for s in out.get("latent_shape") or []) or "–"],
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
        return [_stage_hint(ctx.exp, "reward_data")]
    rows = [
        [
            g.get("trajectory"),
            g.get("steps"),
            g.get("class"),
            g.get("count", "–"),
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
    total = f"{fmt(out.get('seconds'), 0)} s" if _finite(out.get("seconds")) else "–"
    lines += ["", f"{out.get('num_volumes', '–')} volumes in {total}; FID feature extractor `{name}`.", ""]
    lines += _image(ctx.exp.locate("reward_data", out.get("fid_plot")), ctx.report_dir, "FID vs steps")
    return lines


def section_reward_models(ctx: Context) -> list[str]:
    lines: list[str] = []
    out = ctx.exp.outputs("reward")
    if out is None:
        return [_stage_hint(ctx.exp, "reward")]
    models = out.get("models") or {}
    rows = []
    for kind, result in models.items():
        for split in ("val", "train"):
            m = (result or {}).get(split) or {}
            if m:
                label = REWARD_MODELS.get(kind, kind)
                rows.append([label, (result or {}).get("arch", "–"), split, *_reward_cells(m)])
    lines += md_table(["Model", "Arch", "Split", "MSE", "Spearman", "Ranking acc."], rows)
    split = out.get("split") or {}
    if split:
        lines += [
            "",
            f"Held-out split `{split.get('mode')}`: {split.get('num_train', '–')} training / "
            f"{split.get('num_val', '–')} validation volumes. Ranking accuracy: share of volume pairs from "
            "different groups ordered as their rewards.",
        ]
    for kind, result in models.items():
        plot = ctx.exp.locate("reward", (result or {}).get("group_plot"))
        lines += ["", *_image(plot, ctx.report_dir, f"{kind} predicted vs true reward per group")]
    return lines


def _reward_cells(metrics: Mapping[str, Any]) -> list[str]:
    return [fmt(metrics.get("mse"), 4), fmt(metrics.get("spearman")), fmt(metrics.get("rank_acc"))]


# ---------------------------------------------------------------------------------------------- PPO


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
        x = x if _finite(x) else row.get("step")
        if not _finite(x):
            continue
        for key, value in row.items():
            if key in ("step", "epoch", "ppo/iteration") or not _finite(value):
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
        return ["–", "–"]
    return [f"{points[0][1]:.4g}", f"{points[-1][1]:.4g}"]


def _ppo_settings(config: Mapping[str, Any]) -> str:
    """``Reward = 0.5·R3D + 0.5·R2D, KL coefficient 0.01, 50 sampler steps per rollout.`` (what is known)."""
    stage = config.get("stage") or {}
    parts = []
    if "w3d" in stage and "w2d" in stage:
        parts.append(f"Reward = {stage['w3d']}·R3D + {stage['w2d']}·R2D")
    if "kl_coef" in stage:
        parts.append(f"KL coefficient {stage['kl_coef']}")
    if "num_steps" in stage:
        parts.append(f"{stage['num_steps']} sampler steps per rollout")
    return ", ".join(parts) + "." if parts else ""


def section_ppo(ctx: Context) -> list[str]:
    lines: list[str] = []
    log_dir, finished = _ppo_log_dir(ctx.exp)
    out = ctx.exp.outputs("ppo") or {}
    if not finished:
        lines += [_stage_hint(ctx.exp, "ppo")]
        if log_dir is None:
            return lines
        lines += ["", "The curves below come from the log of the unfinished run."]
    settings = _ppo_settings((ctx.exp.manifests.get("ppo") or {}).get("config") or {})
    if settings:
        lines += [settings, ""]
    if out:
        lines += [
            f"{out.get('iterations', '–')} iterations, {out.get('skipped_updates', 0)} skipped updates; "
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
    return lines + ["", *_image(figure, ctx.report_dir, "PPO reward and KL")]


# ---------------------------------------------------------------------------------------------- Table 2


def _evaluate_results(exp: Experiment) -> dict[str, Any] | None:
    """evaluate's ``metrics.json`` (labels, classes, missing rows); its manifest's copy if the file is gone."""
    out = exp.outputs("evaluate")
    if out is None:
        return None
    path = exp.locate("evaluate", out.get("metrics_json"))
    if path is not None:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    return {
        "fid": out.get("fid") or {},
        "gap_closed": out.get("gap_closed") or {},
        "missing": out.get("missing"),
    }


def _fid_columns(results: Mapping[str, Any]) -> list[str]:
    if results.get("classes"):
        return [*results["classes"], "All"]
    cols: dict[str, None] = {}
    for per_model in (results.get("fid") or {}).values():
        for per_class in per_model.values():
            cols.update(dict.fromkeys(per_class))
    return [c for c in cols if c != "All"] + ["All"]


def _model_labels(results: Mapping[str, Any], keys: Iterable[str]) -> dict[str, str]:
    labels = {m["key"]: m.get("label", m["key"]) for m in results.get("models") or [] if "key" in m}
    return {k: ROW_LABELS.get(k, labels.get(k, k)) for k in keys}


def section_table2(ctx: Context) -> list[str]:
    lines: list[str] = []
    results = _evaluate_results(ctx.exp)
    if results is None:
        return [_stage_hint(ctx.exp, "evaluate")]
    cols = _fid_columns(results)
    lines += ["Reference: the real test split. FIDs compare only within one feature extractor.", ""]
    if results.get("intervals"):  # the headline numbers with intervals, the floor, premises and the ladder
        lines += [
            *headline_section(results, "###"),
            *calibration_section(results, "###"),
            "",
            "### Point values",
            "",
        ]
    for extractor, per_model in (results.get("fid") or {}).items():
        labels = _model_labels(results, per_model)
        rows = [[labels[k], *(fmt_fid(per_class.get(c)) for c in cols)] for k, per_class in per_model.items()]
        gap = (results.get("gap_closed") or {}).get(extractor)
        if gap:
            rows.append(["**Gap closed by RL**", *(_percent(gap.get(c)) for c in cols)])
        lines += [f"### Extractor `{extractor}`", "", *md_table(["Method", *cols], rows), ""]
    if results.get("missing"):
        lines += ["Rows not evaluated:", "", *(f"- {why}" for why in results["missing"].values()), ""]
    lines += _paper_table2(ctx.exp.dataset)
    table_md = ctx.exp.locate("evaluate", (ctx.exp.outputs("evaluate") or {}).get("table_md"))
    if table_md is not None:
        lines += [
            f"Precision/recall/density/coverage and diversity: [{table_md.name}]({_link(table_md, ctx.report_dir)})."
        ]
    return lines


def _percent(value: Any) -> str:
    return f"{float(value):.1f} %" if _finite(value) else "n/a"


def _gap(standard: float, rl: float, limit: float) -> float | None:
    return 100.0 * (standard - rl) / (standard - limit) if standard > limit else None


def _paper_table2(dataset: str | None) -> list[str]:
    paper = PAPER_TABLE2.get(dataset or "")
    if paper is None:
        return []
    cols = list(paper["classes"])
    rows = [[ROW_LABELS[k], *(fmt(v, 2) for v in paper[k])] for k in ("vqgan", "standard", "rl")]
    gaps = [_gap(s, r, v) for s, r, v in zip(paper["standard"], paper["rl"], paper["vqgan"])]
    rows.append(["Gap closed by RL", *(_percent(g) for g in gaps)])
    return [
        "Paper (Table 2), for reference — another feature extractor: compare the gap closed, not the values.",
        "",
        *md_table(["Method", *cols], rows),
        "",
    ]


def section_figures(ctx: Context) -> list[str]:
    lines: list[str] = []
    out = ctx.exp.outputs("evaluate")
    if out is None:
        return [_stage_hint(ctx.exp, "evaluate")]
    paths = [ctx.exp.locate("evaluate", p) for p in out.get("figures") or []]
    paths = [p for p in paths if p is not None]
    if not paths:
        return lines + ["_The evaluate stage wrote no figures._"]
    lines += [
        "Sagittal / coronal / axial mid-slices per class: real test volumes, then the VQGAN reconstruction, "
        "the standard and the RL model (rows in Table 2 order).",
        "",
    ]
    for path in paths:
        lines += _image(path, ctx.report_dir, path.stem.removeprefix("samples_"))
    return lines


# ---------------------------------------------------------------------------------------------- Table 3


def section_table3(ctx: Context) -> list[str]:
    lines: list[str] = []
    out = ctx.exp.outputs("classify")
    if out is None:
        return [_stage_hint(ctx.exp, "classify")]
    rows = [
        [
            p.get("label", key),
            len(p.get("per_seed") or {}),
            *(fmt_pm((p.get("metrics") or {}).get(m)) for m, _ in CLASSIFY_METRICS),
        ]
        for key, p in (out.get("protocols") or {}).items()
    ]
    lines += md_table(["Protocol", "Seeds", *(label for _, label in CLASSIFY_METRICS)], rows)
    if out.get("paired"):
        rows = [
            [
                pair["label"],
                pair["difference"]["accuracy"]["n_seeds"],
                *(
                    f"{fmt_difference(pair['difference'][m])} — {pair['verdict'][m]}"
                    for m, _ in CLASSIFY_METRICS
                ),
            ]
            for pair in out["paired"]
        ]
        lines += ["", "Paired differences (95 % bootstrap over seeds and test subjects):", ""]
        lines += md_table(["Difference", "Seeds", *(label for _, label in CLASSIFY_METRICS)], rows)
    if out.get("missing"):
        lines += ["", "Protocols not run:", "", *(f"- {why}" for why in out["missing"].values())]
    paper = PAPER_TABLE3.get(ctx.exp.dataset or "")
    if paper:
        labels = {"real": "Real data only", "standard": "Standard synthetic", "rl": "Ours"}
        rows = [[labels[k], *(f"{m:.2f} ± {s:.2f}" for m, s in v)] for k, v in paper.items()]
        lines += ["", "Paper (Table 3), for reference:", ""]
        lines += md_table(["Protocol", *(label for _, label in CLASSIFY_METRICS)], rows)
    return lines


# ---------------------------------------------------------------------------------------------- Table 5


def discover_ablations(experiment_dir: str | Path) -> dict[str, Path]:
    """``ablation_*`` folders beside ``experiment_dir`` made from it (their config's
    ``ablation.base_experiment``; folders whose manifests carry no config count when they hold any)."""
    exp = Experiment.load(experiment_dir)
    parent = exp.dir.resolve().parent
    known = list(KNOWN_ABLATIONS)
    candidates = [p for p in parent.glob("ablation_*") if p.is_dir() and p.resolve() != exp.dir.resolve()]
    found = {}
    for path in sorted(
        candidates, key=lambda p: (known.index(p.name) if p.name in known else len(known), p.name)
    ):
        ablation = Experiment.load(path)
        base = ablation.base_experiment
        if base == exp.name or (base is None and ablation.manifests):
            found[path.name] = path
    return found


def _ablation_label(name: str, exp: Experiment) -> str:
    return str((exp.config.get("ablation") or {}).get("label") or KNOWN_ABLATIONS.get(name, name))


def _rl_fid(exp: Experiment, extractor: str) -> Any:
    fid = (exp.outputs("evaluate") or {}).get("fid") or {}
    return ((fid.get(extractor) or {}).get("rl") or {}).get("All")


def _rl_accuracy(exp: Experiment) -> dict[str, Any] | None:
    protocols = (exp.outputs("classify") or {}).get("protocols") or {}
    return ((protocols.get("rl") or {}).get("metrics") or {}).get("accuracy")


def _rank_acc(exp: Experiment) -> str:
    out = exp.outputs("reward")
    if out is None:
        return "shared" if exp.shared("reward") else "–"
    return fmt((((out.get("models") or {}).get("r3d") or {}).get("val") or {}).get("rank_acc"))


def _reward_data_time(exp: Experiment, full_seconds: Any) -> str:
    out = exp.outputs("reward_data")
    if out is None:
        return "shared" if exp.shared("reward_data") else "–"
    seconds = out.get("seconds")
    if not _finite(seconds):
        return "–"
    text = f"{float(seconds):.0f} s"
    if _finite(full_seconds) and float(full_seconds) > 0 and exp.base_experiment:
        text += f" ({100.0 * (float(seconds) / float(full_seconds) - 1):+.0f} %)"
    return text


def _extractors(experiments: Iterable[Experiment]) -> list[str]:
    names: dict[str, None] = {}
    for exp in experiments:
        names.update(dict.fromkeys((exp.outputs("evaluate") or {}).get("fid") or {}))
    return list(names)


def section_table5(ctx: Context) -> list[str]:
    if not ctx.ablations:
        return []
    rows_exp = [("Full framework", ctx.exp), *((_ablation_label(n, e), e) for n, e in ctx.ablations.items())]
    extractors = _extractors(e for _, e in rows_exp)
    full_seconds = (ctx.exp.outputs("reward_data") or {}).get("seconds")
    header = [
        "Configuration",
        *(f"FID All ({x})" for x in extractors),
        "Accuracy",
        "R3D ranking acc.",
        "Reward-data time",
    ]
    rows = [
        [
            label,
            *(fmt_fid(_rl_fid(exp, x)) for x in extractors),
            fmt_pm(_rl_accuracy(exp)),
            _rank_acc(exp),
            _reward_data_time(exp, full_seconds),
        ]
        for label, exp in rows_exp
    ]
    lines = [
        "FID All and accuracy of the RL model of each configuration (accuracy: the RL-synthetic protocol, "
        'mean ± std over seeds); "shared": reused from the full framework.',
        "",
        *md_table(header, rows),
        "",
    ]
    for name, exp in ctx.ablations.items():
        line = f"- `{name}`: [report]({_link(exp.dir / REPORT_NAME, ctx.report_dir)}) (`{exp.dir}`)"
        missing = [s for s in STAGES if s in exp.problems and not exp.shared(s)]
        lines.append(line + (f"; not finished: {', '.join(f'`{s}`' for s in missing)}" if missing else ""))
    if ctx.exp.dataset == "brats2019":
        paper = [[c, fmt(f, 2), fmt(a, 2)] for c, f, a in PAPER_TABLE5]
        lines += ["", "Paper (Table 5, BraTS 2019), for reference:", ""]
        lines += md_table(["Configuration", "FID", "Accuracy"], paper)
    return lines


# ---------------------------------------------------------------------------------------------- report

# (heading, body); an empty body leaves the section out. The overview writes its own title.
SECTIONS: tuple[tuple[str | None, Callable[[Context], list[str]]], ...] = (
    (None, section_overview),
    ("Table 1: data splits", section_table1),
    ("VQGAN reconstruction (validation split, best checkpoint)", section_vqgan),
    ("Latent diffusion model", section_diffusion),
    ("Reward dataset: FID and reward per group", section_reward_data),
    ("Reward models", section_reward_models),
    ("PPO fine-tuning", section_ppo),
    ("Table 2: FID per class (lower is better)", section_table2),
    ("Mid-slice figures", section_figures),
    ("Table 3: downstream classification (mean ± std over seeds)", section_table3),
    ("Table 5: ablations", section_table5),
)


def _render(title: str | None, section: Callable[[Context], list[str]], ctx: Context) -> str:
    """A section's Markdown, or its heading and why it could not be rendered (a malformed manifest never
    stops the rest of the report)."""
    try:
        body = section(ctx)
    except Exception as exc:  # a report shows what it can
        body = [f"_Could not render this section: {type(exc).__name__}: {exc}_"]
    if not body:
        return ""
    return "\n".join([f"## {title}", "", *body] if title else body).strip()


def build_report(experiment_dir: str | Path, ablations: Mapping[str, str | Path] | None = None) -> str:
    """The Markdown text of :func:`write_report` (also writes the PPO figure)."""
    exp = Experiment.load(experiment_dir)
    if ablations is None:
        ablations = discover_ablations(exp.dir)
    ctx = Context(
        exp=exp,
        report_dir=exp.dir,
        figure_dir=exp.dir / FIGURE_DIR,
        ablations={name: Experiment.load(path) for name, path in ablations.items()},
    )
    lines: list[str] = []
    for title, section in SECTIONS:
        text = _render(title, section, ctx)
        if text:
            lines += [text, ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


def write_report(experiment_dir: str | Path, ablations: Mapping[str, str | Path] | None = None) -> Path:
    """Write ``<experiment_dir>/report.md`` (figures in ``report_figures/``) and return its path.

    ``ablations`` maps Table 5 row names to experiment folders; ``None`` finds the ``ablation_*`` folders
    beside ``experiment_dir`` that were made from it, ``{}`` leaves Table 5 out.
    """
    experiment_dir = Path(experiment_dir)
    return atomic_write_text(experiment_dir / REPORT_NAME, build_report(experiment_dir, ablations))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mrrl.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment_dir", help="e.g. runs/brats2019")
    parser.add_argument(
        "--ablation",
        action="append",
        metavar="NAME=DIR",
        help="a Table 5 row (repeatable); default: the ablation_* folders beside experiment_dir",
    )
    parser.add_argument("--no-ablations", action="store_true", help="leave Table 5 out")
    args = parser.parse_args(argv)
    ablations: dict[str, str] | None = None
    if args.no_ablations:
        ablations = {}
    elif args.ablation:
        bad = [a for a in args.ablation if "=" not in a]
        if bad:
            parser.error(f"--ablation takes NAME=DIR, got {bad[0]!r}")
        ablations = dict(a.split("=", 1) for a in args.ablation)
    if not Path(args.experiment_dir).is_dir():
        print(f"mrrl.report: no experiment folder at {args.experiment_dir}", file=sys.stderr)
        return 1
    print(write_report(args.experiment_dir, ablations))
    return 0


if __name__ == "__main__":
    sys.exit(main())

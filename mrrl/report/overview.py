"""The report's title, the status of every stage, and Table 1 (subjects per split and class)."""

from __future__ import annotations

import time

from mrrl.manifest import PIPELINE_STAGES
from mrrl.report.experiment import REPORT_NAME, Context, stage_hint
from mrrl.utils.markdown import MISSING, md_table

SPLIT_LABELS = {"train": "Training", "val": "Validation", "test": "Testing", "total": "Total"}


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
    for stage in PIPELINE_STAGES:
        manifest = exp.manifests.get(stage)
        shared = exp.shared(stage) and manifest is None
        status = "done" if manifest else (f"from `{exp.base_experiment}`" if shared else exp.problems[stage])
        rows.append([f"`{stage}`", status, (manifest or {}).get("finished_at", "")])
    lines += md_table(["Stage", "Status", "Finished"], rows)
    missing = exp.unfinished()
    if missing:
        lines += [
            "",
            f"Missing stages: {', '.join(f'`{s}`' for s in missing)} — "
            f"`mrrl-pipeline {exp.selector}` runs them (finished stages are skipped).",
        ]
    return lines


def section_table1(ctx: Context) -> list[str]:
    lines: list[str] = []
    summary = ctx.exp.data_summary
    if not summary or "counts" not in summary:
        return [stage_hint(ctx.exp, "check_data")]
    cols = [*summary.get("classes", []), "All"]
    rows = [
        [SPLIT_LABELS.get(split, split), *(counts.get(c, MISSING) for c in cols)]
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

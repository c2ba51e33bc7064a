"""Table 2 (FID per class of the VQGAN limit, the standard and the RL model, per feature extractor, and the
gap closed by RL as the evaluate stage computed it), the paper's Table 2, and the mid-slice figures."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import mrrl.report.paper as paper
from mrrl.evaluation.tables import calibration_section, headline_section
from mrrl.metrics.intervals import gap_share
from mrrl.report.experiment import Context, Experiment, stage_hint
from mrrl.utils.markdown import fmt, fmt_fid, image, md_table, percent, relative_link

# The rows as the paper names them.
ROW_LABELS = {"vqgan": "3D-VQGAN reconstruction (limit)", "standard": "Standard diffusion", "rl": "RL (ours)"}


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
        return [stage_hint(ctx.exp, "evaluate")]
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
            rows.append(["**Gap closed by RL**", *(percent(gap.get(c)) for c in cols)])
        lines += [f"### Extractor `{extractor}`", "", *md_table(["Method", *cols], rows), ""]
    if results.get("missing"):
        lines += ["Rows not evaluated:", "", *(f"- {why}" for why in results["missing"].values()), ""]
    lines += _paper_table2(ctx.exp.dataset)
    table_md = ctx.exp.locate("evaluate", (ctx.exp.outputs("evaluate") or {}).get("table_md"))
    if table_md is not None:
        link = relative_link(table_md, ctx.report_dir)
        lines += [f"Precision/recall/density/coverage and diversity: [{table_md.name}]({link})."]
    return lines


def _paper_table2(dataset: str | None) -> list[str]:
    published = paper.TABLE2.get(dataset or "")
    if published is None:
        return []
    cols = list(published["classes"])
    rows = [[ROW_LABELS[k], *(fmt(v, 2) for v in published[k])] for k in ("vqgan", "standard", "rl")]
    gaps = [gap_share(*v) for v in zip(published["standard"], published["rl"], published["vqgan"])]
    rows.append(["Gap closed by RL", *(percent(g) for g in gaps)])
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
        return [stage_hint(ctx.exp, "evaluate")]
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
        lines += image(path, ctx.report_dir, path.stem.removeprefix("samples_"))
    return lines

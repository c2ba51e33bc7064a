"""Table 2 as Markdown and CSV, and the mid-slice figures (real / reconstruction / standard / RL / extras).

``results`` is the dict the evaluate stage also writes to ``metrics.json``:
``classes``, ``models`` (ordered rows: ``key``, ``label``, ``n_per_class``, ``diversity``, ...),
``missing`` (``{row: reason}``), ``extractors`` (``name``, ``identity``), ``scores`` (one dict per model,
extractor and class with ``fid``, ``precision``, ``recall``, ``density``, ``coverage``), ``gap_closed``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mrrl.evaluation.scores import ALL
from mrrl.evaluation.sources import safe_name
from mrrl.metrics.intervals import gap_share
from mrrl.utils import markdown
from mrrl.utils.io import atomic_write_text
from mrrl.utils.markdown import md_table, percent

PRDC_KEYS = ("precision", "recall", "density", "coverage")


def columns(results: Mapping[str, Any]) -> list[str]:
    return [*results["classes"], ALL]


def score_lookup(results: Mapping[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """``(model key, extractor name, class) -> score row``."""
    return {(r["model"], r["extractor"], r["class"]): r for r in results["scores"]}


def gap_closed(fid: Mapping[str, Mapping[str, float]], cols: Sequence[str]) -> dict[str, float | None] | None:
    """Per column, 100·(FID_std − FID_rl)/(FID_std − FID_vqgan): the share of the fidelity gap between
    the standard model and the VQGAN limit that RL fine-tuning closed (None where the gap is not
    positive: the standard model already at or below the limit). None unless all three rows exist."""
    if not all(k in fid for k in ("vqgan", "standard", "rl")):
        return None
    out: dict[str, float | None] = {}
    for c in cols:
        values = (fid["standard"].get(c), fid["rl"].get(c), fid["vqgan"].get(c))
        share = math.nan if None in values else gap_share(*values)
        out[c] = share if math.isfinite(share) else None
    return out


def fmt(value: Any, digits: int = 3) -> str:
    """Table 2's numbers: fixed decimals, scientific below the last decimal (KID, PR/DC near 0)."""
    return markdown.fmt(value, digits, sci_small=True)


def fmt_est(est: Mapping[str, float] | None, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    """``0.412 [0.380, 0.455]``: a point value and its interval."""
    return markdown.fmt_interval(est, digits, scale=scale, unit=unit, sci_small=True)


KID_SCALE = 1000.0  # KID values are small: shown ×10³


def headline_section(results: Mapping[str, Any], heading: str = "##") -> list[str]:
    """FID and KID with intervals on the headline extractor, the gap closed with its verdict, the floor."""
    head = results.get("headline")
    if not head or head["extractor"] not in results.get("intervals", {}):
        return []
    name = head["extractor"]
    iv, floor = results["intervals"][name], results["floor"][name]
    cols, models = columns(results), results["models"]
    mark = "held out ✓" if head["held_out"] else f"⚠ NOT HELD OUT: also {', '.join(head['coincides_with'])}"
    checked = ", ".join(head["checked"]) or "nothing (no reward_data / ppo manifest)"
    n_fake = {c: max((m["n_per_class"].get(c, 0) for m in models), default=0) for c in results["classes"]}
    lines = [
        "",
        f"{heading} Headline: {name} ({mark})",
        "",
        f"Extractor identity `{head['identity']}`; compared against {checked}. Intervals: {int(100 * iv['level'])} % "
        f"percentile bootstrap, {iv['n_boot']} resamples of real and generated volumes (seed {iv['seed']}); "
        f"generated volumes per class: {', '.join(f'{c} {n}' for c, n in n_fake.items())}. "
        f"KID is shown ×10³ (unbiased: it may be negative).",
        "",
    ]
    for metric, scale in (("fid", 1.0), ("kid", KID_SCALE)):
        body = [
            [m["label"], *(fmt_est(iv["scores"][metric][m["key"]].get(c), scale=scale) for c in cols)]
            for m in models
        ]
        lines += md_table([f"{metric.upper()}{' ×10³' if scale != 1 else ''}", *cols], body) + [""]
    if iv.get("gap_closed"):
        body = []
        for metric in ("fid", "kid"):
            body.append(
                [
                    metric.upper(),
                    *(
                        f"{fmt_est(iv['gap_closed'][metric][c], 1, unit=' %')} — {iv['verdict'][metric][c]}"
                        for c in cols
                    ),
                ]
            )
        lines += [
            "Share of the standard → VQGAN-limit gap closed by RL (verdict from the interval of "
            "standard − RL):",
            "",
        ]
        lines += md_table(["Metric", *cols], body) + [""]
        res = [
            f"{c} {fmt(0.5 * (iv['difference']['fid'][c]['high'] - iv['difference']['fid'][c]['low']))}"
            for c in cols
        ]
        lines += [f"Resolution (half-width of the standard − RL FID interval): {', '.join(res)}.", ""]
    if iv.get("pairs"):
        labels = {m["key"]: m["label"] for m in models}
        body = [
            [
                f"{labels.get(pair['a'], pair['a'])} − {labels.get(pair['b'], pair['b'])}",
                metric.upper(),
                *(
                    f"{fmt_est(pair['difference'][metric][c], scale=KID_SCALE if metric == 'kid' else 1.0)}"
                    f" — {pair['verdict'][metric][c]}"
                    for c in cols
                ),
            ]
            for pair in iv["pairs"]
            for metric in ("fid", "kid")
        ]
        lines += ["Paired differences between rows (a − b; positive: b scores lower):", ""]
        lines += md_table(["Rows", "Metric", *cols], body) + [""]
    body = [
        [
            metric.upper(),
            *(fmt_est(floor[metric][c], scale=KID_SCALE if metric == "kid" else 1.0) for c in cols),
        ]
        for metric in ("fid", "kid")
    ]
    halves = ", ".join(f"{c} {floor['fid'][c]['n_half']}" for c in cols)
    lines += [
        f"Noise floor: real vs real, two random halves of the {results.get('split', 'test')} split ({halves} volumes per half; "
        "mean and range over random splits):",
        "",
    ]
    lines += md_table(["Metric", *cols], body)
    return lines


def calibration_section(results: Mapping[str, Any], heading: str = "##") -> list[str]:
    """The premises (headline extractor) with pass/fail, and the ladder / trajectory of every extractor."""
    info = results.get("calibration") or {}
    if not info:
        return []
    cols = columns(results)
    lines = ["", f"{heading} The paper's premises (headline extractor)", ""]
    body = []
    for col, checks in results["premises"].items():
        for check in checks:
            if "x" in check:
                numbers = "; ".join(f"{x}: {fmt(v['value'])}" for x, v in zip(check["x"], check["fid"]))
            else:
                numbers = f"gap {fmt_est(check['gap'])} vs floor ≤ {fmt(check['floor_high'])}"
            body.append([check["premise"], col, numbers, "pass ✓" if check["passed"] else "FAIL ✗"])
    lines += md_table(["Premise", "Column", "FID", "Result"], body)
    lines += [
        "",
        "A trend passes when its last point is beyond its first and no step reverses by more than the "
        "intervals allow.",
        "",
        f"{heading} Calibration ladder and synthetic trajectory (FID, every extractor)",
        "",
    ]
    names = sorted(info, key=lambda n: (info[n]["kind"], info[n].get("t", info[n].get("steps"))))
    for ext, iv in results["intervals"].items():
        body = []
        for n in names:
            what = (
                f"reconstruction t={info[n]['t']}"
                if info[n]["kind"] == "ladder"
                else f"synthetic {info[n]['steps']} steps"
            )
            body.append([what, *(fmt_est(iv["scores"]["fid"][n][c]) for c in cols)])
        lines += [f"**{ext}**", ""] + md_table(["Volumes", *cols], body) + [""]
    return lines


def render_markdown(results: Mapping[str, Any], title: str = "Table 2") -> str:
    """The headline table with intervals, the premises and calibration, FID tables (one per extractor),
    the gap closed by RL, PR/DC on all classes, diversity, missing rows."""
    cols = columns(results)
    lookup = score_lookup(results)
    models = results["models"]
    real_n = results.get("real", {}).get("n", {})
    counts = ", ".join(f"{c} {real_n[c]}" for c in cols if c in real_n)
    lines = [f"# {title}: FID per class (lower is better)", ""]
    lines.append(
        f"Real reference: the {results.get('split', 'test')} split ({counts}). FID values are only comparable within one "
        "extractor identity and volume size."
    )
    lines += headline_section(results)
    lines += calibration_section(results)
    lines += ["", "## Point values per extractor"]
    for ext in results["extractors"]:
        name = ext["name"]
        lines += ["", f"## FID — {name}", "", f"Extractor identity: `{ext['identity']}`", ""]
        body = [
            [m["label"], *(fmt(lookup.get((m["key"], name, c), {}).get("fid")) for c in cols)] for m in models
        ]
        lines += md_table(["Model", *cols], body)
        gap = results.get("gap_closed", {}).get(name)
        if gap is not None:
            parts = ", ".join(f"{c} {percent(v)}" for c, v in gap.items())
            lines += ["", f"gap closed by RL: {parts}"]
    lines += ["", f"## Precision / recall / density / coverage ({ALL})", ""]
    body = []
    for ext in results["extractors"]:
        for m in models:
            row = lookup.get((m["key"], ext["name"], ALL), {})
            body.append([m["label"], ext["name"], *(fmt(row.get(k)) for k in PRDC_KEYS)])
    lines += md_table(["Model", "Extractor", *PRDC_KEYS], body)
    lines += ["", "## MS-SSIM diversity (lower = more diverse)", ""]
    body = [[m["label"], *(fmt(m.get("diversity", {}).get(c)) for c in cols)] for m in models]
    real_div = results.get("real", {}).get("diversity")
    if real_div:
        body.append([f"Real {results.get('split', 'test')} set", *(fmt(real_div.get(c)) for c in cols)])
    lines += md_table(["Model", *cols], body)
    if results.get("missing"):
        lines += ["", "## Missing rows", ""]
        lines += [f"- {reason}" for reason in results["missing"].values()]
    return "\n".join(lines) + "\n"


def render_csv(results: Mapping[str, Any]) -> str:
    """One FID table per extractor, stacked: ``extractor, extractor_identity, model, <classes>, All``."""
    cols = columns(results)
    lookup = score_lookup(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["extractor", "extractor_identity", "model", *cols])
    for ext in results["extractors"]:
        for m in results["models"]:
            values = [lookup.get((m["key"], ext["name"], c), {}).get("fid") for c in cols]
            writer.writerow(
                [
                    ext["name"],
                    ext["identity"],
                    m["label"],
                    *("" if v is None else repr(float(v)) for v in values),
                ]
            )
    return buffer.getvalue()


def write_csv(path: str | Path, results: Mapping[str, Any]) -> Path:
    return atomic_write_text(path, render_csv(results))


def write_figures(
    fig_dir: str | Path,
    real: Mapping[str, torch.Tensor],
    rows: Mapping[str, Mapping[str, torch.Tensor]],
    n_volumes: int = 2,
) -> list[Path]:
    """``samples_<class>.png`` per class: mid-slices of the first ``n_volumes`` real volumes, then of every
    row (label → volumes per class) in table order."""
    from mrrl.utils.viz import plt, slices_figure

    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, volumes in real.items():
        grid = {"real": list(volumes[:n_volumes])}
        for label, per_class in rows.items():
            grid[label] = list(per_class[c][:n_volumes])
        figure = slices_figure(grid, title=f"{c}: real / model mid-slices")
        path = fig_dir / f"samples_{safe_name(c)}.png"
        try:
            figure.savefig(path, dpi=90)
        finally:
            plt.close(figure)
        paths.append(path)
    return paths


def write_calibration_figure(path: str | Path, results: Mapping[str, Any]) -> Path:
    """FID (with intervals) of the ladder against t and of the synthetic trajectory against sampler steps,
    one panel pair per extractor, with the Table 2 rows as horizontal lines."""
    from mrrl.utils.viz import plt

    info = results["calibration"]
    exts = list(results["intervals"])
    figure, axes = plt.subplots(len(exts), 2, figsize=(9, 3.2 * len(exts)), squeeze=False)
    for row, ext in enumerate(exts):
        scores = results["intervals"][ext]["scores"]["fid"]
        for col, (kind, xkey, xlabel) in enumerate(
            (("ladder", "t", "noise level t (sampler steps)"), ("synthetic", "steps", "sampler steps"))
        ):
            ax = axes[row][col]
            names = sorted((i[xkey], n) for n, i in info.items() if i["kind"] == kind)
            for c in columns(results):
                xs = [x for x, _ in names]
                est = [scores[n][c] for _, n in names]
                ys = [e["value"] for e in est]
                # A percentile interval need not contain the point value (FID's small-n bias): clip at 0.
                err = [
                    [max(y - e["low"], 0.0) for y, e in zip(ys, est)],
                    [max(e["high"] - y, 0.0) for y, e in zip(ys, est)],
                ]
                if xs:
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=c)
            for key, style in (("vqgan", "--"), ("standard", ":"), ("rl", "-.")):
                if key in scores:
                    ax.axhline(scores[key][ALL]["value"], color="k", ls=style, lw=1, label=f"{key} (All)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"FID ({ext})")
            ax.set_title(f"{ext}: {kind}")
            ax.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(path, dpi=90)
    finally:
        plt.close(figure)
    return path

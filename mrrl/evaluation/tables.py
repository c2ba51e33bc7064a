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
from mrrl.utils.io import atomic_write_text

PRDC_KEYS = ("precision", "recall", "density", "coverage")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    value = float(value)
    if value != 0 and abs(value) < 10**-digits:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


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
        std, rl, limit = fid["standard"].get(c), fid["rl"].get(c), fid["vqgan"].get(c)
        if any(v is None or not math.isfinite(v) for v in (std, rl, limit)) or std - limit <= 0:
            out[c] = None
        else:
            out[c] = 100.0 * (std - rl) / (std - limit)
    return out


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(results: Mapping[str, Any], title: str = "Table 2") -> str:
    """FID tables (one per extractor), the gap closed by RL, PR/DC on all classes, diversity, missing rows."""
    cols = columns(results)
    lookup = score_lookup(results)
    models = results["models"]
    real_n = results.get("real", {}).get("n", {})
    counts = ", ".join(f"{c} {real_n[c]}" for c in cols if c in real_n)
    lines = [f"# {title}: FID per class (lower is better)", ""]
    lines.append(
        f"Real reference: the test split ({counts}). FID values are only comparable within one "
        "extractor identity and volume size."
    )
    for ext in results["extractors"]:
        name = ext["name"]
        lines += ["", f"## FID — {name}", "", f"Extractor identity: `{ext['identity']}`", ""]
        body = [
            [m["label"], *(fmt(lookup.get((m["key"], name, c), {}).get("fid")) for c in cols)] for m in models
        ]
        lines += _md_table(["Model", *cols], body)
        gap = results.get("gap_closed", {}).get(name)
        if gap is not None:
            parts = ", ".join(f"{c} {'n/a' if v is None else f'{v:.1f} %'}" for c, v in gap.items())
            lines += ["", f"gap closed by RL: {parts}"]
    lines += ["", f"## Precision / recall / density / coverage ({ALL})", ""]
    body = []
    for ext in results["extractors"]:
        for m in models:
            row = lookup.get((m["key"], ext["name"], ALL), {})
            body.append([m["label"], ext["name"], *(fmt(row.get(k)) for k in PRDC_KEYS)])
    lines += _md_table(["Model", "Extractor", *PRDC_KEYS], body)
    lines += ["", "## MS-SSIM diversity (lower = more diverse)", ""]
    body = [[m["label"], *(fmt(m.get("diversity", {}).get(c)) for c in cols)] for m in models]
    real_div = results.get("real", {}).get("diversity")
    if real_div:
        body.append(["Real test set", *(fmt(real_div.get(c)) for c in cols)])
    lines += _md_table(["Model", *cols], body)
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
    from mrrl.viz import plt, slices_figure

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

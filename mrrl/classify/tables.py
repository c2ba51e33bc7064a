"""``table3.md`` / ``table3.csv`` (rows = protocols, mean ± sample std over seeds) and ``per_seed.csv``."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mrrl.classify.metrics import METRIC_LABELS, METRICS
from mrrl.utils.io import atomic_write_text
from mrrl.utils.markdown import fmt, fmt_difference, fmt_pm, md_table


def render_markdown(results: Mapping[str, Any], title: str) -> str:
    """The table, how to read it, the missing protocols and every seed's numbers."""
    rows = results["protocols"]
    test_n = ", ".join(f"{c} {n}" for c, n in results["test_counts"].items())
    lines = [
        f"# {title}",
        "",
        f"3D {results['arch']} (MONAI) on the real test split ({test_n}); positive class "
        f"**{results['positive_class']}**, decision threshold {results['threshold']}. "
        "Mean ± sample standard deviation (ddof = 1) over the seeds of each row.",
        "",
    ]
    body = [[r["label"], str(len(r["seeds"])), *(fmt_pm(r["metrics"][m]) for m in METRICS)] for r in rows]
    lines += md_table(["Protocol", "Seeds", *(METRIC_LABELS[m] for m in METRICS)], body)
    if results.get("paired"):
        lines += [
            "",
            "## Paired differences (row − column protocol)",
            "",
            "Mean over the shared seeds of the per-seed difference; 95 % percentile bootstrap interval "
            "resampling seeds and test subjects together. A difference counts only where the interval "
            "excludes 0.",
            "",
        ]
        body = [
            [
                pair["label"],
                str(pair["difference"]["accuracy"]["n_seeds"]),
                *(f"{fmt_difference(pair['difference'][m])} — {pair['verdict'][m]}" for m in METRICS),
            ]
            for pair in results["paired"]
        ]
        lines += md_table(["Difference", "Seeds", *(METRIC_LABELS[m] for m in METRICS)], body)
    if results["missing"]:
        lines += ["", "## Missing protocols", ""]
        lines += [f"- {why}" for why in results["missing"].values()]
    lines += ["", "## Per seed", ""]
    per_seed = [
        [r["label"], str(run["seed"]), *(fmt(run["metrics"][m]) for m in METRICS), str(run.get("best_epoch"))]
        for r in rows
        for run in r["runs"]
    ]
    lines += md_table(["Protocol", "Seed", *(METRIC_LABELS[m] for m in METRICS), "Best epoch"], per_seed)
    return "\n".join(lines) + "\n"


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.6g}"


def write_tables(run_dir: Path, results: Mapping[str, Any], title: str) -> dict[str, Path]:
    """``table3.md``, ``table3.csv`` (one row per protocol) and ``per_seed.csv`` (one row per run)."""
    rows = results["protocols"]
    header = ["protocol", "label", "n_seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    table = [
        [r["key"], r["label"], len(r["seeds"])]
        + [_num(r["metrics"][m][s]) for m in METRICS for s in ("mean", "std")]
        for r in rows
    ]
    seeds = [
        [
            r["key"],
            run["seed"],
            *(_num(run["metrics"][m]) for m in METRICS),
            run.get("best_epoch"),
            run["dir"],
        ]
        for r in rows
        for run in r["runs"]
    ]
    return {
        "table_md": atomic_write_text(run_dir / "table3.md", render_markdown(results, title)),
        "table_csv": atomic_write_text(run_dir / "table3.csv", _csv_text(header, table)),
        "per_seed_csv": atomic_write_text(
            run_dir / "per_seed.csv", _csv_text(["protocol", "seed", *METRICS, "best_epoch", "dir"], seeds)
        ),
    }

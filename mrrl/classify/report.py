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


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def mean_pm_std(stats: Mapping[str, float]) -> str:
    """``0.710 ± 0.020``; one seed has no std and shows the mean alone."""
    mean, std = stats.get("mean"), stats.get("std")
    if std is None or not math.isfinite(std):
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt(std)}"


def fmt_difference(est: Mapping[str, float]) -> str:
    """``+0.050 [-0.010, +0.110]``."""

    def signed(v):
        return "–" if v is None or not math.isfinite(v) else f"{v:+.3f}"

    return f"{signed(est.get('value'))} [{signed(est.get('low'))}, {signed(est.get('high'))}]"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


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
    body = [
        [r["label"], str(len(r["seeds"])), *(mean_pm_std(r["metrics"][m]) for m in METRICS)] for r in rows
    ]
    lines += _md_table(["Protocol", "Seeds", *(METRIC_LABELS[m] for m in METRICS)], body)
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
        lines += _md_table(["Difference", "Seeds", *(METRIC_LABELS[m] for m in METRICS)], body)
    if results["missing"]:
        lines += ["", "## Missing protocols", ""]
        lines += [f"- {why}" for why in results["missing"].values()]
    lines += ["", "## Per seed", ""]
    per_seed = [
        [r["label"], str(run["seed"]), *(fmt(run["metrics"][m]) for m in METRICS), str(run.get("best_epoch"))]
        for r in rows
        for run in r["runs"]
    ]
    lines += _md_table(["Protocol", "Seed", *(METRIC_LABELS[m] for m in METRICS), "Best epoch"], per_seed)
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

"""What the stages without a Trainer send to W&B: reward_data's FID against sampler steps and evaluate's
Table 2. Keys are filled in from the templates of :mod:`mrrl.tracking.keys`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mrrl.tracking.keys import SAMPLER_STEPS
from mrrl.tracking.wandb_run import log_table, numbers

ALL = "All"


def log_reward_data(
    logger, groups: Sequence[Mapping[str, Any]], limits: Mapping[str, float], plot: Path, num_volumes: int
) -> None:
    """One row per sampler step count, in increasing order (each curve's x rises): every group's FID and
    reward at that count, per trajectory and class, and the VQGAN limit (a flat line over the range).
    Then the group table, the FID figure, and the limits in the summary."""
    import wandb

    run = logger.experiment
    rows: dict[int, dict[str, float]] = {}
    for g in groups:
        row = rows.setdefault(int(g["steps"]), {SAMPLER_STEPS: int(g["steps"])})
        row[f"reward_data/fid/{g['trajectory']}/{g['class']}"] = float(g["fid"])
        row[f"reward_data/reward/{g['trajectory']}/{g['class']}"] = float(g["reward"])
    for steps in sorted(rows):
        row = {**rows[steps], **{f"reward_data/vqgan_limit/{c}": float(v) for c, v in limits.items()}}
        logger.define_keys(row)
        run.log(row)
    columns = ["group", "trajectory", "steps", "class", "count", "fid", "reward", "seconds"]
    log_table(run, "reward_data/groups", columns, [[g.get(c) for c in columns] for g in groups])
    run.log({"reward_data/fid_vs_steps": wandb.Image(str(plot))})
    run.summary.update(
        {
            **{f"reward_data/vqgan_limit/{c}": float(v) for c, v in limits.items()},
            "reward_data/num_volumes": int(num_volumes),
        }
    )


def table2_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Table 2 as rows (extractor, model, column) with FID/KID, their intervals, PRDC, diversity, sizes."""
    columns = [
        "extractor", "model", "label", "class", "n",
        "fid", "fid_low", "fid_high", "kid", "kid_low", "kid_high",
        "precision", "recall", "density", "coverage", "diversity",
    ]  # fmt: skip
    prdc = {(r["extractor"], r["model"], r["class"]): r for r in results["scores"]}
    cols = [*results["classes"], ALL]
    rows = []
    for ext in results["fid"]:
        scores = results.get("intervals", {}).get(ext, {}).get("scores", {})
        for m in results["models"]:
            for c in cols:
                fid = scores.get("fid", {}).get(m["key"], {}).get(c) or {}
                kid = scores.get("kid", {}).get(m["key"], {}).get(c) or {}
                r = prdc.get((ext, m["key"], c), {})
                n = m["n_per_class"].get(c, sum(m["n_per_class"].values()) if c == ALL else None)
                rows.append(
                    [ext, m["key"], m["label"], c, n]
                    + [results["fid"][ext][m["key"]].get(c), fid.get("low"), fid.get("high")]
                    + [kid.get("value"), kid.get("low"), kid.get("high")]
                    + [r.get(k) for k in ("precision", "recall", "density", "coverage")]
                    + [m.get("diversity", {}).get(c)]
                )
    return columns, rows


def evaluation_values(results: Mapping[str, Any]) -> dict[str, float]:
    """The headline extractor's values per model and class (FID, KID, PRDC, diversity) and the share of
    the gap closed per class, as flat ``evaluate/...`` keys; the real set's diversity as model ``real``."""
    ext = results["headline"]["extractor"]
    scores = results.get("intervals", {}).get(ext, {}).get("scores", {})
    values: dict[str, Any] = {"fid": {}, "kid": {}, "diversity": {}}
    for m in results["models"]:
        key = m["key"]
        values["fid"][key] = results["fid"][ext][key]
        values["kid"][key] = {c: est["value"] for c, est in scores.get("kid", {}).get(key, {}).items()}
        values["diversity"][key] = m.get("diversity", {})
    values["diversity"]["real"] = results.get("real", {}).get("diversity", {})
    for r in results["scores"]:
        if r["extractor"] == ext:
            for metric in ("precision", "recall", "density", "coverage"):
                values.setdefault(metric, {}).setdefault(r["model"], {})[r["class"]] = r.get(metric)
    values["gap_closed"] = (results.get("gap_closed") or {}).get(ext) or {}
    return numbers(values, "evaluate/")


def log_evaluation(logger, results: Mapping[str, Any], figures: Sequence[Path]) -> None:
    """Table 2 with intervals as a ``wandb.Table``, the headline values (history row and summary), figures."""
    import wandb

    run = logger.experiment
    columns, rows = table2_rows(results)
    log_table(run, "evaluate/table2", columns, rows)
    values = evaluation_values(results)
    run.log({**values, **{f"evaluate/{p.stem}": wandb.Image(str(p)) for p in figures}})
    run.summary.update({**values, "evaluate/headline_extractor": results["headline"]["extractor"]})

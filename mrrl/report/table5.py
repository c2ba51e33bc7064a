"""Table 5: FID "All" and accuracy of the full framework and of every ablation (``ablation_*`` experiments
made from this one), with the R3D ranking accuracy and the reward-data time, and the paper's Table 5."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import mrrl.report.paper as paper
from mrrl.report.experiment import REPORT_NAME, Context, Experiment
from mrrl.utils.markdown import MISSING, fmt, fmt_fid, fmt_pm, is_finite, md_table, relative_link


def _rl_fid(exp: Experiment, extractor: str) -> Any:
    fid = (exp.outputs("evaluate") or {}).get("fid") or {}
    return ((fid.get(extractor) or {}).get("rl") or {}).get("All")


def _rl_accuracy(exp: Experiment) -> dict[str, Any] | None:
    protocols = (exp.outputs("classify") or {}).get("protocols") or {}
    return ((protocols.get("rl") or {}).get("metrics") or {}).get("accuracy")


def _rank_acc(exp: Experiment) -> str:
    out = exp.outputs("reward")
    if out is None:
        return "shared" if exp.shared("reward") else MISSING
    return fmt((((out.get("models") or {}).get("r3d") or {}).get("val") or {}).get("rank_acc"))


def _reward_data_time(exp: Experiment, full_seconds: Any) -> str:
    out = exp.outputs("reward_data")
    if out is None:
        return "shared" if exp.shared("reward_data") else MISSING
    seconds = out.get("seconds")
    if not is_finite(seconds):
        return MISSING
    text = f"{float(seconds):.0f} s"
    if is_finite(full_seconds) and float(full_seconds) > 0 and exp.base_experiment:
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
    rows_exp = [("Full framework", ctx.exp), *((e.ablation_label(n), e) for n, e in ctx.ablations.items())]
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
        line = f"- `{name}`: [report]({relative_link(exp.dir / REPORT_NAME, ctx.report_dir)}) (`{exp.dir}`)"
        missing = exp.unfinished()
        lines.append(line + (f"; not finished: {', '.join(f'`{s}`' for s in missing)}" if missing else ""))
    if ctx.exp.dataset == paper.TABLE5_DATASET:
        published = [[c, fmt(f, 2), fmt(a, 2)] for c, f, a in paper.TABLE5]
        lines += ["", "Paper (Table 5, BraTS 2019), for reference:", ""]
        lines += md_table(["Configuration", "FID", "Accuracy"], published)
    return lines

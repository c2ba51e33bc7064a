"""Table 3: downstream classification, mean ± std over seeds per protocol, the paired differences with
their intervals, and the paper's Table 3."""

from __future__ import annotations

import mrrl.report.paper as paper
from mrrl.classify.metrics import METRIC_LABELS, METRICS
from mrrl.report.experiment import Context, stage_hint
from mrrl.utils.markdown import fmt_difference, fmt_pm, md_table

HEADER = [METRIC_LABELS[m] for m in METRICS]


def section_table3(ctx: Context) -> list[str]:
    lines: list[str] = []
    out = ctx.exp.outputs("classify")
    if out is None:
        return [stage_hint(ctx.exp, "classify")]
    rows = [
        [
            p.get("label", key),
            len(p.get("per_seed") or {}),
            *(fmt_pm((p.get("metrics") or {}).get(m)) for m in METRICS),
        ]
        for key, p in (out.get("protocols") or {}).items()
    ]
    lines += md_table(["Protocol", "Seeds", *HEADER], rows)
    if out.get("paired"):
        rows = [
            [
                pair["label"],
                pair["difference"]["accuracy"]["n_seeds"],
                *(f"{fmt_difference(pair['difference'][m])} — {pair['verdict'][m]}" for m in METRICS),
            ]
            for pair in out["paired"]
        ]
        lines += ["", "Paired differences (95 % bootstrap over seeds and test subjects):", ""]
        lines += md_table(["Difference", "Seeds", *HEADER], rows)
    if out.get("missing"):
        lines += ["", "Protocols not run:", "", *(f"- {why}" for why in out["missing"].values())]
    published = paper.TABLE3.get(ctx.exp.dataset or "")
    if published:
        rows = [[paper.TABLE3_LABELS[k], *(f"{m:.2f} ± {s:.2f}" for m, s in v)] for k, v in published.items()]
        lines += ["", "Paper (Table 3), for reference:", ""]
        lines += md_table(["Protocol", *HEADER], rows)
    return lines

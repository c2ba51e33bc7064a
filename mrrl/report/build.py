"""The report, section by section: each section renders from the experiment's manifests alone (never a
checkpoint: fast, no GPU), and one that cannot render says why without stopping the others."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

from mrrl.report.experiment import REPORT_NAME, Context
from mrrl.report.models import section_diffusion, section_reward_data, section_reward_models, section_vqgan
from mrrl.report.overview import section_overview, section_table1
from mrrl.report.ppo import section_ppo
from mrrl.report.table2 import section_figures, section_table2
from mrrl.report.table3 import section_table3
from mrrl.report.table5 import section_table5
from mrrl.utils.io import atomic_write_text

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
    ctx = Context.load(experiment_dir, None if ablations is None else dict(ablations))
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

"""Build the W&B workspace of :mod:`mrrl.dashboard.spec` for one project and experiment group.

Uses the ``wandb-workspaces`` library (``pip install 'mrrl[dashboard]'``) to create the view; without it, or
offline, :func:`describe` prints what would be created.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

from mrrl.dashboard.spec import PANELS, Panel
from mrrl.tracking.keys import expand

MODELS = ("vqgan", "standard", "rl")  # the rows of Table 2


def panel_keys(panel: Panel, classes: Sequence[str]) -> list[str]:
    """The concrete keys a panel plots, for these class names."""
    keys: list[str] = []
    for template in panel.keys:
        keys += expand(template, cls=classes, model=MODELS)
    return keys


def sections(panels: Sequence[Panel] = PANELS) -> dict[str, list[Panel]]:
    return {name: list(group) for name, group in itertools.groupby(panels, key=lambda p: p.section)}


def describe(project: str, group: str, classes: Sequence[str], panels: Sequence[Panel] = PANELS) -> str:
    """What :func:`build_workspace` would create, as text (the dry run)."""
    lines = [
        f"W&B workspace for project {project!r}, runs of group {group!r} (classes {', '.join(classes)}):"
    ]
    for name, members in sections(panels).items():
        lines.append(f"  section {name}")
        for p in members:
            axis = f" vs {p.x}" if p.x else ""
            grouped = f", mean ± std over runs grouped by {', '.join(p.group_by)}" if p.group_by else ""
            lines.append(
                f"    [{p.kind}] {p.title} ({p.stage} runs{axis}{grouped}): {', '.join(panel_keys(p, classes))}"
            )
    return "\n".join(lines)


def wandb_panel(panel: Panel, classes: Sequence[str]):
    """The ``wandb_workspaces`` panel object of one spec entry."""
    import wandb_workspaces.reports.v2 as wr

    keys = panel_keys(panel, classes)
    if panel.kind == "line":
        return wr.LinePlot(title=panel.title, x=panel.x, y=keys)
    if panel.kind == "bar":
        grouped = (
            {
                "groupby": wr.Config(panel.group_by[0]),
                "groupby_aggfunc": "mean",
                "groupby_rangefunc": "stddev",
            }
            if panel.group_by
            else {}
        )
        return wr.BarPlot(title=panel.title, metrics=keys, **grouped)
    if panel.kind == "media":
        return wr.MediaBrowser(title=panel.title, media_keys=keys)
    if panel.kind == "table":
        (key,) = keys
        return wr.WeavePanelSummaryTable(table_name=key)
    raise ValueError(f"unknown panel kind {panel.kind!r} ({panel.title})")


def build_workspace(entity: str, project: str, group: str, classes: Sequence[str], name: str):
    """The workspace object (not saved): one section per spec section, runs filtered to ``group``."""
    try:
        import wandb_workspaces.workspaces as ws
    except ImportError as exc:
        raise SystemExit(
            "mrrl-dashboard: the wandb-workspaces library is missing: pip install 'mrrl[dashboard]'"
        ) from exc
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[
            ws.Section(name=section, panels=[wandb_panel(p, classes) for p in members], is_open=True)
            for section, members in sections().items()
        ],
        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == group]),
    )


def online() -> bool:
    """True when W&B can be reached: not in offline/disabled mode and an API key is configured."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return False
    return _has_key()


def _has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return bool(netrc.netrc().authenticators("api.wandb.ai"))
    except (FileNotFoundError, netrc.NetrcParseError):
        return False

"""The W&B dashboard: its one declarative spec refers only to keys the stages log, and it builds offline.

That the stages really log each key of :mod:`mrrl.tracking.keys` (and each panel's keys) is checked on their
offline runs by ``helpers.check_wandb_run`` in the stage tests (test_vqgan_stage, test_diffusion_stage,
test_reward_data_stage, test_reward_stage, test_ppo, test_evaluate_stage, test_classify_stage).
"""

from __future__ import annotations

import sys

import pytest

from mrrl.dashboard import __main__ as cli
from mrrl.dashboard.build import panel_keys, sections
from mrrl.dashboard.spec import KINDS, PANELS
from mrrl.tracking.keys import STAGES, key_pattern

CLASSES = ["HGG", "LGG"]


def covered(key: str, templates) -> bool:
    """A panel key is a declared template, or one of its instances (``reward/total_{cls}``)."""
    return any(t == key or key_pattern(t).match(key) for t in templates)


def test_every_panel_plots_keys_its_stage_declares_on_that_stage_axis() -> None:
    assert len({p.title for p in PANELS}) == len(PANELS)
    for panel in PANELS:
        spec = STAGES[panel.stage]
        declared = spec.curves + spec.images + spec.summary + spec.tables
        for key in panel.keys:
            assert covered(key, declared), (panel.title, key)
        assert panel.kind in KINDS
        if panel.kind == "line":
            assert panel.x == spec.axis and all(covered(k, spec.curves) for k in panel.keys), panel.title
        if panel.kind == "media":
            assert all(covered(k, spec.images) for k in panel.keys), panel.title
        if panel.kind == "table":
            assert len(panel.keys) == 1 and panel.keys[0] in spec.tables, panel.title
    # The panels the paper's reader asks for are there.
    keys = {k for p in PANELS for k in p.keys}
    assert {"fid/{cls}", "reward/total_{cls}", "reward_data/vqgan_limit/{cls}", "val/rank_acc"} <= keys
    assert {"evaluate/table2", "test/auc", "ppo/samples"} <= keys


def test_panel_keys_expand_classes_and_models() -> None:
    (fid,) = [p for p in PANELS if p.title == "FID per model and class"]
    assert panel_keys(fid, CLASSES)[:3] == [
        "evaluate/fid/vqgan/HGG",
        "evaluate/fid/vqgan/LGG",
        "evaluate/fid/standard/HGG",
    ]
    assert "evaluate/fid/rl/All" in panel_keys(fid, CLASSES)


def test_workspace_object_builds_offline_with_the_spec_panels() -> None:
    pytest.importorskip("wandb_workspaces")
    import wandb_workspaces.reports.v2 as wr

    from mrrl.dashboard.build import build_workspace

    workspace = build_workspace("someone", "mrrl", "demo", CLASSES, "mrrl demo")
    assert [s.name for s in workspace.sections] == list(sections())
    assert sum(len(s.panels) for s in workspace.sections) == len(PANELS)
    (ppo,) = [s for s in workspace.sections if s.name == "PPO"]
    fid = ppo.panels[0]
    assert (
        isinstance(fid, wr.LinePlot)
        and fid.x == "ppo/iteration"
        and fid.y == ["fid/HGG", "fid/LGG", "fid/mean"]
    )
    (table3,) = [s for s in workspace.sections if s.name == "Table 3"]
    assert table3.panels[0].groupby_rangefunc == "stddev"
    assert "demo" in str(workspace.runset_settings.filters)
    workspace._to_model()  # the payload `save` would send validates


def test_offline_dry_run_prints_every_panel_without_the_extra(monkeypatch, capsys) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # as if `mrrl[dashboard]` were not installed
    assert cli.main(["--group", "demo", "--classes", "AD,CN"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing created" in out and "fid/AD" in out and "evaluate/table2" in out
    assert all(p.title in out for p in PANELS)
    with pytest.raises(SystemExit, match=r"pip install 'mrrl\[dashboard\]'"):
        cli.main(["--group", "demo", "--save", "--entity", "someone"])
    assert cli.main(["--group", "demo", "--classes", ","]) == 2
    assert "--classes names no class" in capsys.readouterr().err

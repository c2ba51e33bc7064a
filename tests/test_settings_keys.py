"""Every key a module reads exists in its YAML, and no module keeps its own default for a config key.

1. For every typed settings class (``SETTINGS``; extend it when a module gets one), the stage config
   composed with Hydra, by default and with every experiment, builds it with
   :func:`mrrl.settings.from_config`, which requires every field: a key renamed or dropped in the YAML, or
   an experiment preset that overrides a key that no longer exists, fails here.
2. An AST scan of ``mrrl/``: no ``.get("<literal>", <default>)`` on a config object (``cfg``, ``stage``,
   ``settings``, ``self.cfg``, ``cfg.stage…``): the YAML is the only source of defaults.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mrrl.classify.model import PhaseOptimSettings
from mrrl.cli import CONFIG_DIR
from mrrl.diffusion.latent_data import LatentDataSettings
from mrrl.diffusion.module import DiffusionSettings
from mrrl.ppo.settings import PPOSettings, RewardSettings
from mrrl.reward.settings import RankingSettings, RewardOptimSettings
from mrrl.settings import field_names, from_config
from mrrl.training.fault_tolerance import FaultToleranceSettings
from mrrl.vqgan.module import VQGANSettings

REPO = Path(__file__).resolve().parent.parent

# (stage composed, settings class, the config node it is built from). Add a row with every new settings class.
SETTINGS = [
    ("ppo", PPOSettings, "stage"),
    ("ppo", RewardSettings, "stage.reward"),  # nested in PPOSettings; also built alone from stage.reward
    ("reward", RewardOptimSettings, "stage.optim"),
    ("reward", RankingSettings, "stage.ranking"),
    ("classify", PhaseOptimSettings, "stage.pretrain"),
    ("classify", PhaseOptimSettings, "stage.finetune"),
    ("vqgan", FaultToleranceSettings, "fault_tolerance"),
    ("vqgan", VQGANSettings, "stage"),
    ("diffusion", DiffusionSettings, "stage"),
    ("diffusion", LatentDataSettings, "stage"),  # top level: every training stage reads it
]

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def _configured_by(stage: str) -> list[str | None]:
    """The default (None) and every experiment with a preset for ``stage`` (conf/preset/<experiment>_<stage>)."""
    return [None, *(e for e in EXPERIMENTS if (Path(CONFIG_DIR) / "preset" / f"{e}_{stage}.yaml").is_file())]


CASES = [
    pytest.param(stage, cls, where, experiment, id=f"{cls.__name__}@{where}-{experiment or 'default'}")
    for stage, cls, where in SETTINGS
    for experiment in _configured_by(stage)
]


def _compose(overrides: list[str], tmp_path: Path | str = "/nonexistent/runs"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"paths.run_root={tmp_path}"])


@functools.cache
def _stage_config(stage: str, experiment: str | None):
    """Composition only (nothing is created under paths.run_root); shared by the settings of one stage."""
    return _compose([f"stage={stage}"] + ([f"experiment={experiment}"] if experiment else []))


@pytest.mark.parametrize(("stage", "cls", "where", "experiment"), CASES)
def test_settings_build_from_every_composed_config(stage, cls, where, experiment) -> None:
    cfg = _stage_config(stage, experiment)
    section = OmegaConf.select(cfg, where)
    assert section is not None, f"{where} is missing from stage={stage}"
    settings = from_config(cls, section, where)
    for name in field_names(cls):  # every field, nested ones included, is a key of the YAML
        assert OmegaConf.select(section, name, throw_on_missing=True) is not None or _is_null(
            section, name
        ), name
    assert settings == from_config(cls, OmegaConf.to_container(section, resolve=True), where)


def _is_null(section, name: str) -> bool:
    parent, _, key = name.rpartition(".")
    node = OmegaConf.select(section, parent) if parent else section
    return key in node and node[key] is None


def test_demo_rollout_sampler_has_one_source(tmp_path: Path) -> None:
    """PPO trains on it; evaluate and classify of the demo sample every model with it."""
    for experiment in ("demo", "demo_atrophy"):
        steps = []
        for stage, path in (("ppo", "sample"), ("evaluate", ""), ("classify", "")):
            cfg = _compose(
                [f"stage={stage}", f"experiment={experiment}", "demo.rollout_sampler.num_steps=7"], tmp_path
            )
            node = OmegaConf.select(cfg, f"stage.{path}") if path else cfg.stage
            steps.append((node.num_steps, node.eta))
        assert steps == [(7, 1.0)] * 3, (experiment, steps)


# ---------------------------------------------------------------------------------------------- no code defaults

CONFIG_NAMES = {"cfg", "stage", "settings"}
CONFIG_CHAINS = (
    "self.cfg",
)  # and any chain through ``cfg.stage`` (``cfg.stage.metrics``, ``ctx.cfg.stage``)

# (file under mrrl/, key): why this .get with a default is not a config-key default.
ALLOWED: dict[tuple[str, str], str] = {}
# Files exempt from the scan while they are being converted (none).
PENDING: set[str] = set()


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _is_config(receiver: str) -> bool:
    if receiver in CONFIG_NAMES or receiver in CONFIG_CHAINS:
        return True
    parts = receiver.split(".")
    return any(a == "cfg" and b == "stage" for a, b in zip(parts, parts[1:]))


def config_get_defaults(root: Path) -> list[tuple[str, int, str]]:
    """``(file, line, key)`` of every ``<config>.get("<key>", <default>)`` under ``root``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr != "get" or len(node.args) + len(node.keywords) < 2:
                continue
            key = node.args[0] if node.args else None
            receiver = _dotted(node.func.value)
            if (
                isinstance(key, ast.Constant)
                and isinstance(key.value, str)
                and receiver
                and _is_config(receiver)
            ):
                found.append((str(path.relative_to(root.parent)), node.lineno, key.value))
    return found


def test_no_code_side_defaults_for_config_keys() -> None:
    found = [
        f for f in config_get_defaults(REPO / "mrrl") if (f[0], f[2]) not in ALLOWED and f[0] not in PENDING
    ]
    assert not found, "config keys read with a code-side default (put the default in conf/): " + ", ".join(
        f"{file}:{line} {key!r}" for file, line, key in found
    )


def test_the_scan_finds_what_it_forbids(tmp_path: Path) -> None:
    pkg = tmp_path / "mrrl"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "a = cfg.get('x', 1)\nb = self.cfg.get('y', 2)\nc = ctx.cfg.stage.metrics.get('z', 3)\n"
        "d = cfg.stage.get('w')\ne = manifest.get('v', 4)\nf = stage.get(name, 5)\n"
    )
    assert [(line, key) for _, line, key in config_get_defaults(pkg)] == [(1, "x"), (2, "y"), (3, "z")]

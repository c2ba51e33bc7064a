"""One experiment folder as the report sees it: its finished stage manifests (read through
:mod:`mrrl.manifest`), why the others are absent, its ablations, and the files its manifests name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mrrl.report.paper as paper
from mrrl.manifest import PIPELINE_STAGES, try_read_manifest

REPORT_NAME = "report.md"
FIGURE_DIR = "report_figures"
PPO_FIGURE = "ppo_curves.png"
# Stages an ablation takes from its base experiment when its config lists no pipeline stages.
BASE_STAGES = ("check_data", "vqgan", "diffusion")


def _config_dir() -> Path:
    from mrrl.cli import CONFIG_DIR

    return Path(CONFIG_DIR)


@dataclass
class Experiment:
    """The finished stage manifests of one experiment folder, and why the others are absent."""

    dir: Path
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, experiment_dir: str | Path) -> Experiment:
        exp = cls(Path(experiment_dir))
        for stage in PIPELINE_STAGES:
            manifest, problem = try_read_manifest(exp.dir, stage)
            if manifest is not None:
                exp.manifests[stage] = manifest
            else:
                exp.problems[stage] = problem
        return exp

    def outputs(self, stage: str) -> dict[str, Any] | None:
        manifest = self.manifests.get(stage)
        return None if manifest is None else dict(manifest.get("outputs") or {})

    @property
    def config(self) -> dict[str, Any]:
        """The composed config of the first stage that saved one (every stage shares the top-level keys)."""
        return next((m["config"] for m in self.manifests.values() if isinstance(m.get("config"), dict)), {})

    @property
    def name(self) -> str:
        return str(self.config.get("experiment_name") or self.dir.name)

    @property
    def selector(self) -> str:
        """The command-line argument that selects this experiment: ``experiment=<name>`` when a config of
        that name exists, else ``experiment_name=<name> …`` (with the overrides the run was started with)."""
        if (_config_dir() / "experiment" / f"{self.name}.yaml").is_file():
            return f"experiment={self.name}"
        return f"experiment_name={self.name} <the run's other overrides>"

    @property
    def dataset(self) -> str | None:
        data = self.config.get("data") or {}
        return data.get("name") or (self.data_summary or {}).get("dataset")

    @property
    def data_summary(self) -> dict[str, Any] | None:
        """check_data's summary (splits, classes, shape), else the copy the VQGAN stage keeps."""
        return self.outputs("check_data") or (self.outputs("vqgan") or {}).get("data")

    @property
    def base_experiment(self) -> str | None:
        """For an ablation: the experiment whose VQGAN / diffusion model it reuses."""
        return (self.config.get("ablation") or {}).get("base_experiment")

    def shared(self, stage: str) -> bool:
        """An ablation's stage it does not run itself but takes from its base experiment."""
        if not self.base_experiment:
            return False
        own = (self.config.get("pipeline") or {}).get("stages")
        return stage not in own if own else stage in BASE_STAGES

    def unfinished(self) -> list[str]:
        """The stages, in pipeline order, that neither finished here nor come from the base experiment."""
        return [s for s in PIPELINE_STAGES if s not in self.manifests and not self.shared(s)]

    def locate(self, stage: str, path: str | None) -> Path | None:
        """A file a manifest names (stored absolute), looked up inside this folder first, so a copied or
        moved experiment links its own files; else the stored path if it still exists."""
        if not path:
            return None
        stored = Path(path)
        run_dir = (self.manifests.get(stage) or {}).get("run_dir")
        if run_dir:
            try:
                inside = self.dir / stage / stored.relative_to(run_dir)
            except ValueError:
                inside = None
            if inside is not None and inside.exists():
                return inside
        return stored if stored.exists() else None

    def ablation_label(self, name: str) -> str:
        """Its Table 5 row as ablation ``name``: ``ablation.label`` of its config, else of
        ``conf/experiment/<name>.yaml`` (the YAML is the one place labels are written), else ``name``."""
        label = (self.config.get("ablation") or {}).get("label")
        path = _config_dir() / "experiment" / f"{name}.yaml"
        if not label and path.is_file():
            from omegaconf import OmegaConf

            label = OmegaConf.select(OmegaConf.load(path), "ablation.label")
        return str(label or name)


@dataclass
class Context:
    """What every section reads: the experiment, where the report and its figures go, the ablations."""

    exp: Experiment
    report_dir: Path
    figure_dir: Path
    ablations: dict[str, Experiment]

    @classmethod
    def load(cls, experiment_dir: str | Path, ablations: dict[str, str | Path] | None = None) -> Context:
        exp = Experiment.load(experiment_dir)
        if ablations is None:
            ablations = discover_ablations(exp.dir)
        return cls(
            exp=exp,
            report_dir=exp.dir,
            figure_dir=exp.dir / FIGURE_DIR,
            ablations={name: Experiment.load(path) for name, path in ablations.items()},
        )


def stage_hint(exp: Experiment, stage: str) -> str:
    """Why a stage's section is empty and what produces it."""
    base = exp.base_experiment
    if exp.shared(stage):
        return (
            f"_`{stage}` is shared with the base experiment `{base}`: see "
            f"[its report](../{base}/{REPORT_NAME})._"
        )
    why = exp.problems.get(stage, "has not run")
    return (
        f"_Missing: the `{stage}` stage {why} — run `mrrl stage={stage} {exp.selector}` "
        f"(or `mrrl-pipeline {exp.selector}`, which runs every unfinished stage)._"
    )


def discover_ablations(experiment_dir: str | Path) -> dict[str, Path]:
    """``ablation_*`` folders beside ``experiment_dir`` made from it (their config's
    ``ablation.base_experiment``; folders whose manifests carry no config count when they hold any), the
    paper's Table 5 ablations first in its order."""
    exp = Experiment.load(experiment_dir)
    parent = exp.dir.resolve().parent
    known = list(paper.TABLE5_EXPERIMENTS)
    candidates = [p for p in parent.glob("ablation_*") if p.is_dir() and p.resolve() != exp.dir.resolve()]
    found = {}
    for path in sorted(
        candidates, key=lambda p: (known.index(p.name) if p.name in known else len(known), p.name)
    ):
        ablation = Experiment.load(path)
        base = ablation.base_experiment
        if base == exp.name or (base is None and ablation.manifests):
            found[path.name] = path
    return found

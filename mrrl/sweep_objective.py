"""The number a sweep job returns: ``objective=<key>`` picks one metric of the stage's outputs.

Hydra's Optuna sweeper (``hydra/sweeper=optuna_tpe`` or ``ppo_optuna``, ``pip install -e ".[sweep]"``) needs the
task function to return a float. With ``objective`` unset, ``mrrl``'s task function returns the stage's outputs
(the dictionary that is also its manifest's ``"outputs"``); with ``objective=final_metrics.fid/mean`` it returns
that one number. The key is dotted (``models.r3d.val.spearman``); a metric name that itself contains dots is
matched whole. A stage that had already finished (its manifest says so, nothing was rerun) reports the value
from ``<run_dir>/manifest.json``, after checking that the manifest was written with this job's overrides.

Non-finite values follow Optuna's conventions: ``±inf`` is a valid (if extreme) value and is returned as is;
NaN (or ``null``, which stages write for NaN) means the trial failed. Returning NaN itself aborts the whole
sweep in hydra-optuna-sweeper ≤ 1.3.0 (Hydra issue #2237: it tells Optuna "complete" with NaN, then
"failed" with the same values, which Optuna refuses), so the job returns ``None`` instead: the plugin cannot
convert it to a float, records the trial as failed (logging "Failed experiment") and the study goes on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mrrl.errors import ConfigError, ManifestError
from mrrl.manifest import MANIFEST_NAME

log = logging.getLogger("mrrl")

MAX_LISTED_KEYS = 40
# Overrides that do not change what a finished stage computed.
_NEUTRAL_OVERRIDES = ("objective", "print_config", "stage.force", "stage.progress_bar", "hydra.")


def check_objective(cfg: DictConfig) -> None:
    """Refuse, before the stage runs, objectives that cannot exist when it ends."""
    key = cfg.objective
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"objective={key!r} is not a dotted key (e.g. objective=final_metrics.fid/mean)")
    stage = cfg.stage
    if stage.name == "ppo" and key.startswith("final_metrics.fid/"):
        every = int(stage.probe.every or 0)
        iterations = int(OmegaConf.select(stage, "trainer.max_epochs", default=None) or 0)
        if every <= 0 or 0 < iterations < every:
            raise ConfigError(
                f"objective={key} needs PPO's FID probe, which runs every stage.probe.every={every} iterations "
                f"of stage.trainer.max_epochs={iterations}: set stage.probe.every to a divisor of max_epochs"
            )
        if iterations and iterations % every:
            log.warning(
                "objective %s: the last FID probe runs at iteration %d of %d (stage.probe.every=%d), not on "
                "the final policy",
                key,
                iterations - iterations % every,
                iterations,
                every,
            )


def objective_value(
    cfg: DictConfig, outputs: Mapping[str, Any] | None, run_dir: Path, task_overrides: Sequence[str] = ()
) -> float | None:
    """``cfg.objective`` looked up in the stage's outputs (or, for a finished stage, in its manifest).

    Returns ``None`` on ranks other than 0 (they have no outputs) and for NaN/null values (see the module
    docstring). Raises :class:`ConfigError` for a key that names nothing or something that is not a number.
    """
    key = str(cfg.objective)
    if _global_rank() != 0:
        return None
    stage = str(cfg.stage.name)
    source = "outputs"
    if outputs is None:
        outputs, source = finished_outputs(cfg, run_dir, task_overrides)
    value = lookup(outputs, key, f"the {stage} stage's {source}")
    if value is None or (_is_number(value) and math.isnan(value)):
        log.warning(
            "objective %s is %s in %s: the job returns None, so Optuna records the trial as failed",
            key,
            "null" if value is None else "NaN",
            run_dir,
        )
        return None
    if not _is_number(value):
        raise ConfigError(
            f"objective={key} is {_describe(value)} in the {stage} stage's {source}, not a number. "
            f"{_available(outputs)}"
        )
    log.info("objective %s = %s", key, float(value))
    return float(value)


def lookup(tree: Any, key: str, where: str) -> Any:
    """``tree[a][b]...`` for ``key = "a.b..."``; at each level the longest run of parts that is a key wins."""
    parts = key.split(".")
    node, i, path = tree, 0, []
    while i < len(parts):
        step = _child(node, parts, i)
        if step is None:
            at = f"'{'.'.join(path)}'" if path else "the top level"
            what = "no key" if isinstance(node, Mapping) else f"nothing to look into ({_describe(node)})"
            raise ConfigError(
                f"objective={key}: {what} '{'.'.join(parts[i:])}' at {at} of {where}. {_available(tree)}"
            )
        name, i = step
        node = node[name] if isinstance(node, Mapping) else node[int(name)]
        path.append(name)
    return node


def _child(node: Any, parts: list[str], i: int) -> tuple[str, int] | None:
    """The key (or list index) that ``parts[i:]`` starts with, and where the rest begins."""
    if isinstance(node, Mapping):
        for j in range(len(parts), i, -1):
            name = ".".join(parts[i:j])
            if name in node:
                return name, j
        return None
    if isinstance(node, Sequence) and not isinstance(node, str) and parts[i].isdigit():
        return (parts[i], i + 1) if int(parts[i]) < len(node) else None
    return None


def sqlite_storage(path: str) -> str:
    """``sqlite:///<absolute path>`` for Optuna's storage, creating its folder.

    The sweeper opens the database before any job has created the run folders; SQLite cannot create folders.
    Used by ``conf/hydra/sweeper/optuna_tpe.yaml`` (instantiated with the sweeper, so nothing is created
    when the config is only composed or printed).
    """
    problem = _rdb_storage_problem()
    if problem:
        raise ConfigError(problem)
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def _rdb_storage_problem() -> str | None:
    """Optuna 2 (what hydra-optuna-sweeper ≤ 1.3 pins) cannot create its tables with SQLAlchemy 2."""
    try:
        import optuna
        import sqlalchemy
    except ImportError:
        return None
    if _major(optuna.__version__) < 3 and _major(sqlalchemy.__version__) >= 2:
        return (
            f"Optuna {optuna.__version__} (pinned by hydra-optuna-sweeper) cannot use SQLite storage with "
            f'SQLAlchemy {sqlalchemy.__version__}: install the sweep extra (`pip install -e ".[sweep]"`, '
            "which pins sqlalchemy<2) or keep the study in memory with hydra.sweeper.storage=null"
        )
    return None


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def numeric_keys(tree: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys of every number (and null: a metric that was NaN) in a nested outputs dictionary."""
    items: Any = tree.items() if isinstance(tree, Mapping) else ()
    if isinstance(tree, Sequence) and not isinstance(tree, str):
        items = enumerate(tree)
    for name, value in items:
        dotted = f"{prefix}{name}"
        if isinstance(value, (Mapping, list, tuple)):
            yield from numeric_keys(value, dotted + ".")
        elif value is None or _is_number(value):
            yield dotted


def finished_outputs(
    cfg: DictConfig, run_dir: Path, task_overrides: Sequence[str] = ()
) -> tuple[Mapping[str, Any], str]:
    """The outputs of a stage that was already finished in ``run_dir``, checked against this job's overrides."""
    path = Path(run_dir) / MANIFEST_NAME
    stage = str(cfg.stage.name)
    if not path.is_file():
        raise ManifestError(
            f"objective={cfg.objective}: the {stage} stage returned no outputs and {path} does not exist"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}): rerun with stage.force=true") from exc
    if manifest.get("status") != "complete" or not isinstance(manifest.get("outputs"), Mapping):
        raise ManifestError(f"{path} does not hold a finished {stage} stage: rerun with stage.force=true")
    stale = _differences(cfg, manifest.get("config"), task_overrides)
    if stale:
        raise ConfigError(
            f"{run_dir} holds a finished {stage} run made with other settings ({'; '.join(stale)}), so its "
            f"objective would be reported for the wrong values. Use a new run directory (do not pass an "
            f"earlier sweep's hydra.sweep.dir to an Optuna sweep: its trials draw new values) or stage.force=true."
        )
    return manifest["outputs"], f"manifest ({path})"


def _differences(cfg: DictConfig, recorded: Any, task_overrides: Sequence[str]) -> list[str]:
    """``key: manifest value != job value`` for this job's command-line overrides the manifest disagrees with."""
    if not isinstance(recorded, Mapping):
        return []
    found = []
    for override in task_overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" not in override or not key or "@" in key or "/" in key or key.startswith(_NEUTRAL_OVERRIDES):
            continue
        current = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(current, DictConfig):  # a group choice (data=...): compared through its own keys
            continue
        if isinstance(current, ListConfig):
            current = OmegaConf.to_container(current, resolve=True)
        node: Any = recorded
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            if not _same(node, current):
                found.append(f"{key}: {node!r} there, {current!r} here")
    return found


def _same(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        a, b = float(a), float(b)
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _available(tree: Any) -> str:
    keys = list(numeric_keys(tree))
    if not keys:
        return "The outputs hold no numbers."
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = f", … ({len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return f"Available numeric keys: {shown}{more}."


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a dictionary with keys {', '.join(map(str, value))}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return f"{type(value).__name__} {value!r}"


def _global_rank() -> int:
    """This process's rank under DDP/SLURM/torchrun as Lightning sees it (0 in a single process)."""
    try:
        from lightning.pytorch.utilities import rank_zero_only
    except ImportError:  # pragma: no cover - lightning is a dependency
        return 0
    return int(getattr(rank_zero_only, "rank", 0) or 0)

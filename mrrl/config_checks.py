"""Up-front checks of the composed config: types, ranges and writable paths, one line per bad value.

Hydra checks that keys exist; nothing checks their values (``data.image_size=abc`` composes fine and
fails deep inside a stage). :func:`check_config` runs before any stage (``mrrl`` and ``mrrl-pipeline``)
and raises :class:`mrrl.errors.ConfigError`, which the CLI prints without a traceback. The
:class:`ConfigChecks` Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``) runs it before Hydra
creates the run directory, so an unwritable ``paths.run_root`` is a one-line error too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from mrrl.errors import ConfigError

_UNSET = object()
PRECISIONS = {"transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true"}
PRECISIONS |= {"bf16-mixed", "32-true", "64-true", "16", "32", "64", "bf16", 16, 32, 64}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_at_least(low: int, optional: bool = False) -> Callable[[Any], bool]:
    return lambda v: (optional and v is None) or (_is_int(v) and v >= low)


def _image_size(v: Any) -> bool:
    if isinstance(v, (list, tuple, ListConfig)):
        return len(v) == 3 and all(_is_int(s) and s >= 1 for s in v)
    return _is_int(v) and v >= 1


def _pair(low: float, high: float) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        return (
            isinstance(v, (list, tuple, ListConfig))
            and len(v) == 2
            and all(_is_number(x) for x in v)
            and low <= v[0] < v[1] <= high
        )

    return check


def _limit(v: Any) -> bool:
    """Lightning's limit_*_batches / val_check_interval: a batch count or a fraction of the epoch."""
    return v is None or (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)


INF = float("inf")
# key -> (accepts value?, what is expected)
DATA_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "image_size": (_image_size, "a positive int or [D, H, W] of positive ints"),
    "batch_size": (_int_at_least(1), "an int >= 1"),
    "eval_batch_size": (_int_at_least(1, optional=True), "null or an int >= 1"),
    "num_workers": (_int_at_least(0), "an int >= 0"),
    "preprocess_workers": (_int_at_least(0), "an int >= 0"),
    "test_per_class": (_int_at_least(0), "an int >= 0"),
    "val_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "split_seed": (_is_int, "an int"),
    "cdr_threshold": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "intensity_range": (_pair(-INF, INF), "[low, high] with low < high"),
    "percentiles": (_pair(0, 100), "[low, high] with 0 <= low < high <= 100"),
    "modalities": (
        lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0 and all(isinstance(m, str) for m in v),
        "a non-empty list of modality names",
    ),
    "augment.flip_prob": (lambda v: _is_number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "augment.crop_margin": (_int_at_least(0), "an int >= 0"),
}
TRAINER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_epochs": (_int_at_least(-1, optional=True), "null or an int >= -1 (-1: no limit)"),
    "min_epochs": (_int_at_least(0, optional=True), "null or an int >= 0"),
    "max_steps": (_int_at_least(-1), "an int >= -1 (-1: no limit)"),
    "min_steps": (_int_at_least(0, optional=True), "null or an int >= 0"),
    "log_every_n_steps": (_int_at_least(1), "an int >= 1"),
    "check_val_every_n_epoch": (_int_at_least(1, optional=True), "null or an int >= 1"),
    "accumulate_grad_batches": (_int_at_least(1), "an int >= 1"),
    "num_nodes": (_int_at_least(1), "an int >= 1"),
    "devices": (
        lambda v: (
            (_is_int(v) and (v >= 1 or v == -1))
            or isinstance(v, str)
            or (isinstance(v, (list, ListConfig)) and all(_is_int(d) for d in v))
        ),
        "an int >= 1, -1 (all), 'auto' or a list of device indices",
    ),
    "limit_train_batches": (_limit, "null, an int >= 0 (batches) or a float in [0, 1] (fraction)"),
    "limit_val_batches": (_limit, "null, an int >= 0 (batches) or a float in [0, 1] (fraction)"),
    "limit_test_batches": (_limit, "null, an int >= 0 (batches) or a float in [0, 1] (fraction)"),
    "val_check_interval": (_limit, "null, an int >= 0 (batches) or a float in [0, 1] (fraction)"),
    "gradient_clip_val": (lambda v: v is None or (_is_number(v) and v >= 0), "null or a number >= 0"),
    "precision": (lambda v: v in PRECISIONS, f"one of {sorted(str(p) for p in PRECISIONS)}"),
    "deterministic": (lambda v: v is None or isinstance(v, bool) or v == "warn", "true, false, warn or null"),
}


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return "null" if value is None else str(value)


def _select(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=_UNSET, throw_on_missing=False)
    except Exception as exc:  # an interpolation that cannot be resolved
        raise ConfigError(f"{key}: cannot be resolved ({exc})") from exc


def _writable_problem(key: str, value: Any, seen: set[Path]) -> str | None:
    """Why ``value`` is not a folder this process can create or write into (nothing is created here).

    ``seen``: folders already reported; paths below one of them (``paths.cache_dir`` under a bad
    ``paths.run_root``) are not reported again.
    """
    path = Path(str(value)).expanduser().absolute()
    probe = path
    try:
        while not probe.exists():
            probe = probe.parent
        if probe in seen:
            return None
        if not probe.is_dir():
            problem = f"{key}={value}: {probe} is a file, not a folder"
        elif not os.access(probe, os.W_OK | os.X_OK):
            problem = f"{key}={value}: cannot write in {probe} (permission denied); choose a writable folder"
        else:
            return None
    except OSError as exc:
        problem = f"{key}={value}: cannot be used ({exc.strerror or exc})"
    seen.add(probe)
    return problem


def config_problems(cfg: DictConfig) -> list[str]:
    """Every bad value of ``cfg``, one line each (empty when the config is fine)."""
    problems = []
    seed = _select(cfg, "seed")
    if seed is not _UNSET and not _is_int(seed):
        problems.append(f"seed={_show(seed)}: expected an int")
    if _select(cfg, "data") is not _UNSET:
        for key, (accepts, expected) in DATA_RULES.items():
            value = _select(cfg, f"data.{key}")
            if value is not _UNSET and not accepts(value):
                problems.append(f"data.{key}={_show(value)}: expected {expected}")
    stage_trainer = _select(cfg, "stage.trainer")
    for key, (accepts, expected) in TRAINER_RULES.items():
        in_stage = isinstance(stage_trainer, DictConfig) and key in stage_trainer
        full_key = f"stage.trainer.{key}" if in_stage else f"trainer.{key}"
        value = _select(cfg, full_key)
        if value is not _UNSET and not accepts(value):
            problems.append(f"{full_key}={_show(value)}: expected {expected}")
    writable = ["paths.run_root", "paths.cache_dir"]
    if _select(cfg, "data.phantom") not in (_UNSET, None):
        writable.append("data.root")  # a phantom cohort is written there
    seen: set[Path] = set()
    for key in writable:
        value = _select(cfg, key)
        problem = None if value in (_UNSET, None) else _writable_problem(key, value, seen)
        problems += [problem] if problem else []
    return problems


def check_config(cfg: DictConfig) -> None:
    """Raise one :class:`ConfigError` naming every bad value (one line each)."""
    problems = config_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(f"bad config value: {problems[0]}")
    if problems:
        raise ConfigError(f"{len(problems)} bad config values:\n" + "\n".join(f"  - {p}" for p in problems))


def exit_on_bad_config(cfg: DictConfig, program: str = "mrrl", stream=None) -> None:
    """:func:`check_config`, printed as ``<program>: error: …`` with exit status 1 (no traceback)."""
    try:
        check_config(cfg)
    except ConfigError as exc:
        print(f"{program}: error: {exc}", file=stream or sys.stderr)
        sys.exit(1)


class ConfigChecks(Callback):
    """Hydra callback: check the config before Hydra creates the run (or sweep) directory."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_on_bad_config(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_on_bad_config(config)


__all__: Sequence[str] = ["ConfigChecks", "check_config", "config_problems", "exit_on_bad_config"]

"""The held-out judge: the extractor of the headline Table 2 number must not be one the method saw.

The reward data are labelled with one extractor's FID (``stage=reward_data``) and PPO watches (and
selects on) a probe extractor; if either is the headline extractor, RL can look better on the headline
number simply because it was optimised for it. Extractors are compared by ``identity`` (name, options,
seed and a hash of the weights), read from those stages' manifests.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from mrrl.errors import ConfigError, ManifestError
from mrrl.manifest import read_manifest
from mrrl.metrics.extractors import VolumeFeatureExtractor, build_extractor


def check_headline_name(
    headline: str, extractors: Sequence[VolumeFeatureExtractor]
) -> VolumeFeatureExtractor:
    for e in extractors:
        if e.name == headline:
            return e
    names = [e.name for e in extractors]
    raise ConfigError(
        f"stage.metrics.headline_extractor={headline!r} is not among stage.metrics.extractors {names}: "
        "add it there or choose one of them"
    )


def _reward_data_identity(experiment_dir: str) -> str | None:
    try:
        return read_manifest(experiment_dir, "reward_data")["outputs"].get("extractor")
    except ManifestError:
        return None


def _ppo_probe_identity(experiment_dir: str, in_channels: int) -> str | None:
    """The PPO FID probe's extractor: recorded in the manifest, else rebuilt from the recorded config."""
    try:
        manifest = read_manifest(experiment_dir, "ppo")
    except ManifestError:
        return None
    recorded = (manifest["outputs"].get("probe") or {}).get("extractor")
    if recorded:
        return str(recorded)
    probe = ((manifest.get("config") or {}).get("stage") or {}).get("probe") or {}
    name = probe.get("extractor")
    if not name or not int(probe.get("every") or 0):
        return None
    options = {"in_channels": in_channels, **dict(probe.get("extractor_options") or {})}
    return build_extractor(str(name), **options).identity


def headline_judge(
    cfg: DictConfig, extractors: Sequence[VolumeFeatureExtractor], headline: str
) -> dict[str, Any]:
    """``{"extractor", "identity", "held_out", "coincides_with": [...], "checked": [...]}``; warns loudly
    when the headline extractor labelled the reward data or is PPO's probe."""
    judge = check_headline_name(headline, extractors)
    experiment_dir = str(cfg.paths.experiment_dir)
    others = {
        "reward_data (reward labels)": _reward_data_identity(experiment_dir),
        "ppo (FID probe)": _ppo_probe_identity(experiment_dir, judge.in_channels),
    }
    coincides = [what for what, identity in others.items() if identity == judge.identity]
    checked = [what for what, identity in others.items() if identity is not None]
    if coincides:
        message = (
            f"HEADLINE EXTRACTOR NOT HELD OUT: {judge.identity} is also the extractor of "
            f"{' and '.join(coincides)}; the RL row was optimised for the number it is judged by. "
            "Choose another stage.metrics.headline_extractor (e.g. another extractor or seed)."
        )
        warnings.warn(message, stacklevel=2)
        print("evaluate: " + "!" * 20 + "\nevaluate: " + message + "\nevaluate: " + "!" * 20)
    return {
        "extractor": judge.name,
        "identity": judge.identity,
        "held_out": not coincides,
        "coincides_with": coincides,
        "checked": checked,
    }

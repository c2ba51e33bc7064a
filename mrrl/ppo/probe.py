"""The held-out validation probe: FID/KID of the current policy's samples against the validation split."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mrrl.diffusion.generate import generate_volumes
from mrrl.errors import ConfigError, ManifestError
from mrrl.evaluation.real_sets import real_class_set
from mrrl.manifest import read_manifest
from mrrl.ppo.settings import PPOSettings

if TYPE_CHECKING:
    from mrrl.ppo.module import PPOModule


def check_probe_extractor(experiment_dir: str | Path, identity: str) -> None:
    """The probe's feature space must not be the reward data's (whose FIDs the reward models learned)."""
    try:
        outputs = read_manifest(experiment_dir, "reward_data")["outputs"]
    except ManifestError:
        return  # no reward_data manifest (reward models given by path): nothing to compare with
    if outputs.get("extractor") == identity:
        raise ConfigError(
            f"stage.probe.extractor {identity} is the extractor that labelled the reward data: the probe would "
            "share the reward's blind spots; pick another extractor or seed (stage.probe.extractor_options)"
        )


class ValidationProbe:
    """FID and KID per class of the current policy against the real volumes of the validation split.

    Runs on rank 0 with the rollout sampler (what the policy is optimised for) from a fixed seed, so
    successive probes differ only by the policy. The extractor must be neither the one that labelled the
    reward data nor the headline one (checked against the reward_data manifest when there is one): a probe
    sharing the reward's feature space would reward the same blind spots the policy learns to exploit.
    ``real_ids`` are the subjects it read (the tests check that no test subject is among them).
    ``experiment_dir``: where the reward_data manifest is looked for.
    """

    def __init__(self, settings: PPOSettings, datamodule, experiment_dir: str | Path, extractor=None):
        from mrrl.metrics.extractors import build_extractor
        from mrrl.metrics.features import extract_features

        probe = settings.probe  # its split was checked when the settings were built
        self.split = str(probe.split)
        if int(probe.n) < 2:
            raise ConfigError(f"stage.probe.n must be ≥ 2 (FID/KID need two volumes), got {probe.n}")
        if extractor is None:
            extractor = build_extractor(
                str(probe.extractor),
                in_channels=datamodule.image_shape[0],
                **dict(probe.extractor_options or {}),
            )
        self.extractor = extractor.eval()
        check_probe_extractor(experiment_dir, self.extractor.identity)
        self.settings = settings
        self.class_names = list(datamodule.class_names)
        self.real_ids: dict[str, list[str]] = {}
        self.real_features: dict[str, torch.Tensor] = {}
        for name in self.class_names:
            volumes, ids = real_class_set(datamodule, self.split, name)
            if len(ids) < 2:
                raise ConfigError(
                    f"the {self.split} split has {len(ids)} {name} volume(s); the probe's FID/KID need ≥ 2: "
                    "raise data.val_fraction, or set stage.probe.split=train or stage.probe.every=0"
                )
            self.real_ids[name] = list(ids)
            (self.real_features[name],) = extract_features([self.extractor], volumes, 8, "cpu")

    @torch.no_grad()
    def __call__(self, module: PPOModule) -> dict[str, float]:
        from mrrl.metrics.features import extract_features
        from mrrl.metrics.kid import kid as kernel_inception_distance
        from mrrl.metrics.statistics import FeatureStatistics

        sample = self.settings.sample
        self.extractor.to(module.device)
        out: dict[str, float] = {}
        generator = torch.Generator().manual_seed(int(self.settings.seed))
        fid, kid = {}, {}
        for label, name in enumerate(module.class_names):
            labels = torch.full((int(self.settings.probe.n),), label)
            volumes = generate_volumes(
                module.policy,
                module.vqgan,
                module.scale_factor,
                labels,
                module.latent_shape,
                num_steps=int(sample.num_steps),
                sampler=sample.sampler,
                eta=float(sample.eta),
                batch_size=int(sample.batch_size),
                generator=generator,
                quantize=bool(sample.decode_quantize),
            )
            (fake,) = extract_features([self.extractor], volumes, 8, module.device)
            real = self.real_features[name]
            fid[name] = FeatureStatistics.from_features(fake).frechet_distance(
                FeatureStatistics.from_features(real)
            )
            kid[name] = kernel_inception_distance(real, fake)
        for metric, values in (("fid", fid), ("kid", kid)):
            out.update({f"{metric}/{name}": float(v) for name, v in values.items()})
            out[f"{metric}/mean"] = float(sum(values.values()) / len(values))
        return out

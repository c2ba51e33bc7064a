"""The held-out validation probe: FID/KID of the current policy's samples against the validation split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from mrrl.diffusion.generate import (
    generate_volumes,
)
from mrrl.errors import ConfigError, ManifestError
from mrrl.evaluation.real_sets import real_class_set
from mrrl.manifest import read_manifest

if TYPE_CHECKING:
    from mrrl.ppo.module import PPOModule

PROBE_SPLITS = ("val", "train")  # never "test": the test split is the headline evaluation's alone


def check_probe_extractor(cfg: DictConfig, identity: str) -> None:
    """The probe's feature space must not be the reward data's (whose FIDs the reward models learned)."""
    try:
        outputs = read_manifest(cfg.paths.experiment_dir, "reward_data")["outputs"]
    except ManifestError:
        return  # no reward_data manifest (reward models given by path): nothing to compare with
    if outputs.get("extractor") == identity:
        raise ConfigError(
            f"stage.fid_extractor {identity} is the extractor that labelled the reward data: the probe would "
            "share the reward's blind spots; pick another extractor or seed (stage.fid_extractor_options)"
        )


class ValidationProbe:
    """FID and KID per class of the current policy against the real volumes of the validation split.

    Runs on rank 0 with the rollout sampler (what the policy is optimised for) from a fixed seed, so
    successive probes differ only by the policy. The extractor must be neither the one that labelled the
    reward data nor the headline one (checked against the reward_data manifest when there is one): a probe
    sharing the reward's feature space would reward the same blind spots the policy learns to exploit.
    ``real_ids`` are the subjects it read (the tests check that no test subject is among them).
    """

    def __init__(self, cfg: DictConfig, datamodule, extractor=None):
        from mrrl.metrics.extractors import build_extractor
        from mrrl.metrics.fid_report import extract_features

        stage = cfg.stage
        self.split = str(stage.fid_probe_split)
        if self.split not in PROBE_SPLITS:
            raise ConfigError(
                f"stage.fid_probe_split must be one of {PROBE_SPLITS} (the test split is for the final "
                f"evaluation only), got {self.split!r}"
            )
        if int(stage.fid_probe_n) < 2:
            raise ConfigError(
                f"stage.fid_probe_n must be ≥ 2 (FID/KID need two volumes), got {stage.fid_probe_n}"
            )
        if extractor is None:
            options = OmegaConf.to_container(stage.fid_extractor_options, resolve=True) or {}
            extractor = build_extractor(
                str(stage.fid_extractor), in_channels=datamodule.image_shape[0], **dict(options)
            )
        self.extractor = extractor.eval()
        check_probe_extractor(cfg, self.extractor.identity)
        self.stage = stage
        self.class_names = list(datamodule.class_names)
        self.real_ids: dict[str, list[str]] = {}
        self.real_features: dict[str, torch.Tensor] = {}
        for name in self.class_names:
            volumes, ids = real_class_set(datamodule, self.split, name)
            if len(ids) < 2:
                raise ConfigError(
                    f"the {self.split} split has {len(ids)} {name} volume(s); the probe's FID/KID need ≥ 2: "
                    "raise data.val_fraction, or set stage.fid_probe_split=train or stage.fid_every=0"
                )
            self.real_ids[name] = list(ids)
            (self.real_features[name],) = extract_features([self.extractor], volumes, 8, "cpu")

    @torch.no_grad()
    def __call__(self, module: PPOModule) -> dict[str, float]:
        from mrrl.metrics.fid_report import extract_features
        from mrrl.metrics.kid import kid as kernel_inception_distance
        from mrrl.metrics.statistics import FeatureStatistics

        stage = self.stage
        self.extractor.to(module.device)
        out: dict[str, float] = {}
        generator = torch.Generator().manual_seed(int(stage.seed))
        fid, kid = {}, {}
        for label, name in enumerate(module.class_names):
            labels = torch.full((int(stage.fid_probe_n),), label)
            volumes = generate_volumes(
                module.policy,
                module.vqgan,
                module.scale_factor,
                labels,
                module.latent_shape,
                num_steps=int(stage.num_steps),
                sampler=stage.sampler,
                eta=float(stage.eta),
                batch_size=int(stage.rollout_batch_size),
                generator=generator,
                quantize=bool(stage.decode_quantize),
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

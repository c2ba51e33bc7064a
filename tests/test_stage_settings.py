"""Typed settings of the vqgan and diffusion stages, the checkpoint resolver and the diffusion + VQGAN loader.

The settings must build from the composed config of the default and of every experiment (the YAML is their
only source of defaults); a missing key is a one-line ConfigError naming it; a stage that cannot find its
input checkpoint says which command to run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import compose_cfg, tiny_checkpoints
from omegaconf import OmegaConf, open_dict
from test_config import options

from mrrl.diffusion.latent_data import LatentDataSettings
from mrrl.diffusion.loading import load_diffusion_with_vqgan
from mrrl.diffusion.module import DiffusionModule, DiffusionSettings
from mrrl.errors import ConfigError, ManifestError, MissingPathError
from mrrl.manifest import resolve_checkpoint, write_manifest
from mrrl.settings import field_names, from_config
from mrrl.stages import diffusion as diffusion_stage
from mrrl.stages import vqgan as vqgan_stage
from mrrl.vqgan.module import VQGANModule, VQGANSettings

EXPERIMENTS = [None, *options("experiment")]


def _stage_cfg(stage: str, experiment: str | None, tmp_path: Path, *extra: str):
    overrides = [f"stage={stage}", *([f"experiment={experiment}"] if experiment else []), *extra]
    return compose_cfg(overrides, tmp_path)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_settings_build_from_every_experiment(experiment: str | None, tmp_path: Path) -> None:
    vq = _stage_cfg("vqgan", experiment, tmp_path)
    vq_settings = vqgan_stage.settings(vq)
    assert vq_settings.net.channels == list(vq.stage.net.channels)
    assert vq_settings.loss.perceptual.network == vq.stage.loss.perceptual.network
    assert vq_settings.optim.lr_g == vq.stage.optim.lr_g

    diff = _stage_cfg("diffusion", experiment, tmp_path)
    settings = diffusion_stage.settings(diff)
    loader = from_config(LatentDataSettings, diff.stage, "stage")
    assert settings.unet.channels == list(diff.stage.unet.channels)
    assert settings.optim.warmup_steps == diff.stage.optim.warmup_steps
    assert loader.balanced == diff.stage.balanced
    # The checkpoint's sampling record is the YAML's generation keys (sample_batch_size: 64 by default).
    assert settings.sampling == {
        "sampler": diff.stage.sampler,
        "num_steps": diff.stage.inference_steps,
        "eta": diff.stage.eta,
        "guidance_scale": diff.stage.guidance_scale,
        "batch_size": diff.stage.sample_batch_size,
        "decode_quantize": diff.stage.decode_quantize,
    }
    # Every key path the settings read exists in the YAML (no silent code defaults).
    for cls, node in (
        (VQGANSettings, vq.stage),
        (DiffusionSettings, diff.stage),
        (LatentDataSettings, diff.stage),
    ):
        for key in field_names(cls):
            assert OmegaConf.select(node, key, throw_on_missing=True) is not None or key in (
                "net.num_res_channels",
                "loss.perceptual.weights_path",
                "batch_size",
                "eval_batch_size",
            ), key
    # Stored in a checkpoint as plain dicts, rebuilt identically.
    assert from_config(DiffusionSettings, dataclasses.asdict(settings), "x") == settings
    assert from_config(VQGANSettings, dataclasses.asdict(vq_settings), "x") == vq_settings


def test_the_default_sampling_batch_is_the_yamls(tmp_path: Path) -> None:
    settings = diffusion_stage.settings(_stage_cfg("diffusion", None, tmp_path))
    assert settings.sample_batch_size == 64 and settings.optim.warmup_steps == 500


@pytest.mark.parametrize(
    ("stage", "key"),
    [
        ("vqgan", "loss.adv_ramp_steps"),
        ("vqgan", "discriminator.slices_per_volume"),
        ("diffusion", "optim.lr"),
        ("diffusion", "sample_batch_size"),
        ("diffusion", "ema.warmup"),
    ],
)
def test_a_missing_key_is_a_one_line_config_error(stage: str, key: str, tmp_path: Path) -> None:
    cfg = _stage_cfg(stage, None, tmp_path)
    parent, _, leaf = f"stage.{key}".rpartition(".")
    with open_dict(cfg):
        del OmegaConf.select(cfg, parent)[leaf]
    cls = VQGANSettings if stage == "vqgan" else DiffusionSettings
    with pytest.raises(
        ConfigError, match=rf"missing config key\(s\) stage\.{key.replace('.', '[.]')}"
    ) as err:
        from_config(cls, cfg.stage, "stage")
    assert "\n" not in str(err.value)
    check = vqgan_stage.check_config if stage == "vqgan" else diffusion_stage.check_config
    with pytest.raises(ConfigError, match=key.replace(".", "[.]")):  # before any data or training
        check(cfg, (1, 32, 32, 32) if stage == "vqgan" else (8, 8, 8, 8))


def test_modules_rebuild_their_settings_from_checkpoint_hyper_parameters(tmp_path: Path) -> None:
    ckpts = tiny_checkpoints(tmp_path, ["HGG", "LGG"])
    for cls, path in ((VQGANModule, ckpts["vqgan"]), (DiffusionModule, ckpts["diffusion"])):
        hparams = torch.load(path, map_location="cpu", weights_only=False)["hyper_parameters"]
        module = cls(**hparams)
        assert dataclasses.asdict(module.settings).items() <= hparams.items()
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
        del hparams["optim"]
        with pytest.raises(ConfigError, match=r"hyper_parameters\.optim"):
            cls(**hparams)


# ---------------------------------------------------------------------------------------------- resolver


def test_resolver_prefers_the_given_path_then_the_manifest(tmp_path: Path) -> None:
    experiment = tmp_path / "exp"
    with pytest.raises(
        ManifestError, match=r"no vqgan manifest .*`mrrl stage=vqgan`.*stage\.vqgan_ckpt"
    ) as err:
        resolve_checkpoint(None, experiment, "vqgan", "stage.vqgan_ckpt")
    assert "\n" not in str(err.value)
    with pytest.raises(MissingPathError, match=r"stage\.vqgan_ckpt=.*nope\.ckpt does not exist") as err:
        resolve_checkpoint(tmp_path / "nope.ckpt", experiment, "vqgan", "stage.vqgan_ckpt")
    assert isinstance(err.value, ConfigError) and isinstance(err.value, ManifestError)

    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    last.write_bytes(b"x")
    write_manifest(experiment / "vqgan", "vqgan", {"best_ckpt": None, "last_ckpt": str(last)})
    assert resolve_checkpoint(None, experiment, "vqgan", "stage.vqgan_ckpt") == str(last)  # no best: last
    assert resolve_checkpoint(last, experiment, "vqgan", "stage.vqgan_ckpt") == str(last)
    write_manifest(experiment / "vqgan", "vqgan", {"best_ckpt": str(best), "last_ckpt": str(last)})
    with pytest.raises(
        ManifestError, match=r"best_ckpt=.*best\.ckpt, which does not exist: rerun `mrrl stage=vqgan`"
    ):
        resolve_checkpoint(None, experiment, "vqgan", "stage.vqgan_ckpt")
    with pytest.raises(ManifestError, match=r"names no checkpoint \(looked for final_ckpt\)"):
        write_manifest(experiment / "ppo", "ppo", {"last_ckpt": str(last)})
        resolve_checkpoint(None, experiment, "ppo", "stage.rl_ckpt", keys=["final_ckpt"])
    unfinished = json.loads((experiment / "vqgan" / "manifest.json").read_text()) | {"status": "running"}
    (experiment / "vqgan" / "manifest.json").write_text(json.dumps(unfinished))
    with pytest.raises(ManifestError, match="did not finish"):
        resolve_checkpoint(None, experiment, "vqgan", "stage.vqgan_ckpt")


# ---------------------------------------------------------------------------------------------- loader


def test_loader_returns_the_diffusion_model_with_its_own_vqgan(tmp_path: Path, caplog) -> None:
    ckpts = tiny_checkpoints(tmp_path / "a", ["HGG", "LGG"])
    loaded, vqgan, vqgan_ckpt = load_diffusion_with_vqgan(ckpts["diffusion"], fallback_vqgan=lambda: 1 / 0)
    assert vqgan_ckpt == ckpts["vqgan"] and loaded.class_names == ["HGG", "LGG"]
    assert not vqgan.training and vqgan.config.codebook_dim == loaded.latent_shape[0]

    other = tiny_checkpoints(tmp_path / "b", ["HGG", "LGG"])["vqgan"]
    assert load_diffusion_with_vqgan(ckpts["diffusion"], vqgan_ckpt=other).vqgan_ckpt == other
    with pytest.raises(ManifestError, match="does not exist"):
        load_diffusion_with_vqgan(ckpts["diffusion"], vqgan_ckpt=tmp_path / "missing.ckpt")

    Path(ckpts["vqgan"]).unlink()  # the recorded VQGAN is gone: the fallback decodes, with a warning
    with caplog.at_level(logging.WARNING, logger="mrrl.diffusion.loading"):
        assert load_diffusion_with_vqgan(ckpts["diffusion"], fallback_vqgan=other).vqgan_ckpt == other
    assert "which does not exist: decoding with" in caplog.text
    with pytest.raises(ManifestError, match=r"names the VQGAN .* which does not exist.*stage\.vqgan_ckpt"):
        load_diffusion_with_vqgan(ckpts["diffusion"])

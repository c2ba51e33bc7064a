"""The VQGAN stage end to end on a tiny dataset: fit with both discriminators, manifest, resume, latents."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_brats
from helpers import TINY_DATA, TINY_VQGAN, check_wandb_run, compose_cfg, stage_dir

from mrrl.errors import ConfigError
from mrrl.stages import vqgan as vqgan_stage
from mrrl.training.runtime import build_datamodule, seed_everything
from mrrl.vqgan.loading import ensure_latents, load_latents, load_vqgan


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_brats(tmp_path_factory.mktemp("vq") / "brats", n_hgg=5, n_lgg=5, modalities=("flair",))


def vqgan_cfg(data_root: Path, run_root: Path, *extra: str):
    return compose_cfg(
        [
            "stage=vqgan",
            "data=brats2019",
            f"data.root={data_root}",
            "experiment_name=vq",
            *TINY_DATA,
            *TINY_VQGAN,
            *extra,
        ],
        run_root,
    )


def test_fit_with_both_discriminators_writes_checkpoint_manifest_and_latents(data_root: Path, tmp_path: Path):
    cfg = vqgan_cfg(
        data_root,
        tmp_path,
        "stage.loss.adv_start_step=2",
        "stage.trainer.max_epochs=2",
        "stage.loss.feature_matching_weight=0.5",
        "logger=wandb",
        "logger.log_model=true",
    )
    seed_everything(0)
    run_dir = stage_dir(cfg)
    outputs = vqgan_stage.run(cfg, run_dir)
    run = check_wandb_run(run_dir, "vqgan", name="vq/vqgan", classes=["HGG", "LGG"])
    assert [a for a in run.artifacts if a[0] == "model"]  # logger.log_model: the checkpoints as artifacts
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["outputs"]["latent_shape"] == [4, 4, 4, 4]
    assert Path(outputs["best_ckpt"]).is_file() and Path(outputs["last_ckpt"]).name == "last.ckpt"
    for key in ("val/l1", "val/psnr", "val/ssim", "val/codebook_usage", "val/perplexity"):
        assert math.isfinite(manifest["outputs"]["val"][key]), key
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    d_losses = [float(r["train/d_loss"]) for r in rows if r.get("train/d_loss")]
    g_adv = [float(r["train/g_adv"]) for r in rows if r.get("train/g_adv")]
    assert d_losses and g_adv and all(math.isfinite(v) for v in d_losses + g_adv)  # discriminators were on
    assert list((run_dir / "figures").glob("val_reconstruction_*.png"))
    latents = load_latents(manifest["outputs"]["latents"])
    assert latents["latents"].shape == (10, 4, 4, 4, 4) and len(latents["ids"]) == 10
    assert set(latents["splits"]) == {"train", "val", "test"}
    # The generator loads without Lightning and reproduces the cached latents.
    net = load_vqgan(outputs["best_ckpt"])
    dm = build_datamodule(cfg).prepare()
    first = dm.dataset(latents["splits"][0])[0]
    assert first["id"] == latents["ids"][0]
    torch.testing.assert_close(net.encode(first["image"][None]), latents["latents"][:1])
    assert net.decode(latents["latents"][:1]).shape == (1, 1, 16, 16, 16)


def test_rerun_resumes_from_last_checkpoint(data_root: Path, tmp_path: Path) -> None:
    cfg = vqgan_cfg(data_root, tmp_path, "stage.trainer.max_epochs=1", "stage.latents.export=false")
    run_dir = stage_dir(cfg)
    vqgan_stage.run(cfg, run_dir)
    steps_first = int(
        torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]["generator_steps"]
    )
    assert steps_first == 3  # 6 training volumes, batch 2
    # Simulate an interruption: the manifest is gone, last.ckpt stays (marked so a resume is recognisable).
    (run_dir / "manifest.json").unlink()
    last = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    state["state_dict"]["generator_steps"] += 100
    torch.save(state, last)
    cfg2 = vqgan_cfg(data_root, tmp_path, "stage.trainer.max_epochs=2", "stage.latents.export=false")
    vqgan_stage.run(cfg2, run_dir)
    ckpt = torch.load(last, weights_only=False)
    assert int(ckpt["state_dict"]["generator_steps"]) == 106  # continued: one more epoch of 3 steps
    # A finished stage is not retrained.
    assert vqgan_stage.run(cfg2, run_dir) is None


def test_latent_cache_reused_and_rebuilt_when_checkpoint_changes(data_root: Path, tmp_path: Path) -> None:
    cfg = vqgan_cfg(data_root, tmp_path, "stage.trainer.max_epochs=1", "stage.latents.export=false")
    run_dir = stage_dir(cfg)
    vqgan_stage.run(cfg, run_dir)
    dm = build_datamodule(cfg).prepare()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "latents.pt"
    ensure_latents(ckpt, dm, out)
    stamp = out.stat().st_mtime_ns
    ensure_latents(ckpt, dm, out)
    assert out.stat().st_mtime_ns == stamp  # reused
    state = torch.load(ckpt, weights_only=False)
    state["state_dict"]["vqgan.quantizer.embedding"] += 0.5  # a different codebook = a different checkpoint
    torch.save(state, ckpt)
    ensure_latents(ckpt, dm, out)
    assert out.stat().st_mtime_ns != stamp  # rebuilt for the new checkpoint


def test_config_errors_before_training(data_root: Path, tmp_path: Path) -> None:
    cfg = vqgan_cfg(data_root, tmp_path, "data.image_size=18")
    with pytest.raises(ConfigError, match="not divisible"):
        vqgan_stage.check_config(cfg, (1, 18, 18, 18))
    cfg = vqgan_cfg(data_root, tmp_path, "stage.discriminator.num_layers=3")
    with pytest.raises(ConfigError, match="too small"):
        vqgan_stage.check_config(cfg, (1, 16, 16, 16))

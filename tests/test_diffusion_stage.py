"""The diffusion stage end to end on the latents of a tiny VQGAN: learning, checkpoint, EMA, resume, generation."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_brats
from helpers import TINY_DATA, TINY_VQGAN, check_wandb_run, compose_cfg, stage_dir

from mrrl.diffusion.generate import generate_volumes, load_diffusion, save_nifti
from mrrl.errors import ConfigError, ManifestError
from mrrl.stages import diffusion as diffusion_stage
from mrrl.stages import vqgan as vqgan_stage
from mrrl.training.runtime import seed_everything
from mrrl.vqgan.loading import load_latents, load_vqgan

TINY_DIFFUSION = [
    "stage.unet.channels=[8,16]",
    "stage.unet.attention_levels=[false,true]",
    "stage.unet.num_res_blocks=1",
    "stage.unet.num_head_channels=8",
    "stage.unet.norm_num_groups=8",
    "stage.progress_bar=false",
    "stage.trainer.check_val_every_n_epoch=1",
    "stage.checkpoint_every_n_steps=1",
    "stage.optim.lr=1e-3",
    "stage.optim.warmup_steps=0",
    "stage.ema.decay=0.9",
    "stage.val_sampling_steps=3",
    "stage.inference_steps=5",
    "stage.val_samples_per_class=1",
    "stage.sample_every_n_epochs=1",
    "stage.sample_batch_size=4",
]


@pytest.fixture(scope="module")
def vqgan_run(tmp_path_factory) -> dict:
    """A 1-epoch tiny VQGAN in experiment 'diff' (its manifest and latent cache are what the stage reads)."""
    root = tmp_path_factory.mktemp("diff")
    data_root = make_brats(root / "brats", n_hgg=5, n_lgg=5, modalities=("flair",))
    run_root = root / "runs"
    cfg = compose_cfg(
        [
            "stage=vqgan",
            "data=brats2019",
            f"data.root={data_root}",
            "experiment_name=diff",
            *TINY_DATA,
            *TINY_VQGAN,
            "stage.trainer.max_epochs=1",
        ],
        run_root,
    )
    seed_everything(0)
    outputs = vqgan_stage.run(cfg, stage_dir(cfg))
    return {"data_root": data_root, "run_root": run_root, **outputs}


def diffusion_cfg(vqgan_run: dict, *extra: str, run_root: Path | None = None, experiment: str = "diff"):
    return compose_cfg(
        [
            "stage=diffusion",
            "data=brats2019",
            f"data.root={vqgan_run['data_root']}",
            f"experiment_name={experiment}",
            *TINY_DATA,
            *TINY_DIFFUSION,
            *extra,
        ],
        run_root or vqgan_run["run_root"],
    )


@pytest.fixture(scope="module")
def trained(vqgan_run: dict, tmp_path_factory) -> dict:
    """One tiny diffusion run (2 epochs of 3 steps, classifier-free guidance on) into its own run directory."""
    cfg = diffusion_cfg(
        vqgan_run,
        "stage.trainer.max_epochs=2",
        "stage.cfg_dropout=0.3",
        "stage.guidance_scale=1.5",
        "logger=wandb",
    )
    run_dir = tmp_path_factory.mktemp("diffusion_run")
    seed_everything(0)
    outputs = diffusion_stage.run(cfg, run_dir)
    return {"cfg": cfg, "run_dir": run_dir, "outputs": outputs}


def train_latents(latent_path: str | Path) -> torch.Tensor:
    cache = load_latents(latent_path)
    return cache["latents"][[i for i, s in enumerate(cache["splits"]) if s == "train"]]


# ------------------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_lowers_the_loss_on_a_fixed_batch(vqgan_run: dict, prediction_type: str) -> None:
    cfg = diffusion_cfg(vqgan_run, f"stage.schedule.prediction_type={prediction_type}")
    datamodule = diffusion_stage.build_latent_datamodule(cfg, Path(vqgan_run["latents"]))
    datamodule.setup()
    torch.manual_seed(0)
    module = diffusion_stage.build_module(cfg, datamodule, vqgan_run["best_ckpt"])
    module.set_scale_factor(1.0 / float(datamodule.train_latents.std(unbiased=False)))
    assert module.denoiser.prediction_type == prediction_type
    optimizer = module.configure_optimizers()["optimizer"]
    latents, labels = datamodule.train_latents[:4], datamodule.datasets["train"].labels[:4]
    generator = torch.Generator().manual_seed(0)
    noise, timesteps = torch.randn(latents.shape, generator=generator), torch.tensor([50, 300, 600, 900])
    losses = []
    for _ in range(40):
        loss = module.diffusion_loss(latents, labels, noise=noise, timesteps=timesteps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert (
        losses[0] > 0.5
    )  # MONAI zero-initialises the output layer: the first prediction is 0, targets ~N(0, 1)
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------------------------------------ the stage


def test_run_writes_checkpoints_manifest_and_figures(trained: dict) -> None:
    run_dir, outputs = trained["run_dir"], trained["outputs"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == "diffusion"
    out = manifest["outputs"]
    for key in ("best_ckpt", "last_ckpt", "ema_ckpt", "vqgan_ckpt", "latents"):
        assert Path(out[key]).is_file(), key
    assert out["latent_shape"] == [4, 4, 4, 4] and out["class_names"] == ["HGG", "LGG"]
    assert out["schedule"]["steps_offset"] == 1 and out["schedule"]["set_alpha_to_one"] is False
    assert out["prediction_type"] == "epsilon" and out["global_step"] == 6  # 6 training latents, batch 2
    assert np.isfinite(out["val_loss"]) and out["monitor"] == "val/loss"
    assert out["sampling"]["num_steps"] == 5 and out == outputs
    figures = sorted((run_dir / "figures").glob("val_samples_*.png"))
    assert len(figures) == 2  # sample_every_n_epochs=1, two epochs, none for the sanity check
    run = check_wandb_run(run_dir, "diffusion", f"diff/diffusion/{run_dir.name}", ["HGG", "LGG"])
    assert len(run.rows_with("val/samples")) == 2 and run.summary["final/global_step"] == 6
    ckpt = torch.load(out["last_ckpt"], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["schedule"]["steps_offset"] == 1
    assert ckpt["hyper_parameters"]["vqgan_ckpt"] == out["vqgan_ckpt"]


def test_scale_factor_is_stored_and_reloaded(trained: dict) -> None:
    out = trained["outputs"]
    expected = 1.0 / float(train_latents(out["latents"]).double().std(unbiased=False))
    state = torch.load(out["best_ckpt"], map_location="cpu", weights_only=False)["state_dict"]
    assert float(state["scale_factor"]) == pytest.approx(expected, rel=1e-6)
    assert out["scale_factor"] == pytest.approx(expected, rel=1e-6)
    for path in (out["best_ckpt"], out["ema_ckpt"]):
        loaded = load_diffusion(path)
        assert loaded.scale_factor == pytest.approx(expected, rel=1e-6)
        assert loaded.class_names == ["HGG", "LGG"] and loaded.latent_shape == (4, 4, 4, 4)
        assert loaded.vqgan_ckpt == out["vqgan_ckpt"] and loaded.denoiser.schedule.steps_offset == 1


def test_ema_weights_differ_from_raw_and_are_what_load_diffusion_returns(trained: dict) -> None:
    ckpt_path = trained["outputs"]["last_ckpt"]
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    ema_model, raw_model = load_diffusion(ckpt_path, use_ema=True), load_diffusion(ckpt_path, use_ema=False)
    ema_weights, raw_weights = ema_model.denoiser.unet.state_dict(), raw_model.denoiser.unet.state_dict()
    assert ema_weights.keys() == raw_weights.keys()
    assert any(not torch.equal(ema_weights[k], raw_weights[k]) for k in ema_weights)
    for key, value in ema_weights.items():
        assert torch.equal(value, state[f"ema.unet.{key}"])
        assert torch.equal(raw_weights[key], state[f"denoiser.unet.{key}"])
    assert not ema_model.denoiser.training and not any(
        p.requires_grad for p in ema_model.denoiser.parameters()
    )
    with pytest.raises(ManifestError, match="no raw"):
        load_diffusion(trained["outputs"]["ema_ckpt"], use_ema=False)


def test_class_conditioning_changes_the_loaded_model_output(trained: dict) -> None:
    denoiser = load_diffusion(trained["outputs"]["best_ckpt"]).denoiser
    x = torch.randn(2, 4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        out0, out1 = denoiser(x, t, torch.tensor([0, 0])), denoiser(x, t, torch.tensor([1, 1]))
    assert (out0 - out1).abs().max() > 1e-4


def test_rerun_resumes_from_last_checkpoint(vqgan_run: dict, tmp_path: Path) -> None:
    cfg = diffusion_cfg(vqgan_run, "stage.trainer.max_epochs=1", "stage.sample_every_n_epochs=0")
    diffusion_stage.run(cfg, tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 3
    # Simulate an interruption: no manifest, and a recognisable mark in last.ckpt's raw and EMA weights.
    (tmp_path / "manifest.json").unlink()
    key = next(k for k in state["state_dict"] if k.startswith("denoiser.unet.") and k.endswith("bias"))
    marked = state["state_dict"][key] + 100.0
    state["state_dict"][key] = marked.clone()
    state["state_dict"]["ema." + key[len("denoiser.") :]] = marked.clone()
    torch.save(state, last)
    cfg2 = diffusion_cfg(vqgan_run, "stage.trainer.max_epochs=2", "stage.sample_every_n_epochs=0")
    outputs = diffusion_stage.run(cfg2, tmp_path)
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 6 and outputs["global_step"] == 6  # one more epoch of 3 steps
    torch.testing.assert_close(
        resumed["state_dict"][key], marked, atol=0.1, rtol=0
    )  # continued from the mark
    assert diffusion_stage.run(cfg2, tmp_path) is None  # a finished stage is not retrained


def test_ddp_ranks_share_one_scale_factor_from_all_reduced_shards(vqgan_run: dict, tmp_path: Path) -> None:
    """Two gloo processes (ddp_fork: in-process safe, and the ranks inherit the imported modules instead of
    importing them again as spawned ones do): each rank's moments cover only its half of the training latents,
    so the stored scale factor equals 1/std of *all* of them only if the all-reduce ran."""
    cfg = diffusion_cfg(
        vqgan_run,
        "trainer=ddp_cpu",
        "trainer.strategy=ddp_fork",
        "stage.trainer.max_epochs=1",
        "stage.sample_every_n_epochs=0",
        "logger=none",
    )
    outputs = diffusion_stage.run(cfg, tmp_path)
    latents = train_latents(outputs["latents"]).double()
    expected = 1.0 / float(latents.std(unbiased=False))
    assert abs(1.0 / float(latents[0::2].std(unbiased=False)) - expected) > 1e-3 * expected  # shards differ
    state = torch.load(outputs["last_ckpt"], map_location="cpu", weights_only=False)
    assert float(state["state_dict"]["scale_factor"]) == pytest.approx(expected, rel=1e-6)
    assert outputs["scale_factor"] == pytest.approx(expected, rel=1e-6)
    assert state["global_step"] == 2 == outputs["global_step"]  # 6 latents over 2 ranks: 3 each, batch 2
    assert Path(outputs["best_ckpt"]).name == "best.ckpt" and np.isfinite(outputs["val_loss"])


def test_missing_vqgan_manifest_is_a_clear_error(vqgan_run: dict, tmp_path: Path) -> None:
    cfg = diffusion_cfg(vqgan_run, run_root=tmp_path, experiment="novq")
    with pytest.raises(ManifestError, match=r"no vqgan manifest.*stage\.vqgan_ckpt"):
        diffusion_stage.run(cfg, tmp_path / "run")
    cfg = diffusion_cfg(vqgan_run, f"stage.vqgan_ckpt={tmp_path / 'missing.ckpt'}", run_root=tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        diffusion_stage.run(cfg, tmp_path / "run")


def test_vqgan_ckpt_override_builds_the_latent_cache_in_the_run_dir(vqgan_run: dict, tmp_path: Path) -> None:
    cfg = diffusion_cfg(
        vqgan_run, f"stage.vqgan_ckpt={vqgan_run['best_ckpt']}", run_root=tmp_path, experiment="novq"
    )
    ckpt, latents = diffusion_stage.resolve_inputs(cfg, tmp_path / "run")
    assert latents == tmp_path / "run" / "latents.pt" and Path(ckpt) == Path(vqgan_run["best_ckpt"]).resolve()
    torch.testing.assert_close(
        load_latents(latents)["latents"], load_latents(vqgan_run["latents"])["latents"]
    )


def test_config_errors_before_training(vqgan_run: dict) -> None:
    shape = (4, 4, 4, 4)
    with pytest.raises(ConfigError, match="cfg_dropout"):
        diffusion_stage.check_config(diffusion_cfg(vqgan_run, "stage.guidance_scale=2.0"), shape)
    with pytest.raises(ConfigError, match="3-level"):
        diffusion_stage.check_config(
            diffusion_cfg(
                vqgan_run, "stage.unet.channels=[8,8,8]", "stage.unet.attention_levels=[false,false,false]"
            ),
            (4, 2, 2, 2),
        )
    with pytest.raises(ConfigError, match="repeats timesteps"):  # steps_offset=1 allows at most T-1 steps
        diffusion_stage.check_config(diffusion_cfg(vqgan_run, "stage.inference_steps=1000"), shape)


# ------------------------------------------------------------------------------------------------ generation


def test_generate_volumes_decodes_to_the_data_shape(trained: dict) -> None:
    out = trained["outputs"]
    loaded, vqgan = load_diffusion(out["ema_ckpt"]), load_vqgan(out["vqgan_ckpt"])
    labels = torch.tensor([0, 1, 1])

    def generate(batch_size: int) -> torch.Tensor:
        return generate_volumes(
            loaded.denoiser,
            vqgan,
            loaded.scale_factor,
            labels,
            loaded.latent_shape,
            num_steps=4,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(3),
        )

    volumes = generate(2)
    assert volumes.shape == (3, 1, 16, 16, 16) and volumes.dtype == torch.float32
    assert volumes.abs().max() <= 1.0 and volumes.std() > 0
    torch.testing.assert_close(generate(3), volumes)  # deterministic DDIM: independent of the sampling batch
    assert loaded.denoiser.supports_guidance  # trained with cfg_dropout > 0: the null label exists
    guided = generate_volumes(
        loaded.denoiser,
        vqgan,
        loaded.scale_factor,
        labels,
        loaded.latent_shape,
        num_steps=4,
        batch_size=2,
        generator=torch.Generator().manual_seed(3),
        guidance_scale=3.0,
        clamp=None,
        quantize=False,
    )
    assert guided.shape == volumes.shape and not torch.allclose(guided.clamp(-1, 1), volumes)


def test_save_nifti_round_trips_with_a_ras_affine(tmp_path: Path) -> None:
    volume = torch.linspace(-1, 1, 8 * 6 * 4).reshape(1, 8, 6, 4)
    path = save_nifti(volume, tmp_path / "sample.nii.gz", spacing_mm=(1.5, 2.0, 2.5))
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    assert data.shape == (8, 6, 4) and data.dtype == np.float32
    np.testing.assert_allclose(data, (volume[0].numpy() + 1) / 2, atol=1e-6)  # [-1, 1] -> [0, 1]
    assert image.header.get_zooms() == (1.5, 2.0, 2.5)
    np.testing.assert_allclose(image.affine[:3, :3], np.diag([1.5, 2.0, 2.5]))
    np.testing.assert_allclose(image.affine @ [3.5, 2.5, 1.5, 1], [0, 0, 0, 1])  # centred on the origin
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.get_qform(), image.get_sform())
    kept = nib.load(str(save_nifti(volume * 3, tmp_path / "raw.nii", intensity_range=None)))
    np.testing.assert_allclose(np.asarray(kept.dataobj), volume[0].numpy() * 3, atol=1e-6)

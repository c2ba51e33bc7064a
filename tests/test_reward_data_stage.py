"""The reward-data stage: groups, FIDs, rewards, resumability, the dataset the reward stage reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_brats
from helpers import TINY_DATA, check_wandb_run, compose_cfg, run_mrrl, stage_dir, tiny_checkpoints

from mrrl.errors import ConfigError, ManifestError
from mrrl.evaluation.real_sets import real_class_set
from mrrl.reward.dataset import load_reward_dataset
from mrrl.stages import reward_data as reward_data_stage
from mrrl.training.runtime import build_datamodule
from mrrl.vqgan.loading import load_vqgan

STEPS = [
    "stage.synthetic_steps=[2,8]",
    "stage.reconstruction_steps=[1,6]",
    "stage.reconstruction_num_steps=8",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rd")
    data = make_brats(root / "brats", n_hgg=4, n_lgg=4, modalities=("flair",))
    ckpts = tiny_checkpoints(root / "ckpt", ["HGG", "LGG"], image_size=16)
    return {"data": data, "ckpts": ckpts, "root": root}


def cfg_for(setup: dict, run_root: Path, *extra: str):
    return compose_cfg(
        [
            "stage=reward_data",
            "data=brats2019",
            f"data.root={setup['data']}",
            *TINY_DATA,
            f"stage.diffusion_ckpt={setup['ckpts']['diffusion']}",
            f"stage.vqgan_ckpt={setup['ckpts']['vqgan']}",
            "stage.n_per_group=3",
            "stage.sample_batch_size=4",
            "stage.progress_bar=false",
            *STEPS,
            *extra,
        ],
        run_root,
    )


def test_builds_groups_rewards_and_a_loadable_dataset(setup: dict, tmp_path: Path) -> None:
    cfg = cfg_for(setup, tmp_path, "logger=wandb")
    run_dir = stage_dir(cfg)
    outputs = reward_data_stage.run(cfg, run_dir)
    groups = outputs["groups"]
    assert len(groups) == 2 * 4 and outputs["num_volumes"] == 24
    for name in ("HGG", "LGG"):
        members = [g for g in groups if g["class"] == name]
        rewards = sorted(g["reward"] for g in members)
        assert rewards[0] == 0.0 and rewards[-1] == 1.0  # linear map within the class
        best = min(members, key=lambda g: g["fid"])
        assert best["reward"] == 1.0 and all(np.isfinite(g["fid"]) for g in members)
        assert np.isfinite(outputs["vqgan_limit_fid"][name])
    dataset = load_reward_dataset(outputs["dataset_dir"])
    assert len(dataset) == 24 and dataset.image_shape == (1, 16, 16, 16)
    item = dataset[0]
    assert item["image"].shape == (1, 16, 16, 16) and float(item["image"].abs().max()) <= 1.0
    recon = [r for r in dataset.rows if r["trajectory"] == "reconstruction"]
    assert recon and all(r["source_id"].startswith("BraTS19_TEST_") for r in recon)
    assert (
        Path(outputs["fid_plot"]).is_file()
        and "VQGAN reconstruction limit" in Path(outputs["summary_md"]).read_text()
    )
    # W&B: FID per trajectory and class against sampler steps (rising), the limit line, the group table.
    run = check_wandb_run(run_dir, "reward_data", "default/reward_data", ["HGG", "LGG"])
    steps = [r["reward_data/steps"] for r in run.rows_with("reward_data/fid/synthetic/HGG")]
    assert steps == sorted(steps) and len(steps) == len(
        {g["steps"] for g in groups if g["trajectory"] == "synthetic"}
    )
    assert run.summary["reward_data/vqgan_limit/HGG"] == pytest.approx(outputs["vqgan_limit_fid"]["HGG"])


def test_rerun_after_interruption_regenerates_nothing_finished(
    setup: dict, tmp_path: Path, monkeypatch
) -> None:
    cfg = cfg_for(setup, tmp_path)
    run_dir = stage_dir(cfg)
    first = reward_data_stage.run(cfg, run_dir)
    fids = json.loads((run_dir / "group_fids.json").read_text())
    # Interrupted before the end: no manifest, one group's FID lost (its volumes are on disk).
    (run_dir / "manifest.json").unlink()
    del fids["synthetic-8-LGG"]
    (run_dir / "group_fids.json").write_text(json.dumps(fids))
    calls: list[str] = []
    original = reward_data_stage.GroupGenerator.synthetic

    def counting(self, group, n):
        calls.append(group.name)
        return original(self, group, n)

    monkeypatch.setattr(reward_data_stage.GroupGenerator, "synthetic", counting)
    again = reward_data_stage.run(cfg, run_dir)
    assert calls == ["synthetic-8-LGG"]  # only the group without a FID is made again
    assert [g["fid"] for g in again["groups"]] == pytest.approx([g["fid"] for g in first["groups"]])


def test_fade_groups_are_dimmed_reconstructions_down_to_a_blank_volume(setup: dict, tmp_path: Path) -> None:

    cfg = cfg_for(
        setup,
        tmp_path,
        "stage.synthetic_steps=[2]",
        "stage.reconstruction_steps=[1]",
        "stage.fade_levels=[0,50]",
        "logger=wandb",
    )
    outputs = reward_data_stage.run(cfg, stage_dir(cfg))
    run = check_wandb_run(stage_dir(cfg), "reward_data", "default/reward_data", ["HGG", "LGG"])
    assert {"reward_data/fid/fade/HGG", "reward_data/fid/fade/LGG"} <= run.keys  # the dashboard's fade curve
    fade = {g["group"]: g for g in outputs["groups"] if g["trajectory"] == "fade"}
    assert sorted(fade) == ["fade-0-HGG", "fade-0-LGG", "fade-50-HGG", "fade-50-LGG"]
    assert all(np.isfinite(g["fid"]) for g in fade.values())
    dataset = load_reward_dataset(outputs["dataset_dir"])
    by_group = {}
    for i, row in enumerate(dataset.rows):
        by_group.setdefault(row["id"].rsplit("-", 1)[0], []).append(i)
    blank = np.stack([dataset[i]["image"].numpy() for i in by_group["fade-0-HGG"]])
    assert np.all(blank == -1.0)  # 0 % of the contrast kept: the background everywhere
    vqgan = load_vqgan(setup["ckpts"]["vqgan"])
    volumes, ids = real_class_set(build_datamodule(cfg).prepare(), "train", "HGG")
    i = by_group["fade-50-HGG"][0]
    source = volumes[ids.index(dataset.rows[i]["source_id"])]
    with torch.no_grad():
        recon = vqgan.reconstruct(source[None]).float().clamp(-1, 1)[0]
    expected = -1.0 + 0.5 * (recon + 1.0)  # half the contrast above the background (float16 on disk)
    np.testing.assert_allclose(dataset[i]["image"].numpy(), expected.numpy(), atol=2e-3)


def test_bad_steps_and_missing_inputs_are_clear_errors(setup: dict, tmp_path: Path) -> None:
    cfg = cfg_for(setup, tmp_path, "stage.reconstruction_steps=[1,9]")
    with pytest.raises(ConfigError, match="reconstruction_steps"):
        reward_data_stage.run(cfg, stage_dir(cfg))
    cfg = cfg_for(setup, tmp_path, "stage.fade_levels=[100]")
    with pytest.raises(ConfigError, match=r"fade_levels \[100\]: each is the % of contrast kept"):
        reward_data_stage.run(cfg, stage_dir(cfg))
    cfg = compose_cfg(
        ["stage=reward_data", "data=brats2019", f"data.root={setup['data']}", *TINY_DATA], tmp_path
    )
    with pytest.raises(ManifestError, match="stage.diffusion_ckpt"):
        reward_data_stage.run(cfg, stage_dir(cfg))


def test_two_ranks_share_the_generation_and_rank_zero_writes(setup: dict, tmp_path: Path) -> None:
    """``trainer=ddp_cpu``: two gloo processes through the real CLI, each making half of every group."""
    import csv

    args = [
        "stage=reward_data",
        "data=brats2019",
        f"data.root={setup['data']}",
        *TINY_DATA,
        "trainer=ddp_cpu",
        f"stage.diffusion_ckpt={setup['ckpts']['diffusion']}",
        f"stage.vqgan_ckpt={setup['ckpts']['vqgan']}",
        "stage.n_per_group=3",
        "stage.sample_batch_size=4",
        "stage.progress_bar=false",
        *STEPS,
        f"paths.run_root={tmp_path}",
        "experiment_name=ddp",
    ]
    result = run_mrrl(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ddp" / "reward_data"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["outputs"]["num_volumes"] == 24
    assert result.stdout.count("# Reward data: FID per group") == 1  # only rank 0 reports and writes
    dataset = load_reward_dataset(manifest["outputs"]["dataset_dir"])
    assert len(dataset) == 24
    # The real subjects behind the reconstructions are drawn identically to a single process's.
    single = reward_data_stage.run(cfg_for(setup, tmp_path / "single"), tmp_path / "single" / "rd")
    rows = {
        r["id"]: r["source_id"]
        for r in csv.DictReader(open(Path(manifest["outputs"]["dataset_dir"]) / "manifest.csv"))
    }
    single_rows = {
        r["id"]: r["source_id"] for r in csv.DictReader(open(Path(single["dataset_dir"]) / "manifest.csv"))
    }
    assert rows == single_rows

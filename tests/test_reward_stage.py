"""The reward stage: dataset format (writer/reader), FID→reward maps, split, R3D/R2D, ``mrrl stage=reward``.

The fake reward dataset has 4 groups × 6 volumes of 16³ whose quality is a noise level that falls as the
reward rises, so the regressors can learn it in a few epochs on CPU.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import check_wandb_run, compose_cfg, stage_dir

from mrrl.errors import ConfigError, ManifestError
from mrrl.manifest import write_manifest
from mrrl.reward.dataset import load_reward_dataset
from mrrl.reward.format import RewardDataError
from mrrl.reward.losses import pairwise_ranking_accuracy, pairwise_ranking_loss
from mrrl.reward.maps import fid_to_reward
from mrrl.reward.models import SliceRewardNet, build_reward_net, load_reward_model
from mrrl.reward.ranking_metrics import reward_metrics, score_dataset
from mrrl.reward.splits import ensure_split, split_reward_rows
from mrrl.reward.writer import RewardDatasetWriter
from mrrl.stages import reward as reward_stage
from mrrl.training.runtime import seed_everything

SHAPE = (1, 16, 16, 16)
SALT = 0
FIDS = {
    "reconstruction-1-HGG": 10.0,
    "reconstruction-50-HGG": 30.0,
    "synthetic-100-LGG": 50.0,
    "synthetic-10-LGG": 90.0,
}
TINY_REWARD = [
    "stage=reward",
    "experiment_name=rw",
    "stage.progress_bar=false",
    "stage.num_workers=0",
    "stage.val_fraction=0.34",
    "stage.monitor=mse",
    "stage.optim.lr=5e-3",
    "trainer.log_every_n_steps=1",
    "stage.r3d.arch=resnet10",
    "stage.r3d.width=8",
    "stage.r3d.conv1_kernel=3",
    "stage.r3d.batch_size=4",
    "stage.r2d.arch=resnet10",
    "stage.r2d.width=8",
    "stage.r2d.conv1_kernel=3",
    "stage.r2d.batch_size=4",
    "stage.r2d.slices_per_volume=4",
]


def phantom(seed: int) -> np.ndarray:
    """A sphere with smooth random texture in a -1 background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, SHAPE[1])] * 3, indexing="ij"))
    texture = 0.3 * np.sin(3 * grid[0] + rng.uniform(0, 6)) * np.cos(2 * grid[1] + rng.uniform(0, 6))
    return np.where(np.sqrt((grid**2).sum(0)) < 0.8, 0.2 + texture, -1.0).astype(np.float32)[None]


def group_volumes(group: str, reward: float, n: int = 6) -> tuple[np.ndarray, list[dict]]:
    """Volumes of one group (noise σ falls with the reward) and their rows; reconstructions share sources."""
    trajectory, steps, cls = group.split("-")
    rng = np.random.default_rng(zlib.crc32(f"{SALT}:{group}".encode()))  # not hash(): salted per process
    vols, rows = [], []
    for i in range(n):
        recon = trajectory == "reconstruction"
        base = phantom(i if recon else 1000 + int(steps) * 10 + i)
        vols.append(np.clip(base + rng.normal(0, 0.05 + 0.5 * (1 - reward), base.shape), -1, 1))
        rows.append(
            {
                "id": f"{group}-{i}",
                "class": cls,
                "label": int(cls == "LGG"),
                "trajectory": trajectory,
                "steps": int(steps),
                "source_id": f"subj{i}" if recon else "",
            }
        )
    return np.stack(vols), rows


def make_dataset(root: Path, fids: dict[str, float] = FIDS, n: int = 6, dtype: str = "float16") -> Path:
    rewards = fid_to_reward(fids)
    writer = RewardDatasetWriter(root, SHAPE, capacity=n * len(fids), dtype=dtype)
    for group in fids:
        writer.add_group(group, *group_volumes(group, rewards[group], n))
    writer.finalize(
        {g: {"fid": f, "reward": rewards[g]} for g, f in fids.items()},
        {"extractor": "fake", "reward_map": {"method": "linear"}},
    )
    return root


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("reward") / "reward_dataset")


def reward_cfg(dataset_dir: Path | None, run_root: Path, *extra: str):
    data = [f"stage.dataset_dir={dataset_dir}"] if dataset_dir else []
    return compose_cfg([*TINY_REWARD, *data, *extra], run_root)


@pytest.fixture(scope="module")
def trained(dataset_dir: Path, tmp_path_factory):
    cfg = reward_cfg(
        dataset_dir, tmp_path_factory.mktemp("runs"), "stage.trainer.max_epochs=16", "logger=wandb"
    )
    seed_everything(0)
    outputs = reward_stage.run(cfg, stage_dir(cfg))
    return cfg, stage_dir(cfg), outputs


# ---------------------------------------------------------------------------------------------- format


def test_writer_reader_round_trip_is_memory_mapped(dataset_dir: Path) -> None:
    ds = load_reward_dataset(dataset_dir)
    assert len(ds) == 24 and ds.image_shape == SHAPE and ds.group_names == list(FIDS)
    assert (
        isinstance(ds.volumes, np.memmap)
        and ds.volumes.dtype == np.float16
        and ds.volumes.shape == (24, *SHAPE)
    )
    assert len(pickle.dumps(ds)) < 20_000  # workers reopen the map; its 200 kB are not pickled
    rewards = fid_to_reward(FIDS)
    vols, rows = group_volumes("synthetic-100-LGG", rewards["synthetic-100-LGG"])
    item = ds[12 + 3]
    assert ds.rows[15]["id"] == rows[3]["id"] and ds.rows[15]["source_id"] == ""
    np.testing.assert_allclose(item["image"].numpy(), vols[3], atol=1e-3)
    assert item["image"].dtype == torch.float32 and float(item["reward"]) == pytest.approx(0.5)
    assert int(item["label"]) == 1 and ds.group_names[int(item["group"])] == "synthetic-100-LGG"
    meta = json.loads((dataset_dir / "reward_data.json").read_text())
    assert meta["num_volumes"] == 24 and meta["class_names"] == ["HGG", "LGG"] and meta["extractor"] == "fake"
    assert meta["counts"]["per_trajectory"] == {"reconstruction": 12, "synthetic": 12}
    groups = list(csv.DictReader((dataset_dir / "groups.csv").open()))
    assert [(g["group"], float(g["reward"]), int(g["count"])) for g in groups][0] == (
        "reconstruction-1-HGG",
        1.0,
        6,
    )
    manifest = list(csv.DictReader((dataset_dir / "manifest.csv").open()))
    assert list(manifest[0]) == [
        "index",
        "id",
        "class",
        "label",
        "trajectory",
        "steps",
        "group",
        "group_fid",
        "reward",
        "source_id",
    ]
    assert manifest[7]["source_id"] == "subj1" and float(manifest[7]["group_fid"]) == 30.0
    assert np.load(dataset_dir / "volumes.npy", allow_pickle=False).shape == (24, *SHAPE)


def test_writer_resumes_after_interruption(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rewards = fid_to_reward(FIDS)
    groups = list(FIDS)
    writer = RewardDatasetWriter(root, SHAPE, capacity=30, dtype="float32")
    assert writer.add_group(groups[0], *group_volumes(groups[0], rewards[groups[0]]))
    vols, rows = group_volumes(groups[1], rewards[groups[1]])
    writer.add(vols[:4], [{**r, "group": groups[1]} for r in rows[:4]])  # a batch of an unfinished group
    del writer  # interrupted here
    writer = RewardDatasetWriter(root, SHAPE, capacity=30, dtype="float32")
    assert (
        writer.completed_groups == [groups[0]] and writer.count(groups[1]) == 4 and writer.num_written == 10
    )
    assert not writer.add_group(groups[0], *group_volumes(groups[0], 1.0))  # complete: skipped
    writer.add(vols[4:], [{**r, "group": groups[1]} for r in rows[4:]])
    writer.mark_complete(groups[1])
    for g in groups[2:]:
        writer.add_group(g, *group_volumes(g, rewards[g]))
    with pytest.raises(RewardDataError, match="already complete"):
        writer.add(vols[:1], [{**rows[0], "id": "new", "group": groups[1]}])
    with pytest.raises(RewardDataError, match="duplicate"):
        writer.add(vols[:1], [{**rows[0], "trajectory": "synthetic", "steps": 7}])
    with pytest.raises(RewardDataError, match="capacity"):
        writer.add(np.zeros((7, *SHAPE)), [{**rows[0], "id": f"x{i}", "steps": 3} for i in range(7)])
    with pytest.raises(RewardDataError, match="NaN"):
        writer.add(np.full((1, *SHAPE), np.nan), [{**rows[0], "id": "nan", "steps": 3}])
    writer.finalize([{"group": g, "fid": f, "reward": rewards[g]} for g, f in FIDS.items()])
    ds = load_reward_dataset(root)
    assert [r["index"] for r in ds.rows] == list(range(24)) and ds.volumes.shape[0] == 24  # shrunk to N rows
    np.testing.assert_allclose(ds[10]["image"].numpy(), vols[4])
    with pytest.raises(RewardDataError, match="shape"):
        RewardDatasetWriter(root, (1, 8, 8, 8), capacity=30, dtype="float32")
    reopened = RewardDatasetWriter(root, SHAPE, capacity=30, dtype="float32")  # grows the file back
    assert reopened.num_written == 24 and np.load(root / "volumes.npy", mmap_mode="r").shape[0] == 30
    reopened.finalize({g: {"fid": f, "reward": rewards[g]} for g, f in FIDS.items()})
    assert load_reward_dataset(root).volumes.shape[0] == 24


def test_finalize_refuses_incomplete_or_unrewarded_groups(tmp_path: Path) -> None:
    writer = RewardDatasetWriter(tmp_path / "ds", SHAPE, capacity=12)
    vols, rows = group_volumes("synthetic-10-LGG", 0.0)
    writer.add(vols, [{**r, "group": "synthetic-10-LGG"} for r in rows])
    with pytest.raises(RewardDataError, match="not complete"):
        writer.finalize({"synthetic-10-LGG": {"fid": 1.0, "reward": 0.0}})
    writer.mark_complete("synthetic-10-LGG")
    with pytest.raises(RewardDataError, match="NaN"):
        writer.finalize({"synthetic-10-LGG": {"fid": 1.0, "reward": float("nan")}})
    with pytest.raises(RewardDataError, match="missing"):
        writer.finalize({"other": {"fid": 1.0, "reward": 0.0}})


def test_reader_validation_errors_name_the_problem(dataset_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RewardDataError, match="does not exist.*stage=reward_data"):
        load_reward_dataset(tmp_path / "nowhere")
    broken = make_dataset(tmp_path / "missing")
    (broken / "manifest.csv").unlink()
    with pytest.raises(RewardDataError, match="lacks manifest.csv"):
        load_reward_dataset(broken)
    shape = make_dataset(tmp_path / "shape")
    meta = json.loads((shape / "reward_data.json").read_text())
    meta["image_shape"] = [1, 32, 32, 32]
    (shape / "reward_data.json").write_text(json.dumps(meta))
    with pytest.raises(RewardDataError, match="shape"):
        load_reward_dataset(shape)
    nan = make_dataset(tmp_path / "nan")
    text = (nan / "manifest.csv").read_text().splitlines()
    text[3] = ",".join(f if i != 8 else "nan" for i, f in enumerate(text[3].split(",")))
    (nan / "manifest.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(RewardDataError, match="line 4: reward .* nan"):
        load_reward_dataset(nan)
    one = make_dataset(tmp_path / "one", fids={"synthetic-10-LGG": 5.0}, n=3)
    with pytest.raises(RewardDataError, match="at least 2 groups"):
        load_reward_dataset(one)


# ---------------------------------------------------------------------------------------------- maps, split, losses


def test_fid_to_reward_maps() -> None:
    fids = {"a": 40.0, "b": 10.0, "c": 20.0, "d": 100.0}
    for method in ("linear", "rank", "exp"):
        rewards = fid_to_reward(fids, method=method)
        assert list(rewards) == list(fids) and rewards["b"] == 1.0 and rewards["d"] == 0.0
        assert rewards["b"] > rewards["c"] > rewards["a"] > rewards["d"], method  # monotone in FID
    assert fid_to_reward(fids)["a"] == pytest.approx(60 / 90)
    assert fid_to_reward(fids, "rank") == pytest.approx({"a": 1 / 3, "b": 1.0, "c": 2 / 3, "d": 0.0})
    assert fid_to_reward(fids, "exp", tau=10.0)["c"] == pytest.approx(
        (math.exp(-1) - math.exp(-9)) / (1 - math.exp(-9))
    )
    assert fid_to_reward({"x": 3.0, "y": 3.0}) == {"x": 1.0, "y": 1.0}
    with pytest.raises(ValueError, match="NaN"):
        fid_to_reward({"x": float("nan"), "y": 1.0})
    with pytest.raises(ConfigError, match="unknown"):
        fid_to_reward(fids, method="log")


def test_split_keeps_subjects_together_and_is_seeded(dataset_dir: Path, tmp_path: Path) -> None:
    rows = load_reward_dataset(dataset_dir).rows
    split = split_reward_rows(rows, "within_group", 0.34, seed=0)
    assert split == split_reward_rows(rows, "within_group", 0.34, seed=0)
    assert split != split_reward_rows(rows, "within_group", 0.34, seed=1)
    by_id = {r["id"]: r for r in rows}
    sources = {s: {by_id[i]["source_id"] for i in split[s]} - {""} for s in ("train", "val")}
    assert sources["val"] and not sources["train"] & sources["val"]  # a subject never straddles
    val_groups = [by_id[i]["group"] for i in split["val"]]
    assert {g: val_groups.count(g) for g in FIDS} == dict.fromkeys(FIDS, 2)  # every group held out in part
    whole = split_reward_rows(rows, "whole_groups", 0.5, seed=3)
    held = {by_id[i]["group"] for i in whole["val"]}
    assert held == {"reconstruction-50-HGG", "synthetic-100-LGG"}  # interior groups, whole
    assert not held & {by_id[i]["group"] for i in whole["train"]}
    ensure_split(tmp_path, rows, "within_group", 0.34, 0, dataset_dir)
    assert json.loads((tmp_path / "split.json").read_text())["val"] == split["val"]
    with pytest.raises(ConfigError, match="different split"):
        ensure_split(tmp_path, rows, "within_group", 0.34, 1, dataset_dir)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_reward_rows(rows, "within_group", 0.0)


def test_ranking_loss_and_accuracy() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.5, 0.0])
    groups = torch.tensor([0, 0, 1, 2])
    good = torch.tensor([2.0, 1.9, 1.0, 0.0])
    assert float(pairwise_ranking_accuracy(good, rewards, groups)) == 1.0
    # Ordered pairs across groups: (0,2) (0,3) (1,2) (1,3) (2,3); swapping the scores of 2 and 3 breaks one.
    assert float(
        pairwise_ranking_accuracy(torch.tensor([2.0, 1.9, 0.0, 1.0]), rewards, groups)
    ) == pytest.approx(0.8)
    assert float(pairwise_ranking_accuracy(torch.zeros(4), rewards, groups)) == 0.5  # ties count ½
    bad = good.flip(0)
    assert float(pairwise_ranking_loss(good, rewards, groups)) < float(
        pairwise_ranking_loss(bad, rewards, groups)
    )
    assert float(pairwise_ranking_loss(good, rewards, groups, kind="margin", margin=0.5)) == 0.0
    same = pairwise_ranking_loss(good.requires_grad_(), rewards, torch.zeros(4, dtype=torch.long))
    assert (
        float(same.detach()) == 0.0 and same.requires_grad
    )  # no pair across groups: zero, still differentiable


# ---------------------------------------------------------------------------------------------- models


def test_r2d_scores_k_central_slices_in_training_and_all_in_eval() -> None:
    torch.manual_seed(0)
    net = SliceRewardNet(SHAPE, slices_per_volume=3, central_fraction=0.5, arch="resnet10", width=4)
    seen: list[tuple[int, ...]] = []
    net.backbone.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    x = torch.randn(2, *SHAPE)
    idx = net.train().slice_indices(2, 16)
    assert idx.shape == (2, 3) and int(idx.min()) >= 4 and int(idx.max()) < 12  # central half: 4..11
    assert all(len(set(row.tolist())) == 3 for row in idx)
    net.train()(x)
    assert seen[-1] == (6, 1, 16, 16)  # 2 volumes × 3 slices
    net.eval()
    scores = net.score_volumes(x)
    assert seen[-1] == (32, 1, 16, 16)  # every one of the 16 axial slices
    slice_scores = net.slice_scores(x, torch.arange(16).expand(2, 16))
    torch.testing.assert_close(scores, net.denormalise(slice_scores.mean(1)))
    # Slice k of volume b is volume[b, :, :, :, k] (axial = last axis).
    torch.testing.assert_close(slice_scores[1, 5], net.backbone(x[1:2, :, :, :, 5]).squeeze())
    net.eval_slices = "central"
    net.score_volumes(x)
    assert seen[-1] == (16, 1, 16, 16)


# ---------------------------------------------------------------------------------------------- the stage


def test_run_trains_both_models_and_writes_manifest(trained) -> None:
    cfg, run_dir, outputs = trained
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["outputs"]["r3d_ckpt"] == outputs["r3d_ckpt"]
    out = manifest["outputs"]
    assert out["split"]["num_val"] == 8 and out["target_normalization"]["enabled"]
    assert out["target_normalization"]["std"] > 0
    for kind in ("r3d", "r2d"):
        model = out["models"][kind]
        assert (
            Path(out[f"{kind}_ckpt"]).is_file() and Path(out[f"{kind}_ckpt"]).parent.parent == run_dir / kind
        )
        assert Path(model["last_ckpt"]).name == "last.ckpt" and model["monitor"] == "val/mse"
        assert all(math.isfinite(model["val"][k]) for k in ("mse", "spearman", "rank_acc"))
        table = list(csv.DictReader(open(model["group_table"])))
        assert [r["group"] for r in table] == list(FIDS) and all(int(r["n_val"]) == 2 for r in table)
        assert Path(model["group_plot"]).stat().st_size > 1000
        logged = [
            r
            for r in csv.DictReader((run_dir / kind / "logs" / "metrics.csv").open())
            if r.get("val/spearman")
        ]
        assert len(logged) == 16 and all(r["val/rank_acc"] and r["val/mse"] for r in logged)
    assert (run_dir / "split.json").is_file()
    # One W&B run per model, told apart by its config; the final metrics and the scatter in each.
    for kind in ("r2d", "r3d"):
        run = check_wandb_run(run_dir / kind, "reward", f"rw/reward/{kind}", [])
        assert run.config["reward_model"] == kind and "reward/scores_scatter_table" in run.media
        assert run.summary["final/val/spearman"] == pytest.approx(out["models"][kind]["val"]["spearman"])
    assert reward_stage.run(cfg, run_dir) is None  # finished: not retrained


def test_fit_beats_the_untrained_model_on_held_out_groups(trained, dataset_dir: Path) -> None:
    cfg, run_dir, outputs = trained
    ds = load_reward_dataset(dataset_dir)
    val = ds.subset(json.loads((run_dir / "split.json").read_text())["val"])
    norm = outputs["target_normalization"]
    for kind in ("r3d", "r2d"):
        torch.manual_seed(0)
        untrained = build_reward_net(kind, SHAPE, dict(cfg.stage[kind]), norm["mean"], norm["std"])
        before = reward_metrics(score_dataset(untrained, val), val.rewards, val.group_ids)
        after = outputs["models"][kind]["val"]
        assert after["mse"] < 0.5 * before["mse"], (kind, before, after)
        assert after["spearman"] > 0.7 and after["rank_acc"] > 0.8, (kind, after)


def test_load_reward_model_reloads_frozen_and_scores_identically(trained, dataset_dir: Path) -> None:
    _, run_dir, outputs = trained
    val = load_reward_dataset(dataset_dir).subset(json.loads((run_dir / "split.json").read_text())["val"])
    x = torch.stack([val[i]["image"] for i in range(5)])
    for kind in ("r3d", "r2d"):
        net = load_reward_model(outputs[f"{kind}_ckpt"])
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        scores = score_dataset(net, val)
        metrics = reward_metrics(scores, val.rewards, val.group_ids)
        assert metrics == pytest.approx(outputs["models"][kind]["val"], abs=1e-5)  # what the manifest reports
        again = load_reward_model(outputs[f"{kind}_ckpt"]).score_volumes(x, batch_size=2)
        torch.testing.assert_close(again, torch.as_tensor(scores[:5]))
        inputs = x.clone().requires_grad_()
        net.score_volumes(inputs, grad=True).sum().backward()
        assert inputs.grad is not None and inputs.grad.abs().sum() > 0  # PPO can backpropagate to the volume
        assert not net.score_volumes(x).requires_grad
    torch.save({"state_dict": {}, "hyper_parameters": {"net": {}}}, run_dir / "other.ckpt")
    with pytest.raises(ManifestError, match="not a reward model checkpoint"):
        load_reward_model(run_dir / "other.ckpt")


def test_rerun_resumes_interrupted_model_and_skips_finished_one(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = reward_cfg(dataset_dir, tmp_path, "stage.trainer.max_epochs=1")
    run_dir = stage_dir(cfg)
    reward_stage.run(cfg, run_dir)
    r3d_last = run_dir / "r3d" / "checkpoints" / "last.ckpt"
    stamp = r3d_last.stat().st_mtime_ns
    # Interrupted while training R2D: no stage manifest, no R2D manifest, R2D's last.ckpt (marked) stays.
    (run_dir / "manifest.json").unlink()
    (run_dir / "r2d" / "manifest.json").unlink()
    last = run_dir / "r2d" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    state["state_dict"]["net.target_mean"] += 100.0
    torch.save(state, last)
    cfg2 = reward_cfg(dataset_dir, tmp_path, "stage.trainer.max_epochs=2")
    outputs = reward_stage.run(cfg2, run_dir)
    assert r3d_last.stat().st_mtime_ns == stamp  # finished model not retrained
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 8  # one more epoch of 4 steps (16 training volumes, batch 4)
    assert float(resumed["state_dict"]["net.target_mean"]) > 50  # continued from the marked checkpoint
    assert json.loads((run_dir / "manifest.json").read_text())["outputs"]["r2d_ckpt"] == outputs["r2d_ckpt"]
    (run_dir / "manifest.json").unlink()  # the same run dir with another seed would mix two splits
    with pytest.raises(ConfigError, match="different split"):
        reward_stage.run(reward_cfg(dataset_dir, tmp_path, "stage.trainer.max_epochs=2", "seed=5"), run_dir)


def test_missing_reward_data_manifest_says_what_to_run(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = reward_cfg(None, tmp_path)
    with pytest.raises(ManifestError, match=r"stage=reward_data.*stage\.dataset_dir"):
        reward_stage.run(cfg, stage_dir(cfg))
    write_manifest(
        Path(cfg.paths.experiment_dir) / "reward_data", "reward_data", {"dataset_dir": str(dataset_dir)}
    )
    assert reward_stage.resolve_dataset_dir(cfg) == dataset_dir
    with pytest.raises(ConfigError, match="stage.monitor"):
        reward_stage.check_config(reward_cfg(None, tmp_path, "stage.monitor=auc"))
    with pytest.raises(ConfigError, match="stage.models"):
        reward_stage.check_config(reward_cfg(None, tmp_path, "stage.models=[r4d]"))


# ---------------------------------------------------------------------------------------------- issue 15 options


def test_augmentation_changes_training_inputs_but_not_labels(dataset_dir: Path) -> None:
    from mrrl.reward.augment import RewardAugment
    from mrrl.reward.module import RewardModule

    ds = load_reward_dataset(dataset_dir)
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("image", "reward", "group")}
    before = {k: v.clone() for k, v in batch.items()}
    augment = {
        "enabled": True,
        "flip_prob": 1.0,
        "flip_axes": [0],
        "intensity_scale": 0.05,
        "intensity_shift": 0.05,
    }
    torch.manual_seed(0)
    out = RewardAugment.from_config(augment)(batch["image"])
    assert out.shape == batch["image"].shape and not torch.allclose(out, batch["image"])
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    flipped = RewardAugment(1.0, [0], 0.0, 0.0)(batch["image"])
    torch.testing.assert_close(
        flipped, batch["image"].flip(2)
    )  # axis 0 of [C, D, H, W] is dim 2 of the batch
    assert RewardAugment.from_config({**augment, "enabled": False}) is None
    with pytest.raises(ConfigError, match="flip_axes"):
        RewardAugment(0.5, [3], 0.0, 0.0)
    # In the module: the network sees augmented volumes in training and the originals in validation;
    # the rewards and groups the losses use are the batch's own.
    net = {"arch": "resnet10", "width": 4, "conv1_kernel": 3}
    optim = {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "scheduler": "none", "min_lr": 0.0}
    ranking = {"kind": "logistic", "margin": 0.1, "scale": 1.0}
    module = RewardModule("r3d", SHAPE, net, optim, ranking, 0.1, True, augment=augment)
    seen: list[torch.Tensor] = []
    module.net.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    targets: list[torch.Tensor] = []
    original = module.net.normalise
    module.net.normalise = lambda r: targets.append(r.clone()) or original(r)
    module.log_dict = module.log = lambda *a, **k: None
    module.training_step(batch, 0)
    assert not torch.allclose(seen[-1], batch["image"])
    torch.testing.assert_close(targets[-1], before["reward"])
    assert all(torch.equal(batch[k], before[k]) for k in batch)  # the batch itself is not modified
    module.eval()
    module.validation_step(batch, 0)
    torch.testing.assert_close(seen[-1], batch["image"])
    plain = RewardModule("r3d", SHAPE, net, optim, ranking, 0.1, True)
    assert plain.augment is None


def test_ensemble_trains_members_with_different_seeds_and_ppo_loads_them(
    dataset_dir: Path, tmp_path: Path
) -> None:
    from mrrl.ppo.settings import ppo_settings
    from mrrl.stages.ppo import _reward_checkpoints

    cfg = reward_cfg(
        dataset_dir, tmp_path, "stage.trainer.max_epochs=1", "stage.models=[r3d]", "stage.ensemble_size=2"
    )
    seed_everything(0)
    outputs = reward_stage.run(cfg, stage_dir(cfg))
    members = outputs["r3d_ckpts"]
    assert len(members) == 2 and outputs["r3d_ckpt"] == members[0] and outputs["ensemble_size"] == 2
    assert [Path(m).parent.parent.name for m in members] == ["r3d", "r3d_m1"]
    a, b = (load_reward_model(m).state_dict() for m in members)
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())  # different seeds
    ppo = compose_cfg(["stage=ppo", "experiment_name=rw", "stage.reward.w2d=0"], tmp_path)
    assert _reward_checkpoints(ppo_settings(ppo.stage).reward, ppo.paths.experiment_dir)["r3d"] == members
    with pytest.raises(ConfigError, match="ensemble_size"):
        reward_stage.check_config(reward_cfg(None, tmp_path, "stage.ensemble_size=0"))


def test_ensemble_member_zero_of_every_model_is_the_single_model(dataset_dir: Path, tmp_path: Path) -> None:
    """R2D's member 0 too: the extra members' reseeding must not run before it (it did: R2D member 0 differed)."""
    weights = {}
    for size in (1, 2):
        cfg = reward_cfg(
            dataset_dir, tmp_path / f"k{size}", "stage.trainer.max_epochs=1", f"stage.ensemble_size={size}"
        )
        seed_everything(0)
        outputs = reward_stage.run(cfg, stage_dir(cfg))
        weights[size] = {
            kind: load_reward_model(outputs[f"{kind}_ckpt"]).state_dict() for kind in ("r3d", "r2d")
        }
    for kind in ("r3d", "r2d"):
        single, member0 = weights[1][kind], weights[2][kind]
        assert all(torch.equal(single[k], member0[k]) for k in single), kind

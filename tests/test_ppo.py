"""PPO for the diffusion policy: objective, advantages, ratio = 1, KL = 0, learning on a toy reward, memory."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import bare_trainer, tiny_checkpoints, zero_the_loss
from lightning.pytorch.loggers import CSVLogger

from mrrl.diffusion.generate import load_diffusion
from mrrl.diffusion.sampling import step_log_prob
from mrrl.errors import ConfigError
from mrrl.evaluation.sources import GenerationSettings, ModelSpec, VolumeContext, model_volumes
from mrrl.ppo.advantages import PerClassRewardNormalizer
from mrrl.ppo.kl import KLController
from mrrl.ppo.module import PPOModule, rollout_sampling, save_policy_as_diffusion_checkpoint
from mrrl.ppo.multiscale_reward import MultiScaleReward
from mrrl.ppo.selection import BestTracker
from mrrl.ppo.settings import KLSettings, PPOSettings, ppo_settings
from mrrl.ppo.surrogate import clipped_surrogate, ppo_step_stats
from mrrl.reward.ensemble import RewardEnsemble

CLASSES = ["HGG", "LGG"]
PPO_CFG = {  # the stage=ppo settings (conf/stage/ppo.yaml's groups) at test size
    "seed": 0,
    "sample": {
        "sampler": "ddim",
        "num_steps": 4,
        "eta": 1.0,
        "batch_size": 8,
        "buffer_dtype": "float32",
        "decode_quantize": False,
    },
    "train": {
        "lr": 3e-4,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "clip_range": 0.2,
        "batch_size": 4,
        "inner_epochs": 1,
        "timestep_fraction": 1.0,
        "min_step_std": 0.0,
        "trainable": "all",
        "kl": {"coef": 0.01, "adaptive": False, "target": 0.01, "error_clip": 0.2, "horizon": 2},
    },
    "reward": {
        "w3d": 0.5,
        "w2d": 0.5,
        "r3d_ckpt": None,
        "r2d_ckpt": None,
        "uncertainty_penalty": 0.0,
        "stat_buffer": 64,
        "stat_min_count": 4,
        "adv_clip": 5.0,
    },
    "probe": {
        "every": 0,
        "n": 2,
        "split": "val",
        "extractor": "random3d",
        "extractor_options": {"seed": 1},
        "select": "kid",
    },
    "figures": {"every": 1000, "volumes": 1},
}


def ppo_cfg(**groups) -> dict:
    """``PPO_CFG`` with some keys of its groups replaced: ``ppo_cfg(sample={"num_steps": 6})``."""
    return {
        key: {**value, **groups.get(key, {})} if isinstance(value, dict) else groups.get(key, value)
        for key, value in PPO_CFG.items()
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return tiny_checkpoints(tmp_path_factory.mktemp("ppo"), CLASSES)


def mean_intensity_reward(volumes: torch.Tensor) -> dict[str, torch.Tensor]:
    """A toy reward with a known optimum: brighter decoded volumes are better."""
    value = volumes.float().mean(dim=(1, 2, 3, 4))
    return {"total": value, "mean_intensity": value}


class UpsamplingDecoder(torch.nn.Module):
    """A stand-in decoder with a known monotone response: the volume is the upsampled first latent channel."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(
            torch.zeros(())
        )  # decode_latents reads device/dtype from a parameter

    def decode(self, z: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        return torch.nn.functional.interpolate(z[:, :1], scale_factor=4, mode="nearest")


def make_module(checkpoints, **groups) -> PPOModule:
    module = PPOModule(checkpoints["diffusion"], checkpoints["vqgan"], CLASSES, ppo_cfg(**groups))
    module.reward_fn = mean_intensity_reward
    return module


# ------------------------------------------------------------------------------------------ pure parts


def test_clipped_surrogate_matches_the_textbook_formula() -> None:
    old = torch.zeros(4)
    new = torch.log(torch.tensor([0.5, 0.9, 1.1, 1.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    eps = 0.2
    # ratio 0.5, A=+1: max(-0.5, -0.8) = -0.5 | ratio 0.9, A=-1: max(0.9, 0.9) = 0.9
    # ratio 1.1, A=+1: max(-1.1, -1.1) = -1.1 | ratio 1.5, A=-1: max(1.5, 1.2) = 1.5
    expected = torch.tensor([-0.5, 0.9, -1.1, 1.5]).mean()
    torch.testing.assert_close(clipped_surrogate(new, old, adv, eps), expected)
    stats = ppo_step_stats(new, old, eps)
    assert float(stats["clip_fraction"]) == 0.5
    torch.testing.assert_close(stats["approx_kl"], 0.5 * (new**2).mean())


def test_advantages_per_class_and_ddp_equivalent() -> None:
    torch.manual_seed(0)
    rewards = torch.cat([torch.randn(8) + 10, torch.randn(8) - 3])
    labels = torch.tensor([0] * 8 + [1] * 8)
    reference = PerClassRewardNormalizer(2, min_count=4, clip=5.0)
    full = reference.normalize(rewards, labels, rewards, labels)
    for label in (0, 1):  # each class normalised with its own statistics
        assert abs(float(full[labels == label].mean())) < 1e-5
        assert abs(float(full[labels == label].std(unbiased=False)) - 1) < 1e-3
    # Two "ranks", each normalising its half with the gathered batch, agree with the full batch.
    perm = torch.randperm(16)
    halves = (perm[:8], perm[8:])
    for half in halves:
        rank = PerClassRewardNormalizer(2, min_count=4, clip=5.0)
        local = rank.normalize(rewards[half], labels[half], rewards[perm], labels[perm])
        torch.testing.assert_close(local, full[half])
    clipped = PerClassRewardNormalizer(2, min_count=100, clip=0.5).normalize(rewards, labels, rewards, labels)
    assert float(clipped.abs().max()) <= 0.5


def test_batch_relative_advantages_stay_centred_as_the_reward_rises() -> None:
    """stat_buffer=0: every iteration's advantages are centred per class, even when all rewards rose."""
    labels = torch.tensor([0, 1] * 4)
    history = PerClassRewardNormalizer(2, buffer_size=256, min_count=4)
    batch = PerClassRewardNormalizer(2, buffer_size=0, min_count=4)
    for level in (0.0, 1.0, 2.0):  # the policy improves: each iteration's rewards are all higher
        rewards = level + 0.1 * torch.arange(8, dtype=torch.float32)
        with_history = history.normalize(rewards, labels, rewards, labels)
        centred = batch.normalize(rewards, labels, rewards, labels)
        for label in (0, 1):
            assert abs(float(centred[labels == label].mean())) < 1e-5
    assert float(with_history.min()) > 0  # with the buffer, the last iteration's advantages are all positive
    assert all(len(b) == 0 for b in batch.buffers)
    with pytest.raises(ConfigError, match="stat_buffer must be >= 0"):
        PerClassRewardNormalizer(2, buffer_size=-1)


def test_too_few_buffered_rewards_fall_back_to_the_class_batch() -> None:
    """Below min_count, a class is normalised with its own rewards in the batch, not the other class's."""
    rewards = torch.tensor([10.0, 11.0, -3.0, -4.0])
    labels = torch.tensor([0, 0, 1, 1])
    adv = PerClassRewardNormalizer(2, min_count=100).normalize(rewards, labels, rewards, labels)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 1.0, -1.0]), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ with models


def test_unchanged_policy_has_ratio_one_and_zero_kl(checkpoints) -> None:
    module = make_module(checkpoints)
    buffer = module.rollout()
    k = buffer["log_probs"].shape[1]
    assert torch.isfinite(buffer["log_probs"]).all() and k == 4
    idx = torch.arange(buffer["log_probs"].shape[0])
    for j in range(k):
        _, kl, stats = module._step_terms(buffer, idx, j, torch.ones(len(idx)))
        assert float(kl.detach()) == 0.0
        assert float(stats["approx_kl"]) == 0.0 and float(stats["clip_fraction"]) == 0.0


@pytest.mark.parametrize("buffer_dtype", ["float32", "bfloat16"])
def test_ratio_is_exactly_one_on_an_unchanged_policy(checkpoints, buffer_dtype: str) -> None:
    """The old log-probs are computed on exactly what the buffer stores, whatever its dtype."""
    module = make_module(checkpoints, sample={"buffer_dtype": buffer_dtype})
    buffer = module.rollout()
    assert buffer["latents"].dtype == getattr(torch, buffer_dtype)
    idx = torch.arange(buffer["log_probs"].shape[0])
    kwargs = {"sampler": "ddim", "eta": 1.0}
    for j in range(buffer["log_probs"].shape[1]):
        x_t = buffer["latents"][idx, j].float()
        x_prev = buffer["latents"][idx, j + 1].float()
        t, prev_t = buffer["timesteps"][j], buffer["prev_timesteps"][j]
        new = step_log_prob(module.policy, x_t, x_prev, t, buffer["labels"], prev_t=prev_t, **kwargs)
        ratio = torch.exp(new.log_prob - buffer["log_probs"][:, j])
        assert torch.equal(ratio, torch.ones_like(ratio)), (j, (ratio - 1).abs().max())


def test_ppo_raises_a_toy_reward_with_bounded_kl(checkpoints, tmp_path: Path) -> None:
    """PPO's learning test: its own ``training_step`` through a Trainer raises a reward with a known optimum
    (``test_a_zeroed_ppo_loss_leaves_the_policy_untouched`` shows only the loss can)."""
    torch.manual_seed(0)
    module = make_module(
        checkpoints,
        sample={"num_steps": 10, "batch_size": 32},
        train={
            "kl": {**PPO_CFG["train"]["kl"], "coef": 0.01},
            "min_step_std": 0.05,
            "batch_size": 16,  # 2 minibatches of the 32 rollouts: half the forward passes of 8, a wider margin
            "lr": 1e-3,
        },
    )
    # Brighter volumes are better, and brightness is the mean of the first latent channel: the optimum is known.
    module._frozen["vqgan"] = UpsamplingDecoder()
    rewards = []

    class Track(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rewards.append(float(trainer.callback_metrics["ppo/reward_mean"]))

    trainer = bare_trainer(tmp_path, max_epochs=24, callbacks=[Track()])
    trainer.fit(module)
    assert int(module.iterations) == 24 and int(module.skipped_updates) == 0
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    spread = max(rewards[:4]) - min(rewards[:4]) + 1e-6  # iteration-to-iteration noise before learning
    assert last > first + 2 * spread, rewards
    kl = float(trainer.callback_metrics["ppo/kl"])
    assert 0 < kl < 10.0
    # The fine-tuned policy reloads like any diffusion checkpoint and differs from the base.
    out = save_policy_as_diffusion_checkpoint(module, checkpoints["diffusion"], tmp_path / "ppo.ckpt")
    tuned, base = load_diffusion(out), load_diffusion(checkpoints["diffusion"])
    diffs = [(a - b).abs().max() for a, b in zip(tuned.denoiser.parameters(), base.denoiser.parameters())]
    assert max(float(d) for d in diffs) > 0 and tuned.scale_factor == base.scale_factor


def test_a_zeroed_ppo_loss_leaves_the_policy_untouched(checkpoints, tmp_path: Path) -> None:
    """The mutation the learning test above must catch (loss × 0 before the backward pass, optimiser steps
    still taken, no weight decay): the policy does not move at all, so the reward cannot rise."""
    torch.manual_seed(0)
    module = make_module(checkpoints, sample={"num_steps": 4, "batch_size": 8}, train={"lr": 5e-4})
    module._frozen["vqgan"] = UpsamplingDecoder()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    zero_the_loss(module)
    bare_trainer(tmp_path, max_epochs=3).fit(module)
    assert int(module.iterations) == 3 and int(module.skipped_updates) == 0
    after = module.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_only_one_timestep_graph_is_alive(checkpoints, monkeypatch, tmp_path: Path) -> None:
    """Memory does not grow with K: each timestep's loss is backpropagated before the next is built."""
    module = make_module(checkpoints, sample={"num_steps": 6})
    trainer = bare_trainer(tmp_path, max_epochs=1)
    alive: list[int] = []
    live = {"graphs": 0}
    original_backward = module.manual_backward
    original_terms = module._step_terms

    def counting_terms(*args, **kwargs):
        live["graphs"] += 1
        alive.append(live["graphs"])
        return original_terms(*args, **kwargs)

    def counting_backward(loss, *args, **kwargs):
        original_backward(loss, *args, **kwargs)
        live["graphs"] -= 1

    monkeypatch.setattr(module, "_step_terms", counting_terms)
    monkeypatch.setattr(module, "manual_backward", counting_backward)
    trainer.fit(module)
    assert len(alive) == 6 * 2  # 6 steps × 2 minibatches of 4
    assert max(alive) == 1


def test_non_finite_update_is_skipped(checkpoints, tmp_path: Path) -> None:
    module = make_module(checkpoints)
    module.reward_fn = lambda v: {"total": torch.full((v.shape[0],), float("nan"))}
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = bare_trainer(tmp_path, max_epochs=1)
    trainer.fit(module)
    assert int(module.skipped_updates) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))


class _RecordingPPO(PPOModule):
    """Writes each rank's advantages and its gathered batch to disk, to compare them outside the ranks."""

    record_dir: str = ""

    def training_step(self, batch, batch_idx):
        original = self.normalizer.normalize

        def recording(rewards, labels, all_rewards, all_labels):
            out = original(rewards, labels, all_rewards, all_labels)
            torch.save(
                {
                    "local": rewards,
                    "labels": labels,
                    "all": all_rewards,
                    "all_labels": all_labels,
                    "adv": out,
                },
                Path(self.record_dir) / f"rank{self.global_rank}_it{int(self.iterations)}.pt",
            )
            return out

        self.normalizer.normalize = recording
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self.normalizer.normalize = original


def test_two_process_ddp_gathers_rewards_and_normalises_like_one_batch(checkpoints, tmp_path: Path) -> None:
    module = _RecordingPPO(
        checkpoints["diffusion"], checkpoints["vqgan"], CLASSES, ppo_cfg(reward={"stat_min_count": 100})
    )
    module.reward_fn = mean_intensity_reward
    module.record_dir = str(tmp_path)
    trainer = bare_trainer(
        tmp_path,
        max_epochs=1,
        devices=2,
        strategy="ddp_fork",  # in-process safe; the forked ranks inherit the imports (spawned ones redo them)
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    r0, r1 = (torch.load(tmp_path / f"rank{r}_it0.pt", weights_only=False) for r in (0, 1))
    assert not torch.equal(r0["local"], r1["local"])  # rank-specific noise
    torch.testing.assert_close(r0["all"], r1["all"])  # both ranks see the same gathered batch
    torch.testing.assert_close(torch.cat([r0["local"], r1["local"]]).sort().values, r0["all"].sort().values)
    reference = PerClassRewardNormalizer(2, min_count=100, clip=5.0)
    full = reference.normalize(r0["all"], r0["all_labels"], r0["all"], r0["all_labels"])
    for rec in (r0, r1):  # each rank's advantages = its rows of the gathered batch, normalised together
        for value, label, adv in zip(rec["local"], rec["labels"], rec["adv"]):
            match = (r0["all"] == value) & (r0["all_labels"] == label)
            torch.testing.assert_close(adv, full[match][0])


# ------------------------------------------------------------------------------------------ issue 15 options


def test_adaptive_kl_coefficient_rises_above_target_and_falls_below() -> None:
    kl = {"adaptive": True, "target": 0.1, "error_clip": 0.2, "horizon": 2}
    controller = KLController.from_settings(KLSettings(coef=0.05, **kl))
    assert controller.update(0.3) == pytest.approx(0.05 * 1.1)  # KL 3× target: error clipped to +0.2, /2
    assert controller.update(0.11) == pytest.approx(0.05 * 1.1 * 1.05)  # 10 % above: +0.1 / 2
    rising = controller.coef
    assert controller.update(0.0) == pytest.approx(rising * 0.9)  # far below: −0.2 / 2
    assert controller.coef < rising
    assert controller.update(0.1) == pytest.approx(rising * 0.9)  # on target: unchanged
    fixed = KLController.from_settings(KLSettings(coef=0.05, **{**kl, "adaptive": False}))
    assert fixed.update(10.0) == 0.05 and fixed.update(0.0) == 0.05
    with pytest.raises(ConfigError, match="kl.target"):
        KLController.from_settings(KLSettings(coef=0.05, **{**kl, "target": 0.0}))


def test_adaptive_kl_is_applied_and_logged_in_training(checkpoints, tmp_path: Path) -> None:
    """A target far above any KL reached: β falls every iteration, and ppo/kl_coef logs the β used."""
    kl = {"adaptive": True, "target": 1.0e6, "error_clip": 0.2, "horizon": 1}
    module = make_module(checkpoints, train={"kl": {**kl, "coef": 0.1}})
    trainer = _trainer(tmp_path, 3, logger=CSVLogger(tmp_path, name="", version=""))
    trainer.fit(module)
    assert module.kl.coef == pytest.approx(0.1 * 0.8**3)
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("ppo/kl_coef")]
    assert [float(r["ppo/kl_coef"]) for r in rows] == pytest.approx([0.1, 0.08, 0.064])


def _trainer(tmp_path: Path, epochs: int, logger=False) -> L.Trainer:
    return bare_trainer(tmp_path, max_epochs=epochs, logger=logger, log_every_n_steps=1)


def test_a_lightning_checkpoint_rebuilds_the_typed_settings(checkpoints, tmp_path: Path) -> None:
    """The hparams hold plain dicts (weights_only); load_from_checkpoint turns them back into PPOSettings."""
    module = make_module(checkpoints, sample={"num_steps": 3, "batch_size": 2}, train={"batch_size": 2})
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    loaded = PPOModule.load_from_checkpoint(tmp_path / "ppo.ckpt", map_location="cpu", weights_only=True)
    assert isinstance(loaded.settings, PPOSettings) and loaded.settings == module.settings
    assert int(loaded.iterations) == 1 and loaded.hparams.ppo == dataclasses.asdict(module.settings)
    with pytest.raises(ConfigError, match=r"stage\.train\.kl\.coef"):
        PPOModule(
            checkpoints["diffusion"],
            checkpoints["vqgan"],
            CLASSES,
            ppo_cfg(train={"kl": {"adaptive": False}}),
        )


def test_best_checkpoint_is_the_iteration_with_the_best_validation_probe(checkpoints, tmp_path: Path) -> None:
    scripted = [0.5, 0.3, 0.1, 0.4, 0.2]  # probes at iterations 0 (before any update), 1, 2, 3, 4
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def probe(module: PPOModule) -> dict[str, float]:
        iteration = int(module.iterations)
        snapshots[iteration] = {k: v.detach().clone() for k, v in module.policy.unet.state_dict().items()}
        return {"kid/mean": scripted[iteration], "fid/mean": 10.0 - iteration}  # FID would pick iteration 4

    module = make_module(checkpoints, probe={"every": 1, "select": "kid"}, train={"lr": 1e-3})
    module.fid_probe = probe
    module.best_path = tmp_path / "ppo_best.ckpt"
    trainer = _trainer(tmp_path, 4, logger=CSVLogger(tmp_path, name="", version=""))
    trainer.fit(module)
    assert sorted(snapshots) == [0, 1, 2, 3, 4]
    assert module.best.best_iteration == 2 and module.best.best_score == 0.1
    best = torch.load(module.best_path, map_location="cpu", weights_only=False)
    assert best["hyper_parameters"]["ppo_iterations"] == 2
    tuned = load_diffusion(module.best_path).denoiser.unet.state_dict()
    assert all(
        torch.equal(tuned[k], v) for k, v in snapshots[2].items()
    )  # the policy as it was at iteration 2
    assert any(
        not torch.equal(tuned[k], v) for k, v in module.policy.unet.state_dict().items()
    )  # not the last
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("kid/mean")]
    logged = {int(float(r["ppo/iteration"])): float(r["kid/mean"]) for r in rows}
    assert logged == pytest.approx(dict(enumerate(scripted)))  # iteration 0 has a row of its own
    state = module.best.state_dict()  # resumes with what it has seen
    again = BestTracker("kid/mean")
    again.load_state_dict(state)
    assert again.best_iteration == 2 and not again.update(5, 0.2) and again.update(6, 0.05)


def test_ensemble_penalty_lowers_the_reward_where_members_disagree() -> None:
    class Fixed(torch.nn.Module):
        def __init__(self, scores):
            super().__init__()
            self.scores = torch.tensor(scores)

        def score_volumes(self, volumes):
            return self.scores

    volumes = torch.zeros(2, 1, 4, 4, 4)
    members = [Fixed([0.5, 0.2]), Fixed([0.5, 0.8])]  # agree on volume 0, disagree on volume 1 (same mean)
    plain = MultiScaleReward(RewardEnsemble(members), None, 1.0, 0.0)(volumes)
    penalised = MultiScaleReward(RewardEnsemble(members), None, 1.0, 0.0, uncertainty_penalty=1.0)(volumes)
    torch.testing.assert_close(plain["total"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(penalised["total"], torch.tensor([0.5, 0.5 - 0.3]))
    torch.testing.assert_close(penalised["r3d_std"], torch.tensor([0.0, 0.3]))
    single = MultiScaleReward(members[0], None, 1.0, 0.0, uncertainty_penalty=1.0)(
        volumes
    )  # one model: no std
    torch.testing.assert_close(single["total"], torch.tensor([0.5, 0.2]))
    with pytest.raises(ConfigError, match="uncertainty_penalty"):
        MultiScaleReward(members[0], None, 1.0, 0.0, uncertainty_penalty=-1.0)


def test_fine_tuned_checkpoint_records_its_rollout_sampler(checkpoints, tmp_path: Path) -> None:
    module = make_module(checkpoints, sample={"num_steps": 3, "eta": 1.0, "batch_size": 4})
    out = save_policy_as_diffusion_checkpoint(module, checkpoints["diffusion"], tmp_path / "ppo.ckpt")
    hp = torch.load(out, map_location="cpu", weights_only=False)["hyper_parameters"]
    base = torch.load(checkpoints["diffusion"], map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hp["sampling"] == rollout_sampling(module.settings.sample)
    assert hp["sampling"]["num_steps"] == 3 and hp["sampling"]["eta"] == 1.0
    assert hp["base_sampling"] == base.get("sampling")
    # evaluate/classify with sampler keys null sample each checkpoint the way its own sampling says
    settings = GenerationSettings(n_per_class=2, sampler=None, num_steps=None, eta=None)
    resolved = settings.for_checkpoint(out)
    assert (resolved.sampler, resolved.num_steps, resolved.eta) == ("ddim", 3, 1.0)
    explicit = GenerationSettings(n_per_class=2, sampler="ddim", num_steps=7, eta=0.0).for_checkpoint(out)
    assert (explicit.num_steps, explicit.eta) == (7, 0.0)  # an explicit setting applies to every row
    # Through the evaluate row: sampled with 3 steps, and the row and its sample cache say so.
    ctx = VolumeContext(CLASSES, {}, {}, (1, 16, 16, 16), settings, tmp_path / "samples")
    produced = model_volumes(ModelSpec("rl", "RL", "diffusion", str(out)), ctx)
    assert produced.volumes["HGG"].shape == (2, 1, 16, 16, 16)
    assert produced.generation["num_steps"] == 3 and produced.generation["eta"] == 1.0
    sidecar = json.loads((tmp_path / "samples" / "rl" / "HGG.json").read_text())
    assert (sidecar["sampler"], sidecar["num_steps"], sidecar["eta"]) == ("ddim", 3, 1.0)
    with pytest.raises(ConfigError, match="records no sampling"):
        settings.for_checkpoint(checkpoints["diffusion"])  # the tiny base checkpoint records none


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory) -> list[str]:
    """Data overrides of a 16³ BraTS-layout cohort with 2 validation and 1 test volume per class."""
    from conftest import make_brats

    root = make_brats(tmp_path_factory.mktemp("probe") / "brats", n_hgg=6, n_lgg=6, modalities=("flair",))
    data = ["data=brats2019", f"data.root={root}", "data.image_size=16", "data.test_per_class=1"]
    return [*data, "data.val_fraction=0.4", "data.progress=false", "experiment_name=probe"]


def test_validation_probe_reads_only_the_validation_split(
    checkpoints, probe_data, tmp_path: Path, monkeypatch
) -> None:
    from helpers import compose_cfg

    from mrrl.manifest import write_manifest
    from mrrl.metrics.extractors import build_extractor
    from mrrl.ppo.probe import ValidationProbe
    from mrrl.training.runtime import build_datamodule

    data = probe_data
    stage = [
        "stage.sample.num_steps=3",
        "stage.probe.n=2",
        "stage.sample.batch_size=2",
        "stage.sample.decode_quantize=false",
    ]
    cfg = compose_cfg(["stage=ppo", *data, *stage], tmp_path / "runs")
    datamodule = build_datamodule(cfg).prepare()
    asked: list[str] = []
    original = datamodule.dataset
    monkeypatch.setattr(
        datamodule, "dataset", lambda split, **kw: asked.append(split) or original(split, **kw)
    )
    probe = ValidationProbe(ppo_settings(cfg.stage), datamodule, cfg.paths.experiment_dir)
    val, test = set(datamodule.splits["val"]), set(datamodule.splits["test"])
    read = {i for ids in probe.real_ids.values() for i in ids}
    assert set(asked) == {"val"} and read == val and len(read) == 4 and not read & test
    assert probe.extractor.identity != build_extractor("random3d", in_channels=1, seed=0).identity
    metrics = probe(make_module(checkpoints))
    assert set(asked) == {"val"}  # sampling and scoring read no real volume
    assert {"fid/HGG", "fid/LGG", "fid/mean", "kid/HGG", "kid/LGG", "kid/mean"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    with pytest.raises(ConfigError, match="probe.split.*test split"):
        ppo_settings(compose_cfg(["stage=ppo", *data, "stage.probe.split=test"], tmp_path / "runs").stage)
    # The probe must not see the world through the reward data's extractor.
    extractor = build_extractor("random3d", in_channels=1, seed=0)
    write_manifest(
        Path(cfg.paths.experiment_dir) / "reward_data", "reward_data", {"extractor": extractor.identity}
    )
    same = ppo_settings(
        compose_cfg(["stage=ppo", *data, "stage.probe.extractor_options.seed=0"], tmp_path / "runs").stage
    )
    with pytest.raises(ConfigError, match="labelled the reward data"):
        ValidationProbe(same, datamodule, cfg.paths.experiment_dir)


def test_evaluate_takes_the_final_or_the_best_ppo_policy(tmp_path: Path) -> None:
    from helpers import compose_cfg

    from mrrl.evaluation.sources import discover_models
    from mrrl.manifest import write_manifest

    final, best = tmp_path / "ppo_final.ckpt", tmp_path / "ppo_best.ckpt"
    final.write_bytes(b"x")
    best.write_bytes(b"x")

    def rl_row(*overrides: str):
        cfg = compose_cfg(["stage=evaluate", "experiment_name=pick", *overrides], tmp_path / "runs")
        write_manifest(Path(cfg.paths.experiment_dir) / "ppo", "ppo", outputs)
        specs, missing = discover_models(cfg)
        return next((s.source for s in specs if s.key == "rl"), missing.get("rl"))

    outputs = {"final_ckpt": str(final), "best_ckpt": str(best)}
    assert rl_row() == str(final)  # default: final
    assert rl_row("stage.ppo_checkpoint=best") == str(best)
    outputs = {"final_ckpt": str(final), "best_ckpt": None}  # PPO ran without a probe
    assert "best_ckpt" in rl_row("stage.ppo_checkpoint=best")
    with pytest.raises(ConfigError, match="ppo_checkpoint"):
        rl_row("stage.ppo_checkpoint=median")


def test_stage_run_probes_keeps_the_best_and_records_the_sampler(
    checkpoints, probe_data, tmp_path: Path
) -> None:
    from helpers import compose_cfg

    from mrrl.reward.models import build_reward_net
    from mrrl.stages import ppo as ppo_stage

    net = {"arch": "resnet10", "width": 4, "conv1_kernel": 3}
    r3d = build_reward_net("r3d", (1, 16, 16, 16), net, load_pretrained=False)
    torch.save(
        {"hyper_parameters": {"kind": "r3d", "image_shape": [1, 16, 16, 16], "net": net},
         "state_dict": {f"net.{k}": v for k, v in r3d.state_dict().items()}},
        tmp_path / "r3d.ckpt",
    )  # fmt: skip
    stage = [
        f"stage.diffusion_ckpt={checkpoints['diffusion']}",
        f"stage.vqgan_ckpt={checkpoints['vqgan']}",
        f"stage.reward.r3d_ckpt={tmp_path / 'r3d.ckpt'}",
        "stage.reward.w2d=0",
        "stage.sample.num_steps=3",
        "stage.sample.batch_size=4",
        "stage.train.batch_size=4",
        "stage.train.min_step_std=0",
        "stage.sample.decode_quantize=false",
        "stage.probe.every=1",
        "stage.probe.n=2",
        "stage.figures.every=1",
        "stage.progress_bar=false",
        "stage.trainer.max_epochs=2",
        "stage.train.kl.adaptive=true",
        "logger=wandb",
    ]
    cfg = compose_cfg(["stage=ppo", *probe_data, *stage], tmp_path / "runs")
    run_dir = tmp_path / "ppo"
    outputs = ppo_stage.run(cfg, run_dir)
    from helpers import check_wandb_run

    # W&B: curves against the PPO iteration, samples beside that iteration's scalars, probe at 0, 1, 2.
    run = check_wandb_run(run_dir, "ppo", f"{cfg.experiment_name}/ppo", cfg.data.classes or ["HGG", "LGG"])
    assert [r["ppo/iteration"] for r in run.rows_with("fid/mean")] == [0, 1, 2]
    assert [r["ppo/iteration"] for r in run.rows_with("ppo/samples")] == [1, 2]
    assert run.summary["final/iterations"] == 2
    probe = outputs["probe"]
    assert [i for i, _ in probe["history"]] == [0, 1, 2] and probe["split"] == "val"
    scores = dict(probe["history"])
    assert probe["best_iteration"] == min(scores, key=scores.get) and probe["metric"] == "kid/mean"
    assert outputs["best_ckpt"] == str((run_dir / "ppo_best.ckpt").resolve()) != outputs["final_ckpt"]
    best = torch.load(outputs["best_ckpt"], map_location="cpu", weights_only=False)["hyper_parameters"]
    assert best["ppo_iterations"] == probe["best_iteration"]
    final = torch.load(outputs["final_ckpt"], map_location="cpu", weights_only=False)["hyper_parameters"]
    assert (
        final["ppo_iterations"] == 2
        and final["sampling"]["num_steps"] == 3 == outputs["sampling"]["num_steps"]
    )
    assert outputs["kl_coef_final"] != 0.01  # the adaptive controller moved β from kl_coef

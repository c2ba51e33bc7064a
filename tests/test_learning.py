"""Every LightningModule learns through its own ``training_step``, and the test says which one broke.

Each case builds one tiny module, fits it with a Lightning ``Trainer`` on one fixed batch (the same batch every
step) and measures a deterministic score of that batch in eval mode before and after: the score must fall to
at most ``ratio`` × its starting value. Each case also runs with the module's loss multiplied by 0 before the
backward pass (the optimiser still steps, the quantiser's EMA and BatchNorm statistics still update): that
run must *not* reach the margin, so the margin measures learning from the loss, not a side effect.
PPO's learning test (a toy reward with a known optimum, through the Trainer) is
``tests/test_ppo.py::test_ppo_raises_a_toy_reward_with_bounded_kl``; its zeroed-loss twin
(``test_a_zeroed_ppo_loss_leaves_the_policy_untouched``) shows the policy does not move at all without the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_UNET, TINY_VQGAN, bare_trainer, compose_cfg, zero_the_loss
from torch.utils.data import DataLoader, Dataset

from mrrl.classify.model import ClassifierModule
from mrrl.diffusion.latent_data import LatentDataModule
from mrrl.diffusion.module import DiffusionModule
from mrrl.reward.module import RewardModule
from mrrl.settings import from_config
from mrrl.stages import diffusion as diffusion_stage
from mrrl.vqgan.module import VQGANModule, VQGANSettings

CLASSES = ["HGG", "LGG"]
SIZE = 16


class FixedBatch(Dataset):
    """The same (already collated) batch ``steps`` times: a DataLoader with ``batch_size=None`` serves it."""

    def __init__(self, batch: Mapping[str, Any], steps: int):
        self.batch, self.steps = dict(batch), steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batch


def volumes(n: int = 4, channels: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Brain-like volumes in [-1, 1]: background -1, a ball of smooth random texture whose class
    (label = index % 2) sets a bright or dark centre."""
    gen = torch.Generator().manual_seed(seed)
    texture = F.avg_pool3d(torch.randn(n, channels, SIZE, SIZE, SIZE, generator=gen), 5, 1, 2) * 2
    labels = torch.arange(n) % 2
    axis = torch.linspace(-1, 1, SIZE)
    ball = (axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2) < 0.8
    c = slice(SIZE // 4, 3 * SIZE // 4)
    texture[:, :, c, c, c] += torch.where(labels == 0, 0.6, -0.6)[:, None, None, None, None]
    return torch.where(ball, texture.clamp(-0.8, 1), torch.tensor(-1.0)), labels


def fit(module: L.LightningModule, batch: Mapping[str, Any], steps: int, root: Path, datamodule=None) -> None:
    trainer = bare_trainer(root, devices=1, max_steps=steps, limit_val_batches=0)
    # A module that needs its own datamodule (diffusion reads the latent scale from it) gets it, serving the batch.
    if datamodule is not None:
        datamodule.train_dataloader = lambda: DataLoader(FixedBatch(batch, steps), batch_size=None)
        trainer.fit(module, datamodule=datamodule)
    else:
        trainer.fit(module, train_dataloaders=DataLoader(FixedBatch(batch, steps), batch_size=None))


@dataclasses.dataclass
class Case:
    """``build(root)`` → (module, batch, score(module) → float, datamodule or None)."""

    build: Callable[[Path], tuple[L.LightningModule, dict, Callable[[Any], float], Any]]
    steps: int
    ratio: float  # after ≤ ratio × before


# ---------------------------------------------------------------------------------------------- the modules


def vqgan_case(root: Path):
    cfg = compose_cfg(
        ["stage=vqgan", *TINY_VQGAN, "stage.loss.adv_start_step=25", "stage.optim.lr_g=3e-3"], root
    )
    torch.manual_seed(0)
    module = VQGANModule((1, SIZE, SIZE, SIZE), from_config(VQGANSettings, cfg.stage, "stage"))
    x, labels = volumes()

    @torch.no_grad()
    def l1(m: VQGANModule) -> float:  # eval mode: the codebook is read, not updated
        return float(F.l1_loss(m.eval().vqgan(x).reconstruction, x))

    return module, {"image": x, "label": labels}, l1, None


def diffusion_case(root: Path):
    cfg = compose_cfg(
        [
            "stage=diffusion",
            *TINY_UNET,
            "stage.optim.lr=2e-3",
            "stage.optim.warmup_steps=0",
            "stage.cfg_dropout=0.0",
        ],
        root,
    )
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 2, 4, 4, 4, generator=gen) * 3.0
    labels = torch.arange(6) % 2
    cache = root / "latents.pt"
    splits = ["train"] * 4 + ["val"] * 2
    torch.save(
        {"latents": latents, "labels": labels, "ids": [f"s{i}" for i in range(6)], "splits": splits,
         "class_names": CLASSES},
        cache,
    )  # fmt: skip
    datamodule = LatentDataModule(
        cache, batch_size=4, eval_batch_size=None, balanced=False, num_val_timesteps=3, val_seed=0, seed=0,
        num_workers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    module = DiffusionModule((2, 4, 4, 4), CLASSES, diffusion_stage.settings(cfg), vqgan_ckpt=None, seed=0)
    batch = {"latent": latents[:4], "label": labels[:4]}
    noise = torch.randn(latents[:4].shape, generator=gen)
    timesteps = torch.tensor([50, 300, 600, 900])

    @torch.no_grad()
    def loss(m: DiffusionModule) -> float:  # fixed noise and timesteps; the scale factor fit start computed
        if float(m.scale_factor) <= 0:
            m.set_scale_factor(1.0 / float(latents[:4].std(unbiased=False)))
        return float(
            m.eval().diffusion_loss(batch["latent"], batch["label"], noise=noise, timesteps=timesteps)
        )

    return module, batch, loss, datamodule


def reward_case(kind: str):
    def build(root: Path):
        torch.manual_seed(0)
        net = {
            "arch": "resnet10", "width": 8, "norm": "batch", "conv1_kernel": 3, "conv1_stride": 1,
            "no_max_pool": True, "weights_path": None,
        }  # fmt: skip
        if kind == "r2d":
            net.update(
                {"slices_per_volume": 4, "central_fraction": 1.0, "eval_slices": "all", "slice_chunk": 64}
            )
        module = RewardModule(
            kind=kind,
            image_shape=(1, SIZE, SIZE, SIZE),
            net=net,
            optim={
                "lr": 3e-3,
                "betas": [0.9, 0.999],
                "weight_decay": 0.0,
                "scheduler": "none",
                "min_lr": 0.0,
            },
            ranking={"kind": "logistic", "margin": 0.1, "scale": 1.0},
            ranking_weight=0.1,
            slice_targets=kind == "r2d",
        )
        x, _ = volumes(n=6, seed=1)
        rewards = torch.linspace(-1.5, 1.5, 6)  # normalised targets (mean 0, std 1 as the module is built)
        batch = {"image": x, "reward": rewards, "group": torch.arange(6) // 2}

        @torch.no_grad()
        def mse(m: RewardModule) -> float:
            return float(F.mse_loss(m.eval().net(x), m.net.normalise(rewards)))

        return module, batch, mse, None

    return build


def classifier_case(root: Path):
    torch.manual_seed(0)
    module = ClassifierModule(
        arch="resnet10",
        in_channels=1,
        class_names=CLASSES,
        optim={"lr": 3e-3, "weight_decay": 0.0, "scheduler": "none"},
        threshold=0.5,
        net={"widen_factor": 0.25, "conv1_t_size": 3, "conv1_t_stride": 1, "no_max_pool": True},
    )
    x, labels = volumes(n=8, seed=2)

    @torch.no_grad()
    def cross_entropy(m: ClassifierModule) -> float:
        return float(F.cross_entropy(m.eval()(x).float(), labels))

    return module, {"image": x, "label": labels}, cross_entropy, None


CASES = {
    "vqgan": Case(vqgan_case, steps=40, ratio=0.6),
    "diffusion": Case(diffusion_case, steps=40, ratio=0.7),
    "reward_r3d": Case(reward_case("r3d"), steps=30, ratio=0.5),
    "reward_r2d": Case(reward_case("r2d"), steps=60, ratio=0.6),
    "classifier": Case(classifier_case, steps=30, ratio=0.5),
}


def score_change(case: Case, root: Path, zeroed: bool) -> tuple[float, float]:
    module, batch, score, datamodule = case.build(root)
    if datamodule is not None:
        datamodule.setup()
    before = score(module)
    if zeroed:
        zero_the_loss(module)
    module.train()
    fit(module, batch, case.steps, root, datamodule)
    return before, score(module)


@pytest.mark.parametrize("name", list(CASES))
def test_module_learns_through_its_own_training_step(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    before, after = score_change(case, tmp_path, zeroed=False)
    assert after <= case.ratio * before, f"{name}: {before:.4g} → {after:.4g}, wanted ≤ {case.ratio} × before"


@pytest.mark.parametrize("name", list(CASES))
def test_a_zeroed_loss_fails_the_learning_margin(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    before, after = score_change(case, tmp_path, zeroed=True)
    assert after > case.ratio * before, f"{name}: learnt {before:.4g} → {after:.4g} with its loss × 0"

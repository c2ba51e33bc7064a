"""Lightning side of the reward regressors: the training module (R3D or R2D) and its DataModule."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanSquaredError
from torchmetrics.regression import SpearmanCorrCoef

from mrrl.data.train_val import TrainValDataModule
from mrrl.reward.augment import RewardAugment
from mrrl.reward.losses import PairwiseRankingAccuracy, pairwise_ranking_loss
from mrrl.reward.models import build_reward_net
from mrrl.reward.settings import RankingSettings, RewardOptimSettings
from mrrl.settings import from_config

MONITORS = {
    "spearman": ("val/spearman", "max"),
    "rank_acc": ("val/rank_acc", "max"),
    "mse": ("val/mse", "min"),
}


class RewardModule(L.LightningModule):
    """Regress a volume's reward (normalised) with MSE, plus ``ranking_weight`` × a pairwise ranking loss.

    R2D's MSE is taken per slice by default (``slice_targets``: each random slice regresses its volume's
    reward, which gives K targets per volume); its ranking loss, like R3D's, compares volume scores.
    Validation logs the MSE (reward units), Spearman correlation and pairwise ranking accuracy of the
    volume scores, gathered over every validation volume (and rank).
    """

    def __init__(
        self,
        kind: str,
        image_shape: Sequence[int],
        net: Mapping[str, Any],
        optim: RewardOptimSettings | Mapping[str, Any],
        ranking: RankingSettings | Mapping[str, Any],
        ranking_weight: float,
        slice_targets: bool,
        target_mean: float = 0.0,
        target_std: float = 1.0,
        dataset_dir: str = "",
        augment: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not isinstance(optim, RewardOptimSettings):
            optim = from_config(RewardOptimSettings, optim, "stage.optim")
        if not isinstance(ranking, RankingSettings):
            ranking = from_config(RankingSettings, ranking, "stage.ranking")
        self.optim_settings, self.ranking_settings = optim, ranking
        # The hparams keep plain dicts (weights_only checkpoints; load_from_checkpoint rebuilds the settings).
        optim, ranking = dataclasses.asdict(optim), dataclasses.asdict(ranking)
        self.save_hyperparameters()
        self.augment = RewardAugment.from_config(augment)  # training batches only; None = off
        self.net = build_reward_net(kind, tuple(image_shape), net, target_mean, target_std)
        self.val_mse = MeanSquaredError()
        self.val_spearman = SpearmanCorrCoef()
        self.val_rank = PairwiseRankingAccuracy()

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, rewards, groups = batch["image"], batch["reward"], batch["group"]
        if self.augment is not None:
            x = self.augment(x)  # the labels (rewards, groups) are untouched
        target = self.net.normalise(rewards)
        if self.hparams.kind == "r2d" and self.hparams.slice_targets:
            slice_scores = self.net.slice_scores(x)
            mse = F.mse_loss(slice_scores, target[:, None].expand_as(slice_scores))
            scores = slice_scores.mean(dim=1)
        else:
            scores = self.net(x)
            mse = F.mse_loss(scores, target)
        loss = mse
        logs = {"train/mse": mse.detach()}
        weight = float(self.hparams.ranking_weight)
        if weight > 0:
            rank = pairwise_ranking_loss(
                scores,
                rewards,
                groups,
                kind=self.ranking_settings.kind,
                margin=float(self.ranking_settings.margin),
                scale=float(self.ranking_settings.scale),
            )
            loss = loss + weight * rank
            logs["train/rank_loss"] = rank.detach()
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, batch_size=x.shape[0])
        self.log("train/loss_step", loss.detach(), prog_bar=True, logger=False, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        x, rewards, groups = batch["image"], batch["reward"], batch["group"]
        scores = self.net.denormalise(self.net(x))
        self.val_mse.update(scores, rewards)
        self.val_spearman.update(scores, rewards)
        self.val_rank.update(scores, rewards, groups)

    def on_validation_epoch_end(self) -> None:
        values = {
            "val/mse": self.val_mse.compute(),
            "val/spearman": self.val_spearman.compute(),
            "val/rank_acc": self.val_rank.compute(),
        }
        for metric in (self.val_mse, self.val_spearman, self.val_rank):
            metric.reset()
        self.log_dict({k: v.float() for k, v in values.items()}, prog_bar=True)

    def configure_optimizers(self):
        cfg = self.optim_settings
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params,
            lr=float(cfg.lr),
            betas=tuple(float(b) for b in cfg.betas),
            weight_decay=float(cfg.weight_decay),
        )
        if cfg.scheduler in (None, "none"):
            return opt
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=float(cfg.min_lr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}


class RewardDataModule(TrainValDataModule):
    """Train/val subsets of a reward dataset (volumes shuffled every epoch, so batches mix groups)."""

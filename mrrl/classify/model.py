"""The downstream classifier (paper §4.3): a MONAI 3D ResNet as a LightningModule.

The network has two outputs (``num_classes=2``) trained with cross-entropy on the dataset's labels; the
binary metrics are about ``positive_index`` (the probability of that class after a softmax). The same
module is used for synthetic pre-training and real fine-tuning (:func:`load_weights` carries the weights
from one to the other; the optimiser starts fresh).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from monai.networks.nets import resnet
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score

from mrrl.errors import ConfigError
from mrrl.settings import from_config
from mrrl.utils.checkpoints import safe_load

ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")
MONITORS = {"val/auc": "max", "val/accuracy": "max", "val/f1": "max", "val/loss": "min"}
SCHEDULERS = ("cosine", "none")


@dataclass(frozen=True)
class PhaseOptimSettings:
    """The optimiser of one training phase, ``stage.pretrain`` or ``stage.finetune`` (AdamW)."""

    lr: float
    weight_decay: float
    scheduler: str | None  # cosine (over the phase's max_epochs) | none (null = none)

    def __post_init__(self) -> None:
        if (self.scheduler or "none") not in SCHEDULERS:
            raise ConfigError(
                f"the classifier's scheduler must be 'cosine' or 'none', got {self.scheduler!r}"
            )


def build_classifier(arch: str, in_channels: int, num_classes: int = 2, **options: Any) -> torch.nn.Module:
    """``monai.networks.nets.<arch>(spatial_dims=3, ...)``; ``options`` go to MONAI's ``ResNet``
    (``widen_factor``, ``conv1_t_size``, ``conv1_t_stride``, ``no_max_pool``, ``shortcut_type``, ...).
    Never downloads weights: ``pretrained`` is not accepted here."""
    if arch not in ARCHS:
        raise ConfigError(f"stage.arch must be one of {ARCHS}, got {arch!r}")
    if "pretrained" in options:
        raise ConfigError("stage.net.pretrained is not supported (mrrl downloads no weights at run time)")
    factory = getattr(resnet, arch)
    return factory(spatial_dims=3, n_input_channels=int(in_channels), num_classes=int(num_classes), **options)


class ClassifierModule(L.LightningModule):
    """3D ResNet trained with (optionally class-weighted) cross-entropy; validation logs loss, accuracy,
    F1 and AUC of the positive class (torchmetrics, so they are gathered over DDP ranks).

    ``optim``: the phase's settings (or a mapping with their keys, as stored in the checkpoint's hparams).
    """

    def __init__(
        self,
        arch: str,
        in_channels: int,
        class_names: Sequence[str],
        optim: PhaseOptimSettings | Mapping[str, Any],
        threshold: float,
        positive_index: int = 0,
        net: Mapping[str, Any] | None = None,
        class_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if not isinstance(optim, PhaseOptimSettings):
            optim = from_config(PhaseOptimSettings, optim, "stage.<phase>")
        self.optim_settings = optim
        optim = dataclasses.asdict(optim)  # plain values in the hparams (weights_only checkpoints)
        self.save_hyperparameters()
        if len(class_names) != 2:
            raise ConfigError(f"the classifier is binary; the data have classes {list(class_names)}")
        self.net = build_classifier(arch, in_channels, 2, **dict(net or {}))
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.val_acc = BinaryAccuracy(threshold=threshold)
        self.val_f1 = BinaryF1Score(threshold=threshold)
        self.val_auc = BinaryAUROC()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def positive_probability(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=1)[:, int(self.hparams.positive_index)]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y, weight=self.class_weights)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log_dict({"train/loss": loss.detach(), "train/accuracy": acc}, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)  # unweighted: comparable across settings
        probs = self.positive_probability(logits)
        target = (y == int(self.hparams.positive_index)).long()
        for metric in (self.val_acc, self.val_f1, self.val_auc):
            metric.update(probs, target)
        self.log("val/loss", loss, batch_size=x.shape[0], sync_dist=True, prog_bar=True)
        self.log("val/accuracy", self.val_acc, batch_size=x.shape[0])
        self.log("val/f1", self.val_f1, batch_size=x.shape[0])
        self.log("val/auc", self.val_auc, batch_size=x.shape[0], prog_bar=True)

    def configure_optimizers(self):
        cfg = self.optim_settings
        opt = torch.optim.AdamW(self.parameters(), lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
        if (cfg.scheduler or "none") == "none":
            return opt
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}


def load_weights(module: ClassifierModule, ckpt: str | Path) -> None:
    """Copy the network weights of a classifier checkpoint (pre-training → fine-tuning)."""
    state = safe_load(ckpt)["state_dict"]
    module.load_state_dict({k: v for k, v in state.items() if k.startswith("net.")}, strict=True)


@torch.no_grad()
def predict(
    module: ClassifierModule, dataset, batch_size: int, device: torch.device | str = "cpu"
) -> dict[str, list]:
    """Positive-class probabilities, dataset labels and ids of every item (eval mode, in order)."""
    module = module.to(device).eval()
    probs: list[float] = []
    labels: list[int] = []
    ids: list[str] = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in loader:
        probs += module.positive_probability(module(batch["image"].to(device))).cpu().tolist()
        labels += batch["label"].tolist()
        ids += list(batch["id"])
    return {"prob": probs, "label": labels, "id": ids}

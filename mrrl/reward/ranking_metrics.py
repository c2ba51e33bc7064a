"""How well a reward model ranks: score a trained regressor on a split, its MSE / Spearman / pairwise ranking
accuracy, and the per-group report (``group_scores.csv``, predicted-vs-true plot ``group_scores.png``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.regression import spearman_corrcoef

from mrrl.reward.dataset import RewardDataset
from mrrl.reward.format import csv_text
from mrrl.reward.losses import pairwise_ranking_accuracy
from mrrl.reward.models import RewardNet
from mrrl.utils.io import atomic_write_text

TABLE_COLUMNS = (
    "group",
    "trajectory",
    "steps",
    "class",
    "reward",
    "fid",
    "n_train",
    "n_val",
    "pred_val_mean",
    "pred_val_std",
    "pred_train_mean",
)


@torch.no_grad()
def score_dataset(
    net: RewardNet, dataset: RewardDataset, batch_size: int = 8, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Scores (reward units) of every volume of ``dataset``, in its order; the net's eval-mode slices."""
    net = net.eval().to(device)
    out = [
        net.score_volumes(batch["image"].to(device)).cpu()
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def reward_metrics(scores: np.ndarray, rewards: np.ndarray, groups: np.ndarray) -> dict[str, float | None]:
    """MSE, Spearman and pairwise ranking accuracy (the ``val/*`` metrics), NaN as ``None`` for JSON."""
    s, r, g = torch.as_tensor(scores).float(), torch.as_tensor(rewards).float(), torch.as_tensor(groups)
    values = {
        "mse": float(torch.mean((s - r) ** 2)) if len(s) else math.nan,
        "spearman": float(spearman_corrcoef(s, r)) if len(s) > 1 else math.nan,
        "rank_acc": float(pairwise_ranking_accuracy(s, r, g)),
    }
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def group_table(
    train_set: RewardDataset, val_set: RewardDataset, train_scores: np.ndarray, val_scores: np.ndarray
) -> list[dict[str, Any]]:
    """One row per group: true reward and FID, split sizes, mean ± std predicted score on each split."""
    train_groups = np.array([r["group"] for r in train_set.rows])
    val_groups = np.array([r["group"] for r in val_set.rows])
    rows = []
    for g in train_set.groups:
        tr, va = train_scores[train_groups == g["group"]], val_scores[val_groups == g["group"]]
        rows.append(
            {
                "group": g["group"],
                "trajectory": g["trajectory"],
                "steps": g["steps"],
                "class": g["class"],
                "reward": g["reward"],
                "fid": g["fid"],
                "n_train": len(tr),
                "n_val": len(va),
                "pred_val_mean": round(float(va.mean()), 6) if len(va) else None,
                "pred_val_std": round(float(va.std()), 6) if len(va) else None,
                "pred_train_mean": round(float(tr.mean()), 6) if len(tr) else None,
            }
        )
    return sorted(rows, key=lambda row: -row["reward"])


def write_group_report(rows: list[dict[str, Any]], out_dir: Path, title: str) -> tuple[Path, Path]:
    """``group_scores.csv`` and ``group_scores.png`` (mean predicted vs true reward per group) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = atomic_write_text(out_dir / "group_scores.csv", csv_text(TABLE_COLUMNS, rows))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for split, marker, fill in (("train", "o", "none"), ("val", "s", None)):
        pts = [
            (r["reward"], r[f"pred_{split}_mean"], r.get(f"pred_{split}_std") or 0.0)
            for r in rows
            if r[f"pred_{split}_mean"] is not None
        ]
        if pts:
            x, y, e = map(np.array, zip(*pts))
            ax.errorbar(
                x, y, yerr=e if split == "val" else None, fmt=marker, mfc=fill, label=split, capsize=2
            )
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="ideal")
    ax.set_xlabel("true reward (group)")
    ax.set_ylabel("mean predicted score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = out_dir / "group_scores.png"
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return csv_path, png_path

"""Test-set metrics of one classifier run and their mean ± std over seeds (paper Tables 3 and 4).

Binary metrics are about the *positive* class (``stage.positive_class``; HGG / AD by default):
accuracy and F1 threshold its predicted probability at ``threshold``, AUC uses the probabilities
(ties count one half, as in the Mann–Whitney statistic). AUC is undefined (NaN) when the targets hold
one class only, rather than torchmetrics' 0 with a warning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_f1_score

METRICS = ("accuracy", "f1", "auc")
METRIC_LABELS = {"accuracy": "Accuracy", "f1": "F1 score", "auc": "AUC"}


def binary_metrics(
    probs: Sequence[float] | torch.Tensor, targets: Sequence[int] | torch.Tensor, threshold: float = 0.5
) -> dict[str, float]:
    """``{accuracy, f1, auc}`` of positive-class probabilities against 0/1 targets."""
    p = torch.as_tensor(probs, dtype=torch.float32).flatten()
    t = torch.as_tensor(targets, dtype=torch.long).flatten()
    if p.numel() != t.numel() or p.numel() == 0:
        raise ValueError(f"need as many probabilities as targets (> 0), got {p.numel()} and {t.numel()}")
    out = {
        "accuracy": float(binary_accuracy(p, t, threshold=threshold)),
        "f1": float(binary_f1_score(p, t, threshold=threshold)),
        "auc": math.nan,
    }
    if 0 < int(t.sum()) < t.numel():
        out["auc"] = float(binary_auroc(p, t))
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (ddof = 1, NaN for fewer than two values) over seeds."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), std


def aggregate(per_seed: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{metric: {mean, std}}`` over the runs' metric dicts (NaN stays NaN: an undefined AUC shows)."""
    return {m: dict(zip(("mean", "std"), mean_std(r[m] for r in per_seed), strict=True)) for m in METRICS}

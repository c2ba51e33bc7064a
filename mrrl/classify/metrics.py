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


def _fast_metrics(probs: np.ndarray, targets: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """``binary_metrics`` in NumPy for the bootstrap's thousands of calls (same definitions: F1 of the
    positive class, AUC as the Mann–Whitney statistic with ties counting one half)."""
    from scipy.stats import rankdata

    pred = probs > threshold  # as torchmetrics: positive strictly above the threshold
    tp = float(np.sum(pred & (targets == 1)))
    fp = float(np.sum(pred & (targets == 0)))
    fn = float(np.sum(~pred & (targets == 1)))
    accuracy = float(np.mean(pred == (targets == 1)))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
    n_pos = int(targets.sum())
    n_neg = targets.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return accuracy, f1, math.nan
    ranks = rankdata(probs)
    auc = (ranks[targets == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return accuracy, f1, float(auc)


def paired_difference(
    runs_a: Mapping[int, tuple[Sequence[float], Sequence[int]]],
    runs_b: Mapping[int, tuple[Sequence[float], Sequence[int]]],
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Mean over seeds of ``metric(A, seed) − metric(B, seed)`` with a percentile bootstrap interval.

    ``runs_*``: ``{seed: (test probabilities, 0/1 targets)}`` on the same test subjects in the same order.
    Each replicate resamples the shared seeds and the test subjects (the same subjects for both
    protocols), so the interval covers both the training seed's and the test set's variability — with 3
    seeds a t-interval over seeds alone would ignore that 60 test subjects are a sample too.
    Returns ``{metric: {"value", "low", "high", "n_seeds"}}`` (NaN without a shared seed).
    """
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return {m: {"value": math.nan, "low": math.nan, "high": math.nan, "n_seeds": 0} for m in METRICS}
    targets = np.asarray(runs_a[seeds[0]][1], dtype=np.int64)
    for runs in (runs_a, runs_b):
        for s in seeds:
            if not np.array_equal(np.asarray(runs[s][1]), targets):
                raise ValueError(f"seed {s}: the two protocols were tested on different subjects")
    pa = np.stack([np.asarray(runs_a[s][0], dtype=np.float64) for s in seeds])
    pb = np.stack([np.asarray(runs_b[s][0], dtype=np.float64) for s in seeds])

    def mean_diff(seed_idx: np.ndarray, case_idx: np.ndarray) -> np.ndarray:
        t = targets[case_idx]
        diffs = [
            np.subtract(
                _fast_metrics(pa[i, case_idx], t, threshold), _fast_metrics(pb[i, case_idx], t, threshold)
            )
            for i in seed_idx
        ]
        return np.mean(diffs, axis=0)

    all_cases = np.arange(targets.size)
    point = mean_diff(np.arange(len(seeds)), all_cases)
    rng = np.random.default_rng(seed)
    draws = np.array(
        [
            mean_diff(rng.integers(0, len(seeds), len(seeds)), rng.integers(0, targets.size, targets.size))
            for _ in range(int(n_boot))
        ]
    )
    alpha = (1.0 - level) / 2.0
    out = {}
    for j, m in enumerate(METRICS):
        col = draws[:, j][np.isfinite(draws[:, j])]
        low, high = np.quantile(col, [alpha, 1 - alpha]) if col.size else (math.nan, math.nan)
        out[m] = {"value": float(point[j]), "low": float(low), "high": float(high), "n_seeds": len(seeds)}
    return out


def difference_verdict(est: Mapping[str, float], better: str, worse: str) -> str:
    if math.isfinite(est["low"]) and est["low"] > 0:
        return better
    if math.isfinite(est["high"]) and est["high"] < 0:
        return worse
    return "no detectable difference"

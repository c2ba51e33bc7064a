"""Uncertainty for Table 2: bootstrap intervals of FID and KID, of the RL−standard difference and of the
share of the standard→limit gap that RL closes, plus the split-half real-vs-real noise floor.

Every replicate resamples the real rows of each class once and, for each model, its generated rows, so
the rows of one replicate share their real reference and the gap-closure ratio is bootstrapped jointly.
The ``All`` column is the concatenation of the per-class draws (a stratified resample). No library
bootstraps a Fréchet distance between feature sets, so it lives here; FID is computed exactly from the
``n × m`` cross matrix of centred rows (fast for the few hundred rows of a medical test split).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mrrl.metrics.kid import kid

ALL = "All"
METRICS = ("fid", "kid")
VERDICT_BETTER, VERDICT_WORSE, VERDICT_NONE = "RL better", "RL worse", "no detectable difference"


def _f64(x: Tensor | np.ndarray) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def fid_from_rows(real: Tensor | np.ndarray, fake: Tensor | np.ndarray) -> float:
    """FID between two sets of feature rows, exactly as ``frechet_distance`` of their Gaussians.

    With centred rows ``X`` (n × d) and ``Y`` (m × d), ``Σx Σy`` has the non-zero eigenvalues of
    ``X Yᵀ Y Xᵀ / ((n-1)(m-1))``, so ``tr sqrt(Σx Σy)`` is the nuclear norm of ``X Yᵀ`` scaled: an SVD of
    an n × m matrix instead of square roots of d × d ones.
    """
    x, y = _f64(real), _f64(fake)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"FID needs at least 2 rows on each side, got {n} and {m}")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    trace_x = float((xc * xc).sum()) / (n - 1)
    trace_y = float((yc * yc).sum()) / (m - 1)
    cross = float(torch.linalg.svdvals(xc @ yc.T).sum()) / math.sqrt((n - 1) * (m - 1))
    diff = mx - my
    return max(float(diff @ diff) + trace_x + trace_y - 2.0 * cross, 0.0)


SCORERS = {"fid": fid_from_rows, "kid": kid}


def percentile_interval(samples: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    finite = np.asarray([s for s in samples if s is not None and math.isfinite(s)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(finite, alpha)), float(np.quantile(finite, 1.0 - alpha))


def _estimate(value: float, samples: Sequence[float], level: float) -> dict[str, float]:
    low, high = percentile_interval(samples, level)
    return {"value": float(value), "low": low, "high": high}


def _with_all(per_class: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {**per_class, ALL: torch.cat([_f64(v) for v in per_class.values()])}


def _volumes(rows: Tensor, rows_per_volume: int) -> Tensor:
    """``[N·r, D]`` feature rows → ``[N, r, D]``: a volume's rows (e.g. its slices) stay together."""
    rows = _f64(rows)
    if rows.shape[0] % rows_per_volume:
        raise ValueError(
            f"{rows.shape[0]} feature rows are not a multiple of rows_per_volume={rows_per_volume}"
        )
    return rows.reshape(rows.shape[0] // rows_per_volume, rows_per_volume, rows.shape[1])


def gap_share(standard: float, rl: float, limit: float) -> float:
    """100·(standard − rl)/(standard − limit); NaN when the standard model is not above the limit."""
    gap = standard - limit
    if not all(math.isfinite(v) for v in (standard, rl, limit)) or gap <= 0:
        return math.nan
    return 100.0 * (standard - rl) / gap


def pair_verdict(a: str, b: str, est: Mapping[str, float]) -> str:
    """Plain words for the interval of a − b: which row scores lower (better), if the interval excludes 0."""
    if math.isfinite(est["low"]) and est["low"] > 0:
        return f"{b} better"
    if math.isfinite(est["high"]) and est["high"] < 0:
        return f"{a} better"
    return VERDICT_NONE


def verdict(low: float, high: float) -> str:
    """Plain words for the interval of standard − RL (positive = RL has the lower, better score)."""
    if math.isfinite(low) and low > 0:
        return VERDICT_BETTER
    if math.isfinite(high) and high < 0:
        return VERDICT_WORSE
    return VERDICT_NONE


def _class_rows(counts: Mapping[str, int], rows_per_volume: int) -> dict[str, np.ndarray]:
    """Per class, its volumes' row indices ``[n_volumes, rows_per_volume]`` in the class-concatenated rows."""
    out, start = {}, 0
    for c, n_rows in counts.items():
        if n_rows % rows_per_volume:
            raise ValueError(f"{n_rows} feature rows are not a multiple of rows_per_volume={rows_per_volume}")
        n = n_rows // rows_per_volume
        out[c] = start + np.arange(n_rows).reshape(n, rows_per_volume)
        start += n_rows
    return out


def _pick(rows: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A bootstrap draw of whole volumes per class (with replacement)."""
    return {c: rng.integers(0, len(r), len(r)) for c, r in rows.items()}


def _rows(rows: Mapping[str, np.ndarray], col: str, pick: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """The row indices of one column (a class, or ``All``: every class) for a draw (None: every volume)."""
    classes = list(rows) if col == ALL else [col]
    return np.concatenate([(rows[c] if pick is None else rows[c][pick[c]]).ravel() for c in classes])


class _Grams:
    """FID and KID of any multiset of real × generated rows from Gram matrices computed once.

    A bootstrap replicate is a multiset (rows drawn with replacement), so it is described by its distinct
    rows and their counts; every quantity FID and KID need (means, traces, the cross term, the cubic
    kernel sums) is a weighted sum over the Gram matrices of the distinct rows. That avoids re-multiplying
    [n, d] features for each of thousands of replicates; results equal ``fid_from_rows`` / ``kid`` on the
    explicitly duplicated rows.
    """

    def __init__(self, real: tuple[Tensor, Tensor, Tensor], fake_rows: Tensor):
        x, self.g_rr, self.k_rr = real
        y = _f64(fake_rows)
        d = y.shape[1]
        self.g_ff, self.g_rf = y @ y.T, x @ y.T
        self.k_ff, self.k_rf = (self.g_ff / d + 1.0) ** 3, (self.g_rf / d + 1.0) ** 3

    @staticmethod
    def real(real_rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows, Gram, cubic kernel)`` of the real rows, shared by every model."""
        x = _f64(real_rows)
        g = x @ x.T
        return x, g, (g / x.shape[1] + 1.0) ** 3

    def scores(self, real_idx: np.ndarray, fake_idx: np.ndarray) -> tuple[float, float]:
        ur, wr = np.unique(real_idx, return_counts=True)
        uf, wf = np.unique(fake_idx, return_counts=True)
        n, m = float(wr.sum()), float(wf.sum())
        if n < 2 or m < 2:
            raise ValueError(f"FID/KID need at least 2 rows on each side, got {int(n)} and {int(m)}")
        ur_t, uf_t = torch.from_numpy(ur), torch.from_numpy(uf)
        wr_t, wf_t = torch.from_numpy(wr).double(), torch.from_numpy(wf).double()
        g_rr = self.g_rr[ur_t][:, ur_t]
        g_ff = self.g_ff[uf_t][:, uf_t]
        g_rf = self.g_rf[ur_t][:, uf_t]
        mean_xx = float(wr_t @ g_rr @ wr_t) / n**2
        mean_yy = float(wf_t @ g_ff @ wf_t) / m**2
        mean_xy = float(wr_t @ g_rf @ wf_t) / (n * m)
        trace_x = (float(wr_t @ g_rr.diagonal()) - n * mean_xx) / (n - 1)
        trace_y = (float(wf_t @ g_ff.diagonal()) - m * mean_yy) / (m - 1)
        # Rows √w_i (x_i − μx) and √v_j (y_j − μy): their cross products, double-centred from g_rf.
        centred = g_rf - (g_rf @ wf_t)[:, None] / m - (wr_t @ g_rf)[None, :] / n + mean_xy
        centred = centred * wr_t.sqrt()[:, None] * wf_t.sqrt()[None, :]
        small = centred @ centred.T if centred.shape[0] <= centred.shape[1] else centred.T @ centred
        cross = float(torch.linalg.eigvalsh(small).clamp_min(0).sqrt().sum()) / math.sqrt((n - 1) * (m - 1))
        fid = max(mean_xx + mean_yy - 2 * mean_xy + trace_x + trace_y - 2 * cross, 0.0)
        k_rr = self.k_rr[ur_t][:, ur_t]
        k_ff = self.k_ff[uf_t][:, uf_t]
        xx = (float(wr_t @ k_rr @ wr_t) - float(wr_t @ k_rr.diagonal())) / (n * (n - 1))
        yy = (float(wf_t @ k_ff @ wf_t) - float(wf_t @ k_ff.diagonal())) / (m * (m - 1))
        xy = float(wr_t @ self.k_rf[ur_t][:, uf_t] @ wf_t) / (n * m)
        return fid, xx + yy - 2 * xy


def bootstrap_scores(
    real: Mapping[str, Tensor],
    fake: Mapping[str, Mapping[str, Tensor]],
    n_boot: int = 500,
    seed: int = 0,
    level: float = 0.95,
    comparison: tuple[str, str, str] = ("standard", "rl", "vqgan"),
    rows_per_volume: int = 1,
    pairs: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Point values and percentile intervals of FID and KID per model and column (classes + ``All``).

    ``real``: feature rows per class; ``fake``: per model, feature rows per class. ``comparison`` names
    (standard, rl, limit): when all three models are present, also the interval of standard − rl and of
    the share of the gap closed, with a verdict per metric and column. Returns
    ``{"n_boot", "level", "scores": {metric: {model: {col: est}}}, "difference", "gap_closed", "verdict",
    "gap"}`` where ``est = {"value", "low", "high"}`` (``gap``: standard − limit). ``rows_per_volume``: a
    2D extractor's rows per volume (its slices); whole volumes are resampled. ``pairs``: extra ``(a, b)`` rows
    to compare, e.g. two RL variants: ``out["pairs"]`` lists each with the interval of a − b per metric and
    column (positive: b scores lower, i.e. better) from the same resamples of the real set.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    classes = list(real)
    cols = [*classes, ALL]
    real_all = _with_all(real)[ALL]
    real_rows = _class_rows({c: len(real[c]) for c in classes}, rows_per_volume)
    real_gram = _Grams.real(real_all)
    grams = {m: _Grams(real_gram, _with_all(per_class)[ALL]) for m, per_class in fake.items()}
    fake_rows = {
        m: _class_rows({c: len(v) for c, v in per_class.items()}, rows_per_volume)
        for m, per_class in fake.items()
    }
    point = {metric: {m: {} for m in fake} for metric in METRICS}
    for m, g in grams.items():
        for c in cols:
            fid, kid_value = g.scores(_rows(real_rows, c, None), _rows(fake_rows[m], c, None))
            point["fid"][m][c], point["kid"][m][c] = fid, kid_value
    draws = {metric: {m: {c: [] for c in cols} for m in fake} for metric in METRICS}
    rng = np.random.default_rng(int(seed))
    for _ in range(int(n_boot)):
        real_pick = _pick(real_rows, rng)
        for m, g in grams.items():
            fake_pick = _pick(fake_rows[m], rng)
            for c in cols:
                fid, kid_value = g.scores(_rows(real_rows, c, real_pick), _rows(fake_rows[m], c, fake_pick))
                draws["fid"][m][c].append(fid)
                draws["kid"][m][c].append(kid_value)
    out: dict[str, Any] = {
        "n_boot": int(n_boot),
        "level": float(level),
        "seed": int(seed),
        "scores": {
            metric: {
                m: {c: _estimate(point[metric][m][c], draws[metric][m][c], level) for c in cols} for m in fake
            }
            for metric in METRICS
        },
    }
    std, rl, limit = comparison
    if std in fake and limit in fake:
        out["gap"] = {}
        for metric in METRICS:
            p, d = point[metric], draws[metric]
            gap = {c: [a - g for a, g in zip(d[std][c], d[limit][c])] for c in cols}
            out["gap"][metric] = {c: _estimate(p[std][c] - p[limit][c], gap[c], level) for c in cols}
    out["pairs"] = []
    for a, b in pairs:
        missing = [k for k in (a, b) if k not in fake]
        if missing:
            raise ValueError(f"pair ({a}, {b}): no row named {', '.join(missing)} (rows: {', '.join(fake)})")
        p, d = point, draws
        difference = {
            metric: {
                c: _estimate(
                    p[metric][a][c] - p[metric][b][c],
                    [x - y for x, y in zip(d[metric][a][c], d[metric][b][c])],
                    level,
                )
                for c in cols
            }
            for metric in METRICS
        }
        out["pairs"].append(
            {
                "a": a,
                "b": b,
                "difference": difference,
                "verdict": {
                    metric: {c: pair_verdict(a, b, difference[metric][c]) for c in cols} for metric in METRICS
                },
            }
        )
    if all(k in fake for k in comparison):
        out["difference"], out["gap_closed"], out["verdict"] = {}, {}, {}
        for metric in METRICS:
            p, d = point[metric], draws[metric]
            diff = {c: [a - b for a, b in zip(d[std][c], d[rl][c])] for c in cols}
            share = {
                c: [gap_share(a, b, g) for a, b, g in zip(d[std][c], d[rl][c], d[limit][c])] for c in cols
            }
            out["difference"][metric] = {c: _estimate(p[std][c] - p[rl][c], diff[c], level) for c in cols}
            out["gap_closed"][metric] = {
                c: _estimate(gap_share(p[std][c], p[rl][c], p[limit][c]), share[c], level) for c in cols
            }
            out["verdict"][metric] = {
                c: verdict(out["difference"][metric][c]["low"], out["difference"][metric][c]["high"])
                for c in cols
            }
    return out


def split_half_floor(
    real: Mapping[str, Tensor],
    n_splits: int = 50,
    seed: int = 0,
    level: float = 0.95,
    rows_per_volume: int = 1,
) -> dict[str, dict[str, dict[str, float]]]:
    """FID and KID between two random halves of the real set, over ``n_splits`` random splits per column:
    ``{metric: {col: {"value" (mean), "low", "high", "n_half"}}}``. Differences below this floor are
    estimator noise (note: each half has n/2 rows, so the FID floor is higher than at n). NaN when a class
    has fewer than 4 volumes."""
    classes = list(real)
    gen = torch.Generator().manual_seed(int(seed))
    draws = {metric: {c: [] for c in [*classes, ALL]} for metric in METRICS}
    vols = {c: _volumes(v, rows_per_volume) for c, v in real.items()}
    halves = {c: len(v) // 2 for c, v in vols.items()}
    # Fewer than 4 volumes in a class: no floor (NaN), said in the table rather than failing the evaluation.
    for _ in range(int(n_splits) if min(halves.values()) >= 2 else 0):
        a, b = {}, {}
        for c in classes:
            shuffled = vols[c][torch.randperm(len(vols[c]), generator=gen)]
            a[c] = shuffled[: halves[c]].reshape(-1, shuffled.shape[2])
            b[c] = shuffled[halves[c] : 2 * halves[c]].reshape(-1, shuffled.shape[2])
        a, b = _with_all(a), _with_all(b)
        for metric, fn in SCORERS.items():
            for c in a:
                draws[metric][c].append(fn(a[c], b[c]))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for metric in METRICS:
        out[metric] = {}
        for c, values in draws[metric].items():
            low, high = percentile_interval(values, level)
            n_half = sum(halves.values()) if c == ALL else halves[c]
            mean = float(np.mean(values)) if values else math.nan
            out[metric][c] = {"value": mean, "low": low, "high": high, "n_half": n_half}
    return out

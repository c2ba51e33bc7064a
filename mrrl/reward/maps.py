"""FID → reward maps (paper §3.3, Eq. 3): the lower a group's FID, the higher the reward of its volumes.

Every map sends the best (lowest-FID) group to 1 and the worst to 0; they differ in how the groups in
between are spread:

- ``linear``: proportional to the FID gap, ``(FID_max - FID) / (FID_max - FID_min)`` (the default);
- ``rank``: evenly spaced by rank, so one outlier group cannot squash the others together (ties share
  their mean rank);
- ``exp``: ``exp(-FID / tau)`` min-max normalised; a small ``tau`` spreads the good groups apart and
  bunches the bad ones near 0 (default ``tau`` = the median FID).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from mrrl.errors import ConfigError, MrrlError

REWARD_MAPS = ("linear", "rank", "exp")


class RewardMapError(MrrlError, ValueError):
    """The FIDs handed to a reward map are unusable (none, NaN/Inf)."""


def fid_to_reward(
    fids: Mapping[str, float], method: str = "linear", tau: float | None = None
) -> dict[str, float]:
    """Rewards in [0, 1] for each group of ``fids`` (same keys, same order); best group 1, worst 0.

    All groups with the same FID (including a single group) get reward 1.
    """
    if method not in REWARD_MAPS:
        raise ConfigError(f"unknown FID→reward map {method!r}: use one of {', '.join(REWARD_MAPS)}")
    if not fids:
        raise RewardMapError("fid_to_reward needs the FID of at least one group")
    bad = [g for g, f in fids.items() if f is None or not math.isfinite(float(f))]
    if bad:
        raise RewardMapError(
            f"FID is NaN/Inf/missing for group(s) {', '.join(map(str, bad))}: cannot map to rewards"
        )
    names = list(fids)
    values = np.array([float(fids[g]) for g in names], dtype=np.float64)
    if np.ptp(values) == 0:
        return dict.fromkeys(names, 1.0)
    if method == "linear":
        rewards = (values.max() - values) / np.ptp(values)
    elif method == "rank":
        from scipy.stats import rankdata

        ranks = rankdata(values, method="average") - 1.0  # 0 = best (lowest FID)
        rewards = 1.0 - ranks / ranks.max()
    else:
        scale = float(np.median(values)) if tau is None else float(tau)
        if not scale > 0:
            raise ConfigError(f"the exp reward map needs tau > 0, got {scale}")
        # Shift by the best FID first: the same numbers, without exp underflow for large FIDs.
        weights = np.exp(-(values - values.min()) / scale)
        rewards = (weights - weights.min()) / np.ptp(weights)
    return {g: float(np.clip(r, 0.0, 1.0)) for g, r in zip(names, rewards)}

"""Reward learning (paper §3.2–3.4): the reward dataset format, FID→reward maps, the R3D/R2D regressors.

Names are imported lazily (PEP 562): the ``reward_data`` stage imports the writer and the reward maps
without paying for MONAI or Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "format": ("RewardDataError", "group_name"),
    "writer": ("RewardDatasetWriter",),
    "dataset": ("RewardDataset", "load_reward_dataset"),
    "maps": ("REWARD_MAPS", "RewardMapError", "fid_to_reward"),
    "splits": ("SPLIT_MODES", "split_reward_rows"),
    "losses": ("PairwiseRankingAccuracy", "pairwise_ranking_accuracy", "pairwise_ranking_loss"),
    "models": ("RewardNet", "SliceRewardNet", "VolumeRewardNet", "build_reward_net", "load_reward_model"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from mrrl.reward.dataset import RewardDataset, load_reward_dataset  # noqa: F401
    from mrrl.reward.format import RewardDataError, group_name  # noqa: F401
    from mrrl.reward.losses import (  # noqa: F401
        PairwiseRankingAccuracy,
        pairwise_ranking_accuracy,
        pairwise_ranking_loss,
    )
    from mrrl.reward.maps import REWARD_MAPS, RewardMapError, fid_to_reward  # noqa: F401
    from mrrl.reward.models import (  # noqa: F401
        RewardNet,
        SliceRewardNet,
        VolumeRewardNet,
        build_reward_net,
        load_reward_model,
    )
    from mrrl.reward.splits import SPLIT_MODES, split_reward_rows  # noqa: F401
    from mrrl.reward.writer import RewardDatasetWriter  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"mrrl.reward.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mrrl.reward' has no attribute {name!r}")

"""The reward regressors' typed settings: ``stage.optim`` and ``stage.ranking`` of ``conf/stage/reward.yaml``
(built with :func:`mrrl.settings.from_config`; the YAML holds every default)."""

from __future__ import annotations

from dataclasses import dataclass

from mrrl.errors import ConfigError
from mrrl.reward.losses import RANKING_LOSSES

SCHEDULERS = ("cosine", "none")


@dataclass(frozen=True)
class RewardOptimSettings:
    """``stage.optim``: AdamW and its learning-rate schedule (cosine over ``max_epochs`` or none)."""

    lr: float
    betas: tuple[float, float] | list[float]
    weight_decay: float
    scheduler: str | None  # cosine | none (null = none)
    min_lr: float

    def __post_init__(self) -> None:
        if self.scheduler not in (*SCHEDULERS, None):
            raise ConfigError(f"stage.optim.scheduler must be 'cosine' or 'none', got {self.scheduler!r}")


@dataclass(frozen=True)
class RankingSettings:
    """``stage.ranking``: the pairwise ranking loss between volumes of different groups."""

    kind: str  # logistic | margin
    margin: float
    scale: float

    def __post_init__(self) -> None:
        if self.kind not in RANKING_LOSSES:
            raise ConfigError(f"stage.ranking.kind must be one of {RANKING_LOSSES}, got {self.kind!r}")

"""The KL coefficient β: fixed, or adapted towards a target KL (the proportional controller of Ziegler et al. 2019).

After each PPO iteration ``β ← β · (1 + clip(KL / target − 1, −e, e) / horizon)``: β grows while the policy
drifts further from the pretrained model than ``target`` and shrinks while it stays closer. ``KL`` is the mean
per-step KL of the iteration's update (``ppo/kl``, the quantity β multiplies); ``horizon`` is in iterations,
so β changes by at most a factor ``1 ± e / horizon`` per iteration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from mrrl.errors import ConfigError

if TYPE_CHECKING:
    from mrrl.ppo.settings import KLSettings


class KLController:
    def __init__(self, coef: float, adaptive: bool, target: float, error_clip: float, horizon: float):
        if coef < 0:
            raise ConfigError(f"stage.train.kl.coef must be ≥ 0, got {coef}")
        if adaptive and not (target > 0 and error_clip > 0 and horizon > 0 and coef > 0):
            raise ConfigError(
                "stage.train.kl.adaptive needs kl.coef > 0 (the starting β), kl.target > 0, kl.error_clip > 0 "
                f"and kl.horizon > 0; got coef={coef}, target={target}, error_clip={error_clip}, "
                f"horizon={horizon}"
            )
        self.coef = float(coef)
        self.adaptive = bool(adaptive)
        self.target = float(target)
        self.error_clip = float(error_clip)
        self.horizon = float(horizon)

    @classmethod
    def from_settings(cls, kl: KLSettings) -> KLController:
        """From ``stage.train.kl``."""
        return cls(
            float(kl.coef), bool(kl.adaptive), float(kl.target), float(kl.error_clip), float(kl.horizon)
        )

    def update(self, kl: float) -> float:
        """Adapt β to the iteration's measured KL (no-op when not adaptive); returns the new β."""
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -self.error_clip), self.error_clip)
            self.coef *= 1.0 + error / self.horizon
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.coef = float(state["coef"])

"""Checkpoint selection on the validation probe: remember the iteration whose probe score is lowest."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class BestTracker:
    """Lowest-is-best score over iterations (FID/KID); ties keep the earlier iteration, NaN never wins."""

    def __init__(self, metric: str):
        self.metric = metric
        self.best_score = math.inf
        self.best_iteration: int | None = None
        self.history: list[tuple[int, float]] = []

    def update(self, iteration: int, score: float) -> bool:
        """Record a probe; True when it is the best so far (the caller then saves ``ppo_best.ckpt``)."""
        self.history.append((int(iteration), float(score)))
        if math.isfinite(score) and score < self.best_score:
            self.best_score, self.best_iteration = float(score), int(iteration)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "best_score": self.best_score,
            "best_iteration": self.best_iteration,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_score = float(state["best_score"])
        self.best_iteration = state["best_iteration"]
        self.history = [(int(i), float(s)) for i, s in state["history"]]

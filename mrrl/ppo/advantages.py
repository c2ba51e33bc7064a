"""Per-class reward normalisation, the class-conditional analogue of DDPO's per-prompt stat tracker.

Rewards of one class are compared only with rewards of that class (an HGG volume competes with other HGG
volumes), using a buffer of the class's recent rewards; with fewer than ``min_count`` of them, the statistics of
the class's rewards in the current batch are used. ``buffer_size = 0`` always uses the current batch: the
advantages are then centred within each iteration's rollouts of a class (group-relative, as in GRPO), so a
reward that rises over the iterations does not make every new sample's advantage positive, which would raise
the likelihood of whatever the policy samples now and narrow its distribution. Callers pass the rewards
*gathered from every DDP rank*, so every rank sees the same statistics.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from mrrl.errors import ConfigError


class PerClassRewardNormalizer:
    def __init__(self, num_classes: int, buffer_size: int = 256, min_count: int = 8, clip: float = 5.0):
        if int(buffer_size) < 0:
            raise ConfigError(
                f"stage.reward.stat_buffer must be >= 0 (0: the current batch), got {buffer_size}"
            )
        self.num_classes = int(num_classes)
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.clip = float(clip)
        self.buffers: list[deque[float]] = [deque(maxlen=self.buffer_size) for _ in range(self.num_classes)]

    def update(self, rewards: torch.Tensor, labels: torch.Tensor) -> None:
        for reward, label in zip(rewards.detach().double().cpu().tolist(), labels.cpu().tolist()):
            self.buffers[int(label)].append(float(reward))

    def stats(self, label: int, batch_rewards: torch.Tensor) -> tuple[float, float]:
        """Mean and std for ``label``; ``batch_rewards``: that class's rewards in the current (gathered) batch."""
        values = list(self.buffers[label])
        use_buffer = self.buffer_size > 0 and len(values) >= self.min_count
        source = torch.tensor(values, dtype=torch.float64) if use_buffer else batch_rewards
        source = source.double().cpu()
        std = float(source.std(unbiased=False)) if source.numel() > 1 else 0.0
        return float(source.mean()), std

    def normalize(
        self, rewards: torch.Tensor, labels: torch.Tensor, all_rewards: torch.Tensor, all_labels: torch.Tensor
    ) -> torch.Tensor:
        """Advantages of the local ``rewards`` after adding the gathered batch to the per-class buffers."""
        self.update(all_rewards, all_labels)
        advantages = torch.empty_like(rewards, dtype=torch.float32)
        for label in labels.unique().tolist():
            mask = labels == label
            mean, std = self.stats(int(label), all_rewards[all_labels == label])
            advantages[mask] = ((rewards[mask].double() - mean) / (std + 1e-6)).float()
        return advantages.clamp(-self.clip, self.clip)

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": [list(b) for b in self.buffers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for buffer, values in zip(self.buffers, state["buffers"]):
            buffer.clear()
            buffer.extend(values)

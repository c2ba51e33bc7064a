"""k-NN manifold metrics on extractor features, in chunks so memory stays ``O(chunk_size²)``.

- improved precision / recall (Kynkäänniemi et al. 2019): a sample lies on the other set's manifold
  when it falls inside the k-NN ball of at least one of that set's samples;
- density / coverage (Naeem et al. 2020): density counts how many real k-NN balls hold each fake
  sample (divided by k; ~1 when the sets match), coverage is the fraction of real balls holding at
  least one fake sample. Both use only the real radii, so they are robust to fake outliers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _prep(x: Tensor) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, F], got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def knn_radii(features: Tensor, k: int = 3, chunk_size: int = 1024) -> Tensor:
    """Distance from each row to its k-th nearest other row (the row itself is the 0-th neighbour)."""
    x = _prep(features)
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"need 1 <= k < number of samples, got k={k} with {x.shape[0]} samples")
    radii = []
    for i in range(0, x.shape[0], chunk_size):
        rows = x[i : i + chunk_size]
        best = torch.full((rows.shape[0], 0), float("inf"), dtype=x.dtype, device=x.device)
        for j in range(0, x.shape[0], chunk_size):
            d = torch.cdist(rows, x[j : j + chunk_size])
            best = (
                torch.cat([best, d], dim=1).topk(min(k + 1, best.shape[1] + d.shape[1]), largest=False).values
            )
        radii.append(best[:, k])
    return torch.cat(radii)


def prdc(
    real: Tensor, fake: Tensor, k: int = 3, chunk_size: int = 1024, with_recall: bool = True
) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (both ``[N, F]``).

    ``with_recall=False`` skips the fake k-NN radii (recall is then NaN).
    """
    real = _prep(real)
    fake = _prep(fake).to(real.device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    r_real = knn_radii(real, k, chunk_size)
    r_fake = knn_radii(fake, k, chunk_size) if with_recall else torch.full((fake.shape[0],), -1.0).to(fake)
    fake_on_real = torch.zeros(fake.shape[0], dtype=torch.bool, device=fake.device)
    fake_ball_count = torch.zeros(fake.shape[0], dtype=torch.float64, device=fake.device)
    real_on_fake = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    real_covered = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for i in range(0, real.shape[0], chunk_size):
        for j in range(0, fake.shape[0], chunk_size):
            d = torch.cdist(real[i : i + chunk_size], fake[j : j + chunk_size])  # [r, f]
            in_real_ball = d <= r_real[i : i + chunk_size, None]
            fake_on_real[j : j + chunk_size] |= in_real_ball.any(0)
            fake_ball_count[j : j + chunk_size] += in_real_ball.sum(0)
            real_covered[i : i + chunk_size] |= in_real_ball.any(1)
            real_on_fake[i : i + chunk_size] |= (d <= r_fake[None, j : j + chunk_size]).any(1)
    return {
        "precision": fake_on_real.double().mean().item(),
        "recall": real_on_fake.double().mean().item() if with_recall else float("nan"),
        "density": (fake_ball_count.mean() / k).item(),
        "coverage": real_covered.double().mean().item(),
    }


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk_size: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii."""
    out = prdc(real, fake, k, chunk_size)
    return {"precision": out["precision"], "recall": out["recall"]}


def density_coverage(real: Tensor, fake: Tensor, k: int = 3, chunk_size: int = 1024) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020) with k-NN radii of the real set."""
    out = prdc(real, fake, k, chunk_size, with_recall=False)
    return {"density": out["density"], "coverage": out["coverage"]}

"""MS-SSIM diversity of a generated set: mean MS-SSIM over random pairs (MONAI ``MultiScaleSSIMMetric``).

High values mean the samples look alike (low diversity, mode collapse); independent volumes score
near 0, identical ones 1. Compare only values computed at the same volume size (the size decides the
scales and window, see :func:`ms_ssim_settings`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics import MultiScaleSSIMMetric
from torch import Tensor

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as in MONAI


def ms_ssim_settings(spatial_shape: Sequence[int], min_kernel: int = 5, max_kernel: int = 11) -> dict:
    """Scales and Gaussian window that fit a volume of ``spatial_shape``.

    Rule: use the most scales (at most 5) for which an odd window of at least ``min_kernel`` voxels
    fits at the coarsest scale, then the largest odd window up to ``max_kernel``; sigma scales with
    the window (1.5 at 11, the standard setting); the first S standard weights are renormalised to
    sum to 1. A window fits when it is no larger than the coarsest scale (``size / 2^(S-1)``) and
    passes MONAI's own check ``size // (S-1)² > window - 1``. Examples: 32³ → 3 scales, window 7;
    64³ → 4 scales, window 7; 128³ → 5 scales, window 7; 256³ → 5 scales, window 11.
    """
    size = min(int(s) for s in spatial_shape)
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        limit = min(size // 2 ** (scales - 1), size // max(1, scales - 1) ** 2, max_kernel)
        kernel = limit if limit % 2 else limit - 1
        if kernel >= min_kernel:
            weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
            return {
                "weights": tuple((weights / weights.sum()).tolist()),
                "kernel_size": kernel,
                "kernel_sigma": 1.5 * kernel / 11,
            }
    raise ValueError(
        f"volumes of size {tuple(spatial_shape)} are too small for MS-SSIM (need >= {min_kernel})"
    )


def _pairs(n: int, max_pairs: int, generator: torch.Generator) -> Tensor:
    """All pairs i < j when there are at most ``max_pairs``, else ``max_pairs`` random pairs i != j."""
    if n < 2:
        raise ValueError("MS-SSIM diversity needs at least 2 volumes")
    if n * (n - 1) // 2 <= max_pairs:
        return torch.triu_indices(n, n, offset=1).T
    i = torch.randint(n, (max_pairs,), generator=generator)
    j = torch.randint(n - 1, (max_pairs,), generator=generator)
    return torch.stack([i, j + (j >= i).long()], dim=1)


def ms_ssim_diversity(
    volumes: Tensor,
    max_pairs: int = 100,
    generator: torch.Generator | None = None,
    batch_size: int = 8,
) -> float:
    """Mean MS-SSIM over pairs of ``volumes`` ``[N, C, D, H, W]`` in [-1, 1].

    Volumes are shifted to [0, 2] (SSIM's luminance term assumes non-negative intensities) and
    compared with ``data_range=2``. Pairs are drawn with ``generator`` (default: seeded with 0, so
    the value is reproducible).
    """
    if volumes.ndim != 5:
        raise ValueError(f"expected volumes [N, C, D, H, W], got {tuple(volumes.shape)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=2.0, **ms_ssim_settings(volumes.shape[2:]))
    pairs = _pairs(volumes.shape[0], max_pairs, generator).to(volumes.device)
    with torch.no_grad():
        for chunk in pairs.split(batch_size):
            metric(volumes[chunk[:, 0]].float() + 1, volumes[chunk[:, 1]].float() + 1)
    return float(metric.aggregate().item())

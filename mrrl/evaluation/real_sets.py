"""The real volumes of one class and split, and their cached feature statistics (the FID reference)."""

from __future__ import annotations


def real_class_set(datamodule, split: str, class_name: str):
    """All preprocessed volumes ``[N, C, D, H, W]`` of one class in one split, and their subject ids."""
    import torch

    from mrrl.errors import ConfigError

    dataset = datamodule.dataset(split, label=class_name)
    if len(dataset) == 0:
        raise ConfigError(f"no {split} volumes of class {class_name}: real volumes are needed per class")
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([item["image"] for item in items]), [item["id"] for item in items]


def real_class_statistics(datamodule, split: str, class_name: str, extractor, cache, batch_size: int, device):
    """Feature statistics of a class's real volumes, computed once per (data, split, class, extractor).

    Returns ``(volumes, ids, statistics)``; ``cache`` is a :class:`mrrl.metrics.RealStatsCache`.
    """
    from mrrl.metrics.features import compute_statistics

    real, ids = real_class_set(datamodule, split, class_name)
    key = {
        "dataset": datamodule.name,
        "preprocessing": datamodule.cache.dir.name,
        "split": split,
        "class": class_name,
        "ids": sorted(ids),
        "extractor": extractor.identity,
    }
    stats = cache.get_or_compute(key, lambda: compute_statistics(extractor, real, batch_size, device))
    return real, ids, stats

"""Downstream classification (paper §4.3, Tables 3–4): does pre-training on synthetic volumes help?

- :mod:`mrrl.classify.model`: the MONAI 3D ResNet LightningModule, weight transfer, test predictions;
- :mod:`mrrl.classify.data`: synthetic-volume dataset, class weights, the small DataModule;
- :mod:`mrrl.classify.protocols`: the protocols (real only, standard, RL, extra generators) and their
  synthetic volumes, sampled once per generator and cached;
- :mod:`mrrl.classify.runner`: one (protocol, seed) run — pre-train, fine-tune, test — resumable;
- :mod:`mrrl.classify.metrics`: accuracy / F1 / AUC and mean ± sample std over seeds;
- :mod:`mrrl.classify.tables`: ``table3.md``, ``table3.csv``, ``per_seed.csv``.

``mrrl stage=classify`` (:mod:`mrrl.stages.classify`) puts them together.
"""

from mrrl.classify.metrics import METRICS, aggregate, binary_metrics, mean_std
from mrrl.classify.model import ClassifierModule, build_classifier
from mrrl.classify.protocols import Protocol, discover_protocols

__all__ = [
    "METRICS",
    "ClassifierModule",
    "Protocol",
    "aggregate",
    "binary_metrics",
    "build_classifier",
    "discover_protocols",
    "mean_std",
]

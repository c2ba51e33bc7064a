"""Paper Table 2: which models an experiment can evaluate, their volumes, their scores, the tables.

- :mod:`mrrl.evaluation.sources`: the rows (VQGAN reconstruction, standard diffusion, RL fine-tuned, extra
  models) found from the stage manifests, and their volumes, generated once and cached as ``.npy``;
- :mod:`mrrl.evaluation.scores`: real test-set features (cached through ``RealStatsCache``), FID,
  precision/recall/density/coverage and MS-SSIM diversity per model and class;
- :mod:`mrrl.evaluation.tables`: ``table2.md`` / ``table2.csv`` and the mid-slice figures.

``mrrl stage=evaluate`` (:mod:`mrrl.stages.evaluate`) puts them together.
"""

from mrrl.evaluation.scores import RealFeatureCache, build_extractors, diversity_by_class, score_model
from mrrl.evaluation.sources import ROW_LABELS, GenerationSettings, ModelSpec, discover_models, model_volumes
from mrrl.evaluation.tables import gap_closed, render_markdown, write_csv, write_figures

__all__ = [
    "ROW_LABELS",
    "GenerationSettings",
    "ModelSpec",
    "RealFeatureCache",
    "build_extractors",
    "discover_models",
    "diversity_by_class",
    "gap_closed",
    "model_volumes",
    "render_markdown",
    "score_model",
    "write_csv",
    "write_figures",
]

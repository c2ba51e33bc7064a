"""Synthetic cohorts other tools can read: NIfTI in the dataset's layout, labels, provenance, model card."""

from mrrl.export.cohort import is_cohort, load_cohort_volumes, plan_blocks, read_labels
from mrrl.export.geometry import CohortGeometry, cohort_geometry
from mrrl.export.weights import ExportedModel, load_exported_model, save_exported_model

__all__ = [
    "CohortGeometry",
    "ExportedModel",
    "cohort_geometry",
    "is_cohort",
    "load_cohort_volumes",
    "load_exported_model",
    "plan_blocks",
    "read_labels",
    "save_exported_model",
]

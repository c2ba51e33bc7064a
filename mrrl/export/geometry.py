"""The geometry and intensity range an exported volume is written with, taken from the training data.

Preprocessing records, per subject, the affine of the preprocessed grid (RAS after ``Orientation``,
voxel size after the aspect-preserving resize) and the source intensities that were mapped onto the model
range (``mrrl.data.preprocess.preprocess_with_geometry``, kept in the cache sidecar). A synthetic volume
belongs to no subject, so it gets the cohort's typical grid: the median voxel size, the orientation of the
training grids and the median position of the grid centre; and, with ``intensity=source``, the median
source range per channel. Caches written before the geometry was recorded are read anew (a few subjects).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from mrrl.data.preprocess import preprocess_with_geometry
from mrrl.errors import ConfigError

INTENSITY_MODES = ("model", "source")


@dataclass(frozen=True)
class CohortGeometry:
    """``affine`` (4×4, voxel -> mm), ``source_range`` per channel and how many subjects they come from."""

    affine: np.ndarray
    source_range: np.ndarray  # [C, 2]
    subjects: int

    @property
    def spacing_mm(self) -> list[float]:
        return np.linalg.norm(self.affine[:3, :3], axis=0).round(6).tolist()

    @property
    def axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))

    def summary(self) -> dict:
        return {
            "affine": self.affine.round(6).tolist(),
            "spacing_mm": self.spacing_mm,
            "axcodes": self.axcodes,
            "source_range": self.source_range.round(6).tolist(),
            "from_subjects": self.subjects,
        }


def subject_geometry(cache, subject) -> dict:
    """The recorded geometry of one cached subject (recomputed for caches made before it was recorded)."""
    meta_path = cache.array_path(subject.id).with_suffix(".json")
    try:
        geometry = json.loads(meta_path.read_text()).get("geometry")
    except (OSError, json.JSONDecodeError):
        geometry = None
    return geometry or preprocess_with_geometry(subject, cache.cfg)[1]


def cohort_geometry(datamodule, limit: int) -> CohortGeometry:
    """Typical grid and source range of the training split (the first ``limit`` subjects)."""
    subjects = list(datamodule.dataset("train").subjects)[: max(1, int(limit))]
    if not subjects:
        raise ConfigError("the training split is empty: no geometry to give the exported volumes")
    found = [subject_geometry(datamodule.cache, s) for s in subjects]
    return combine(found, tuple(datamodule.image_shape[1:]))


def combine(geometries: Sequence[dict], shape: Sequence[int]) -> CohortGeometry:
    affines = np.stack([np.asarray(g["affine"], dtype=np.float64) for g in geometries])
    spacing = np.median(np.linalg.norm(affines[:, :3, :3], axis=1), axis=0)
    first = affines[0, :3, :3]
    direction = first / np.linalg.norm(first, axis=0)
    half = (np.asarray(shape, dtype=np.float64) - 1) / 2
    centres = affines[:, :3, :3] @ half + affines[:, :3, 3]
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = np.median(centres, axis=0) - affine[:3, :3] @ half
    source = np.median(np.stack([np.asarray(g["source_range"], dtype=np.float64) for g in geometries]), 0)
    return CohortGeometry(affine=affine, source_range=source, subjects=len(geometries))


def to_output_range(
    volume: np.ndarray, mode: str, model_range: Sequence[float], source_range: np.ndarray
) -> np.ndarray:
    """``[C, ...]`` model-range voxels as written: unchanged (``model``) or linearly onto ``source_range``."""
    if mode not in INTENSITY_MODES:
        raise ConfigError(f"stage.intensity must be one of {list(INTENSITY_MODES)}, got {mode!r}")
    if mode == "model":
        return volume
    lo, hi = (float(v) for v in model_range)
    src = np.asarray(source_range, dtype=np.float64).reshape(-1, 2)
    shape = (-1,) + (1,) * (volume.ndim - 1)
    a, b = src[:, 0].reshape(shape), src[:, 1].reshape(shape)
    return ((volume - lo) / (hi - lo) * (b - a) + a).astype(np.float32)


def to_model_range(
    volume: np.ndarray, mode: str, model_range: Sequence[float], source_range: np.ndarray
) -> np.ndarray:
    """Inverse of :func:`to_output_range` (reading an exported cohort back into the model range)."""
    if mode == "model":
        return volume
    lo, hi = (float(v) for v in model_range)
    src = np.asarray(source_range, dtype=np.float64).reshape(-1, 2)
    shape = (-1,) + (1,) * (volume.ndim - 1)
    a, b = src[:, 0].reshape(shape), src[:, 1].reshape(shape)
    return ((volume - a) / (b - a) * (hi - lo) + lo).astype(np.float32)

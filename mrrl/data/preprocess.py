"""Load, validate and preprocess one subject, and cache the result on disk.

Loading and voxel validation happen in the same pass (every file must be decoded once anyway); the
preprocessed array is cached as ``.npy`` keyed by the preprocessing settings and the source files' size
and mtime, so later epochs and later stages decode no NIfTI/Analyze file at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForeground,
    Orientation,
    ResizeWithPadOrCrop,
    ScaleIntensityRangePercentiles,
)

from mrrl.data.layouts import DataProblem, Subject
from mrrl.utils.io import atomic_save_npy, atomic_write_json

CACHE_VERSION = 1


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes the preprocessed voxels (and therefore the cache key)."""

    image_size: tuple[int, int, int] = (64, 64, 64)
    intensity_range: tuple[float, float] = (-1.0, 1.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    orientation: str = "RAS"
    foreground_margin: int = 2

    def fingerprint(self) -> str:
        payload = json.dumps({"v": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


class VolumeError(ValueError):
    """A single file is unusable; the message says why."""


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI/Analyze volume (trailing singleton dimensions squeezed) and check its voxels."""
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files
        raise VolumeError(f"unreadable, truncated or corrupt image ({type(exc).__name__}: {exc})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"expected a 3D volume, got shape {tuple(image.shape)}")
    if min(data.shape) < 2:
        raise VolumeError(f"degenerate volume shape {data.shape}")
    bad = ~np.isfinite(data)
    if bad.any():
        raise VolumeError(f"{int(bad.sum())} NaN/Inf voxels")
    lo, hi = float(data.min()), float(data.max())
    if hi == lo:
        kind = "empty (all zeros)" if hi == 0 else f"constant (all voxels = {hi:g})"
        raise VolumeError(f"{kind} volume")
    return data, np.asarray(image.affine, dtype=np.float64)


def build_transform(cfg: PreprocessConfig) -> Compose:
    """MONAI preprocessing: orientation, foreground crop, aspect-preserving resize + pad, robust scaling."""
    from monai.transforms import Resize

    lo, hi = cfg.intensity_range
    return Compose(
        [
            Orientation(axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            CropForeground(select_fn=lambda x: x > 0, margin=cfg.foreground_margin, allow_smaller=True),
            Resize(
                spatial_size=max(cfg.image_size), size_mode="longest", mode="trilinear", anti_aliasing=True
            ),
            ResizeWithPadOrCrop(spatial_size=cfg.image_size, mode="constant"),
            ScaleIntensityRangePercentiles(
                lower=cfg.percentiles[0],
                upper=cfg.percentiles[1],
                b_min=lo,
                b_max=hi,
                clip=True,
                channel_wise=True,
            ),
        ]
    )


def preprocess_subject(subject: Subject, cfg: PreprocessConfig) -> np.ndarray:
    """Load every channel of a subject, validate it and return the preprocessed float32 ``[C, D, H, W]``."""
    return preprocess_with_geometry(subject, cfg)[0]


def preprocess_with_geometry(subject: Subject, cfg: PreprocessConfig) -> tuple[np.ndarray, dict]:
    """``preprocess_subject`` plus the preprocessed grid's geometry, kept for writing NIfTI files later.

    ``geometry``: ``affine`` (voxel -> mm of the preprocessed grid, as MONAI tracked it through
    orientation, crop and resize), ``spacing_mm``, ``axcodes`` and ``source_range`` (per channel, the
    intensities, after shifting the channel's minimum to 0, that were mapped onto ``cfg.intensity_range``).
    """
    from monai.transforms.utils_pytorch_numpy_unification import percentile

    channels, affine = [], None
    for path in subject.files:
        data, file_affine = load_volume(path)
        if channels and data.shape != channels[0].shape:
            raise VolumeError(
                f"shape {data.shape} differs from the subject's other channels {channels[0].shape}"
            )
        channels.append(data)
        affine = file_affine if affine is None else affine
    # Shift each channel so its minimum is 0: foreground cropping and zero padding then mean "background".
    stacked = np.stack([c - c.min() for c in channels])
    volume = MetaTensor(torch.from_numpy(stacked), affine=torch.as_tensor(affine))
    *spatial, scale = build_transform(cfg).transforms
    resized = Compose(spatial)(volume)
    source_range = [[float(percentile(c, p)) for p in cfg.percentiles] for c in resized]
    out = scale(resized)
    array = np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float32)
    if not np.isfinite(array).all():
        raise VolumeError("preprocessing produced NaN/Inf voxels")
    grid = np.asarray(resized.affine, dtype=np.float64)
    geometry = {
        "affine": grid.tolist(),
        "spacing_mm": np.linalg.norm(grid[:3, :3], axis=0).tolist(),
        "axcodes": "".join(nib.aff2axcodes(grid)),
        "source_range": source_range,
    }
    return array, geometry


def source_signature(subject: Subject) -> list[list[object]]:
    """Cheap identity of the source files: path, size and mtime (content changes invalidate the cache)."""
    sig = []
    for path in subject.files:
        stat = Path(path).stat()
        sig.append([str(Path(path).resolve()), stat.st_size, int(stat.st_mtime_ns)])
        companion = Path(path).with_suffix(".hdr")
        if Path(path).suffix == ".img" and companion.exists():
            cstat = companion.stat()
            sig.append([str(companion.resolve()), cstat.st_size, int(cstat.st_mtime_ns)])
    return sig


class VolumeCache:
    """Preprocessed volumes as ``<cache_root>/<dataset>-<fingerprint>/<subject>.npy`` plus a JSON sidecar."""

    def __init__(self, cache_root: str | Path, dataset: str, cfg: PreprocessConfig):
        self.cfg = cfg
        self.dir = Path(cache_root) / f"{dataset}-{cfg.fingerprint()}"

    def array_path(self, subject_id: str) -> Path:
        return self.dir / f"{subject_id}.npy"

    def _meta_path(self, subject_id: str) -> Path:
        return self.dir / f"{subject_id}.json"

    def is_fresh(self, subject: Subject) -> bool:
        meta_path = self._meta_path(subject.id)
        if not meta_path.is_file() or not self.array_path(subject.id).is_file():
            return False
        try:
            meta = json.loads(meta_path.read_text())
            return meta.get("source") == source_signature(subject)
        except (OSError, json.JSONDecodeError):
            return False

    def build(self, subject: Subject) -> DataProblem | None:
        """Preprocess one subject into the cache; return the problem instead of raising."""
        try:
            array, geometry = preprocess_with_geometry(subject, self.cfg)
        except VolumeError as exc:
            bad = _failing_file(subject, exc)
            return DataProblem(bad, str(exc))
        atomic_save_npy(self.array_path(subject.id), array)
        # The sidecar is written last: a subject is cached only once both files are complete.
        atomic_write_json(
            self._meta_path(subject.id),
            {
                "source": source_signature(subject),
                "shape": list(array.shape),
                "label": subject.label,
                "geometry": geometry,
            },
        )
        return None

    def ensure(
        self, subjects: Sequence[Subject], workers: int = 0, progress: bool = True
    ) -> list[DataProblem]:
        """Build every stale entry; return all problems (voxel checks only run for files not yet cached)."""
        todo = [s for s in subjects if not self.is_fresh(s)]
        if not todo:
            return []
        self.dir.mkdir(parents=True, exist_ok=True)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"preprocess {self.dir.name}", disable=not progress, leave=False)
        problems: list[DataProblem] = []
        if workers and workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                for problem in pool.map(self.build, todo):
                    problems += [problem] if problem else []
                    bar.update()
        else:
            for subject in todo:
                problem = self.build(subject)
                problems += [problem] if problem else []
                bar.update()
        bar.close()
        return problems

    def load(self, subject_id: str) -> np.ndarray:
        return np.load(self.array_path(subject_id))


def _failing_file(subject: Subject, exc: VolumeError) -> Path:
    """Name the file that failed: re-check each channel on its own (cheap, only on the error path)."""
    for path in subject.files:
        try:
            load_volume(path)
        except VolumeError:
            return path
    return subject.files[0]

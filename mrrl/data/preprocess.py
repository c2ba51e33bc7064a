"""Load, validate and preprocess one subject, and cache the result on disk.

Loading and voxel validation happen in the same pass (every file must be decoded once anyway); the
preprocessed array is cached as ``.npy`` keyed by the preprocessing settings and the source files' size
and mtime, so later epochs and later stages decode no NIfTI/Analyze file at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
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
from mrrl.data.validation import access_problem, geometry_problem, nonfinite_problem, read_error
from mrrl.utils.io import atomic_save_npy, atomic_write_json

CACHE_VERSION = 1
log = logging.getLogger(__name__)


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
    """A single file is unusable; the message says why (``path``: the file, when the caller cannot tell)."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI/Analyze volume (trailing singleton dimensions squeezed) and check its voxels."""
    problem = access_problem(Path(path))
    if problem:
        raise VolumeError(problem)
    try:
        image = nib.load(str(path))
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
            data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files
        raise VolumeError(read_error(exc)) from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"expected a 3D volume, got shape {tuple(image.shape)}")
    if min(data.shape) < 2:
        raise VolumeError(f"degenerate volume shape {data.shape}")
    problem = nonfinite_problem(image, data) or geometry_problem(image)
    if problem:
        raise VolumeError(problem)
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
                f"shape {data.shape} differs from {Path(subject.files[0]).name}'s shape {channels[0].shape}",
                path=path,
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
    """Preprocessed volumes as ``<cache_root>/<dataset>-<fingerprint>/<subject>.npy`` plus a JSON sidecar.

    The sidecar records the array's shape, dtype, file size and CRC32 at write. Every ``ensure`` checks
    size and ``.npy`` header (cheap); ``ensure(verify_checksums=True)`` (``check_data``) and the first
    :meth:`read` of an entry in a process also check the CRC32. A truncated, junk, replaced (e.g. all-NaN)
    or wrong-shape file is rebuilt from its source files and the rebuild is logged; ``rebuilt`` lists them.
    """

    def __init__(
        self,
        cache_root: str | Path,
        dataset: str,
        cfg: PreprocessConfig,
        source_root: str | Path | None = None,
    ):
        self.cfg = cfg
        # The source folder is part of the name: two cohorts with the same subject ids (e.g. phantoms with
        # another class_separation) must not share entries, least of all when prepared at the same time.
        where = (
            ""
            if source_root is None
            else "-" + hashlib.sha1(str(Path(source_root).resolve()).encode()).hexdigest()[:8]
        )
        self.dir = Path(cache_root) / f"{dataset}-{cfg.fingerprint()}{where}"
        self.rebuilt: list[tuple[Path, str]] = []
        self._verified: set[str] = set()

    def array_path(self, subject_id: str) -> Path:
        return self.dir / f"{subject_id}.npy"

    def _meta_path(self, subject_id: str) -> Path:
        return self.dir / f"{subject_id}.json"

    def inspect(self, subject: Subject, checksum: bool = False) -> tuple[str, str]:
        """``("fresh"|"stale"|"corrupt", reason)``: stale = not built or source changed; corrupt = damaged."""
        meta_path, array_path = self._meta_path(subject.id), self.array_path(subject.id)
        if not meta_path.is_file() or not array_path.is_file():
            return "stale", "not cached yet"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return "corrupt", "unreadable sidecar JSON"
        if not isinstance(meta, dict) or meta.get("source") != source_signature(subject):
            return "stale", "source files changed"
        if "crc32" not in meta:
            return "stale", "written by an older mrrl (no checksum)"
        reason = _npy_problem(array_path, meta, (len(subject.files), *self.cfg.image_size), checksum)
        return ("corrupt", reason) if reason else ("fresh", "")

    def is_fresh(self, subject: Subject) -> bool:
        return self.inspect(subject)[0] == "fresh"

    def build(self, subject: Subject) -> list[DataProblem]:
        """Preprocess one subject into the cache; return its problems instead of raising."""
        try:
            array, geometry = preprocess_with_geometry(subject, self.cfg)
        except VolumeError as exc:
            return _channel_problems(subject, exc)
        except Exception as exc:  # a transform failing on input the checks let through: still name it
            return [DataProblem(subject.files[0], f"preprocessing failed ({type(exc).__name__}: {exc})")]
        path = atomic_save_npy(self.array_path(subject.id), array)
        # The sidecar is written last: a subject is cached only once both files are complete.
        atomic_write_json(
            self._meta_path(subject.id),
            {
                "source": source_signature(subject),
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "bytes": path.stat().st_size,
                "crc32": zlib.crc32(path.read_bytes()),
                "label": subject.label,
                "geometry": geometry,
            },
        )
        return []

    def ensure(
        self,
        subjects: Sequence[Subject],
        workers: int = 0,
        progress: bool = True,
        verify_checksums: bool = False,
    ) -> list[DataProblem]:
        """Build every stale or corrupt entry; return all problems (voxel checks only for files not cached)."""
        states = {s.id: self.inspect(s, checksum=verify_checksums) for s in subjects}
        todo = [s for s in subjects if states[s.id][0] != "fresh"]
        if not todo:
            return []
        self.dir.mkdir(parents=True, exist_ok=True)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"preprocess {self.dir.name}", disable=not progress, leave=False)
        results: list[list[DataProblem]] = []
        if workers and workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                for result in pool.map(self.build, todo):
                    results.append(result)
                    bar.update()
        else:
            for subject in todo:
                results.append(self.build(subject))
                bar.update()
        bar.close()
        problems: list[DataProblem] = []
        for subject, result in zip(todo, results):
            problems += result
            state, reason = states[subject.id]
            if state == "corrupt" and not result:
                self.rebuilt.append((self.array_path(subject.id), reason))
        self._report_rebuilt()
        return problems

    def _report_rebuilt(self) -> None:
        if self.rebuilt:
            listed = ", ".join(f"{p.name} ({why})" for p, why in self.rebuilt)
            log.warning("rebuilt %d corrupt cache file(s) in %s: %s", len(self.rebuilt), self.dir, listed)

    def load(self, subject_id: str) -> np.ndarray:
        """The cached array as it is on disk (no check; :meth:`read` is what datasets use)."""
        return np.load(self.array_path(subject_id))

    def read(self, subject: Subject) -> np.ndarray:
        """The cached array, its CRC32 checked on this process's first read; rebuilt if it is damaged."""
        if subject.id in self._verified:
            return self.load(subject.id)
        state, reason = self.inspect(subject, checksum=True)
        if state != "fresh":
            problems = self.build(subject)
            if problems:
                from mrrl.data.layouts import DataValidationError

                raise DataValidationError(problems, dataset=f"cache {self.dir}")
            if state == "corrupt":
                self.rebuilt.append((self.array_path(subject.id), reason))
                log.warning("rebuilt corrupt cache file %s (%s)", self.array_path(subject.id), reason)
        self._verified.add(subject.id)
        return self.load(subject.id)


def _npy_problem(path: Path, meta: dict, expected_shape: tuple[int, ...], checksum: bool) -> str | None:
    """Why a cached ``.npy`` is not the one its sidecar describes (header, shape, dtype, size, CRC32)."""
    size, written = path.stat().st_size, meta.get("bytes")
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    except (OSError, ValueError) as exc:
        if isinstance(written, int) and size < written:
            return f"truncated: {size} of {written} bytes"
        return f"not a valid .npy file ({' '.join(str(exc).split())})"
    if list(shape) != list(expected_shape) or list(shape) != list(meta.get("shape") or []):
        return f"shape {tuple(shape)}, expected {tuple(expected_shape)}"
    if str(dtype) != meta.get("dtype") or dtype != np.float32:
        return f"dtype {dtype}, expected float32"
    if size != written:
        return f"{'truncated' if isinstance(written, int) and size < written else 'size changed'}: {size} of {written} bytes"
    if checksum and zlib.crc32(path.read_bytes()) != meta.get("crc32"):
        return "checksum mismatch (the file changed after it was written)"
    return None


def _channel_problems(subject: Subject, exc: VolumeError) -> list[DataProblem]:
    """Name the failing file(s): re-check each channel on its own (cheap, only on the error path)."""
    if exc.path is not None:
        return [DataProblem(exc.path, str(exc))]
    problems = []
    for path in subject.files:
        try:
            load_volume(path)
        except VolumeError as channel_exc:
            problems.append(DataProblem(path, str(channel_exc)))
    return problems or [DataProblem(subject.files[0], str(exc))]

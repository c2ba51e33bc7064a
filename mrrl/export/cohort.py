"""An exported synthetic cohort on disk: case ids, the dataset layouts it is written in, reading it back.

Layouts (the ones :mod:`mrrl.data.layouts` discovers, so every stage can train on the cohort):

- ``brats``: ``<root>/<class>/<case>/<case>_<modality>.nii.gz``, one file per modality;
- ``oasis``: ``<root>/disc1/OAS1_XXXX_MR1/PROCESSED/MPRAGE/T88_111/OAS1_XXXX_MR1_mpr_n4_anon_111_t88_masked_gfc.img``
  (a NIfTI-1 pair ``.img``/``.hdr``, which keeps the full affine, unlike plain Analyze) plus
  ``oasis_cross-sectional.csv`` labelling AD with CDR 1 and CN with CDR 0.

Beside the images: ``labels.csv`` (case, class, seed, seed_index, files) and ``provenance.json``.

Cases are made in blocks of ``batch_size`` per class, each block from its own seed (``block_seed``):
a case is item ``seed_index`` of the block sampled with ``seed``, whichever rank makes it, and whether
the export ran at once or was resumed. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from mrrl.data.layouts import OASIS_CLASSES, OASIS_CSV_COLUMNS, OASIS_CSV_NAME, oasis_image_path
from mrrl.errors import ConfigError
from mrrl.export.geometry import to_model_range
from mrrl.utils.io import atomic_path, atomic_write_text

LABELS_CSV = "labels.csv"
PROVENANCE_JSON = "provenance.json"
PLAN_JSON = ".export_plan.json"  # hidden: dataset discovery skips it
LAYOUTS = ("brats", "oasis")
OASIS_MAX_CASES = 9999  # OAS1_XXXX: four digits
DESCRIP = "SYNTHETIC (mrrl) - not for clinical diagnosis"


@dataclass(frozen=True)
class Case:
    id: str
    class_name: str
    seed: int
    seed_index: int


@dataclass(frozen=True)
class Block:
    """Cases of one class sampled together: ``generate_volumes(labels=[class] * len(cases), seed)``."""

    class_name: str
    class_index: int
    seed: int
    cases: tuple[Case, ...]


def block_seed(seed: int, class_name: str, block: int) -> int:
    """A stable 63-bit seed per (export seed, class, block)."""
    digest = hashlib.sha256(f"mrrl-export/{seed}/{class_name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def case_id(layout: str, class_name: str, class_index: int, index: int, n_per_class: int) -> str:
    if layout == "oasis":
        return f"OAS1_{class_index * n_per_class + index + 1:04d}_MR1"
    return f"mrrl_synth_{class_name}_{index:05d}"


def plan_blocks(
    layout: str, class_names: Sequence[str], n_per_class: int, batch_size: int, seed: int
) -> list[Block]:
    """Every block of the export in a fixed order (classes, then blocks): rank ``r`` makes blocks ``r::W``."""
    if layout not in LAYOUTS:
        raise ConfigError(f"data.format {layout!r} has no export layout; known: {list(LAYOUTS)}")
    if n_per_class < 1:
        raise ConfigError(f"stage.n_per_class must be >= 1, got {n_per_class}")
    if batch_size < 1:
        raise ConfigError(f"stage.sample_batch_size must be >= 1, got {batch_size}")
    if layout == "oasis":
        unknown = [c for c in class_names if c not in OASIS_CLASSES]
        if unknown:
            raise ConfigError(f"the OASIS layout labels AD/CN only (from the CDR), not {unknown}")
        if n_per_class * len(class_names) > OASIS_MAX_CASES:
            raise ConfigError(f"the OASIS layout numbers cases OAS1_0001..{OASIS_MAX_CASES}: export fewer")
    blocks = []
    for ci, c in enumerate(class_names):
        for b, start in enumerate(range(0, n_per_class, batch_size)):
            s = block_seed(seed, c, b)
            stop = min(start + batch_size, n_per_class)
            cases = tuple(
                Case(case_id(layout, c, ci, i, n_per_class), c, s, i - start) for i in range(start, stop)
            )
            blocks.append(Block(c, ci, s, cases))
    return blocks


def case_files(layout: str, root: Path, case: Case, modalities: Sequence[str]) -> list[Path]:
    """The image files of a case (for ``oasis`` the ``.img``; its ``.hdr`` lies beside it)."""
    if layout == "oasis":
        return [oasis_image_path(root, case.id.removesuffix("_MR1"), disc=1, n_variant="n4")]
    return [root / case.class_name / case.id / f"{case.id}_{m}.nii.gz" for m in modalities]


def is_written(layout: str, root: Path, case: Case, modalities: Sequence[str]) -> bool:
    files = case_files(layout, root, case, modalities)
    if layout == "oasis":
        files = [*files, files[0].with_suffix(".hdr")]
    return all(f.is_file() for f in files)


def _image(array: np.ndarray, affine: np.ndarray, cls=nib.Nifti1Image):
    image = cls(np.ascontiguousarray(array, dtype=np.float32), affine)
    header = image.header
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units(xyz="mm")
    header.set_data_dtype(np.float32)
    header["cal_min"], header["cal_max"] = float(array.min()), float(array.max())
    header["descrip"] = DESCRIP.encode()
    return image


def _save_pair(image, path: Path) -> None:
    """A NIfTI-1 pair, both files renamed into place, ``.img`` last (its presence means the pair is whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.img")
    try:
        nib.save(image, str(tmp))
        os.replace(tmp.with_suffix(".hdr"), path.with_suffix(".hdr"))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_suffix(".hdr")):
            leftover.unlink(missing_ok=True)


def write_case(
    layout: str, root: Path, case: Case, volume: np.ndarray, affine: np.ndarray, modalities: Sequence[str]
) -> list[Path]:
    """Write one case's ``[C, D, H, W]`` volume (already in the output intensity range)."""
    files = case_files(layout, root, case, modalities)
    if layout == "oasis":
        _save_pair(_image(volume[0], affine, nib.Nifti1Pair), files[0])
        return files
    for channel, path in zip(volume, files, strict=True):
        with atomic_path(path, suffix=".nii.gz") as tmp:  # nibabel picks gzip from the suffix
            nib.save(_image(channel, affine), str(tmp))
    return files


def write_labels(root: Path, rows: Sequence[Mapping[str, object]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "class", "seed", "seed_index", "files"])
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(root / LABELS_CSV, buffer.getvalue())


def write_oasis_labels(root: Path, cases: Sequence[Case], cdr_threshold: float) -> Path:
    """The cross-sectional CSV the OASIS loader labels from: AD with CDR >= threshold, CN with CDR 0."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(OASIS_CSV_COLUMNS))
    writer.writeheader()
    for case in cases:
        cdr = max(1.0, float(cdr_threshold)) if case.class_name == "AD" else 0.0
        writer.writerow({k: "" for k in OASIS_CSV_COLUMNS} | {"ID": case.id, "CDR": cdr})
    return atomic_write_text(root / OASIS_CSV_NAME, buffer.getvalue())


def read_labels(root: Path) -> list[dict[str, str]]:
    with (Path(root) / LABELS_CSV).open(newline="") as handle:
        return list(csv.DictReader(handle))


def is_cohort(path: str | Path) -> bool:
    return (Path(path) / LABELS_CSV).is_file() and (Path(path) / PROVENANCE_JSON).is_file()


def read_case(root: Path, row: Mapping[str, str]) -> np.ndarray:
    """One case as written, ``[C, D, H, W]`` float32."""
    files = [Path(root) / f for f in str(row["files"]).split(";")]
    return np.stack([np.asarray(nib.load(str(f)).dataobj, dtype=np.float32) for f in files])


def load_cohort_volumes(root: str | Path, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """An exported cohort's volumes per class ``[N, C, D, H, W]`` in the model range (for ``classify`` /
    ``evaluate`` extra generators)."""
    root = Path(root)
    provenance = json.loads((root / PROVENANCE_JSON).read_text())
    rows = read_labels(root)
    absent = [c for c in class_names if not any(r["class"] == c for r in rows)]
    if absent:
        raise ConfigError(f"exported cohort {root} has no cases of class(es) {absent}")
    intensity = provenance["intensity"]
    out = {}
    for c in class_names:
        cases = [read_case(root, r) for r in rows if r["class"] == c]
        volumes = [
            to_model_range(
                v, intensity["mode"], intensity["model_range"], np.asarray(intensity["source_range"])
            )
            for v in cases
        ]
        out[c] = np.stack(volumes)
    return out

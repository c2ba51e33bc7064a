"""On-disk dataset layouts: discovery of subjects (BraTS 2019, OASIS-1) and writers for the same layouts.

Discovery only looks at names and the OASIS CSV; voxel checks happen in :mod:`mrrl.data.validation`.
Every problem found is collected (one line per problem, naming the file) instead of stopping at the first,
so a user fixes a dataset in one pass. The writers produce the exact official layouts; the phantom cohorts
and the tests use them, so the demo runs through the same discovery code as real data.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from mrrl.errors import MrrlError

BRATS_CLASSES = ("HGG", "LGG")
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
OASIS_CLASSES = ("AD", "CN")
OASIS_CSV_NAME = "oasis_cross-sectional.csv"
OASIS_CSV_COLUMNS = ("ID", "M/F", "Hand", "Age", "Educ", "SES", "MMSE", "CDR", "eTIV", "nWBV", "ASF", "Delay")
_OASIS_IMAGE_RE = re.compile(r"^(OAS1_\d{4}_MR1)_mpr_n\d+_anon_111_t88_masked_gfc\.img$")
_OASIS_SESSION_RE = re.compile(r"^OAS1_\d{4}_MR(\d+)$")


@dataclass(frozen=True)
class Subject:
    """One subject: an id unique in the dataset, its class name and one image file per channel."""

    id: str
    label: str
    files: tuple[Path, ...]
    meta: Mapping[str, object] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class DataProblem:
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DataValidationError(MrrlError, ValueError):
    """Raised before any training when the dataset is unusable; one line per problem, naming the file."""

    def __init__(self, problems: Sequence[DataProblem], dataset: str = "dataset"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{dataset}: {len(self.problems)} problem(s) found:\n{lines}")


def _nifti_file(case_dir: Path, stem: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        candidate = case_dir / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _check_root(root: Path, dataset: str) -> list[DataProblem]:
    if not root.exists():
        return [DataProblem(root, f"{dataset} root does not exist (set data.root=<dir>)")]
    if not root.is_dir():
        return [DataProblem(root, f"{dataset} root is not a directory")]
    if not any(root.iterdir()):
        return [DataProblem(root, f"{dataset} root is empty")]
    return []


def discover_brats(
    root: str | Path, modalities: Sequence[str] = ("flair",), classes: Sequence[str] = BRATS_CLASSES
) -> tuple[list[Subject], list[DataProblem]]:
    """Find BraTS 2019 training cases: ``<root>/HGG|LGG/<case>/<case>_<modality>.nii[.gz]``."""
    root = Path(root)
    problems = _check_root(root, "BraTS 2019")
    if problems:
        return [], problems
    unknown = [m for m in modalities if m not in BRATS_MODALITIES]
    if unknown:
        return [], [DataProblem(root, f"unknown modality {unknown}; choose from {list(BRATS_MODALITIES)}")]
    subjects: list[Subject] = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue  # name_mapping.csv, survival_data.csv and hidden files are not cases
        if entry.name not in classes:
            problems.append(
                DataProblem(
                    entry, f"case folder outside {'/'.join(classes)} (expected <root>/<class>/<case>/)"
                )
            )
            continue
        for case_dir in sorted(p for p in entry.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = []
            for modality in modalities:
                path = _nifti_file(case_dir, f"{case_dir.name}_{modality}")
                if path is None:
                    problems.append(
                        DataProblem(
                            case_dir, f"missing modality '{modality}' ({case_dir.name}_{modality}.nii.gz)"
                        )
                    )
                files.append(path)
            if all(f is not None for f in files):
                seg = _nifti_file(case_dir, f"{case_dir.name}_seg")
                meta = {"seg": str(seg)} if seg else {}
                subjects.append(Subject(case_dir.name, entry.name, tuple(files), meta))
    present = {s.label for s in subjects}
    if not subjects and not problems:
        problems.append(DataProblem(root, f"no cases found under {'/'.join(classes)}"))
    elif subjects:
        problems += [DataProblem(root / c, f"class {c} has no cases") for c in classes if c not in present]
    return subjects, problems


def oasis_label(cdr: float | None, cdr_threshold: float = 0.5, missing_cdr_as_cn: bool = False) -> str | None:
    """OASIS-1 labelling rule: AD when CDR >= threshold, CN when CDR == 0, otherwise left out.

    Subjects without a CDR (mostly the young controls) are left out unless ``missing_cdr_as_cn``
    (the Clinica convention) maps them to CN.
    """
    if cdr is None or (isinstance(cdr, float) and math.isnan(cdr)):
        return "CN" if missing_cdr_as_cn else None
    if cdr >= cdr_threshold:
        return "AD"
    if cdr == 0:
        return "CN"
    return None


def _read_oasis_csv(csv_path: Path) -> tuple[dict[str, dict[str, str]], list[DataProblem]]:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "ID" not in reader.fieldnames or "CDR" not in reader.fieldnames:
                return {}, [
                    DataProblem(csv_path, f"CSV needs columns 'ID' and 'CDR', found {reader.fieldnames}")
                ]
            rows = {row["ID"].strip(): row for row in reader if row.get("ID")}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return {}, [DataProblem(csv_path, f"cannot read CSV: {exc}")]
    return rows, []


def _parse_cdr(value: str | None) -> float | None:
    if value is None or not str(value).strip():
        return None
    try:
        return float(value)
    except ValueError:
        return float("nan")


def discover_oasis(
    root: str | Path,
    csv_path: str | Path | None = None,
    cdr_threshold: float = 0.5,
    missing_cdr_as_cn: bool = False,
    require_all_csv_images: bool = False,
) -> tuple[list[Subject], list[DataProblem]]:
    """Find OASIS-1 cross-sectional MR1 sessions and label them from ``oasis_cross-sectional.csv``.

    Images: ``<root>/disc*/OAS1_XXXX_MR1/PROCESSED/MPRAGE/T88_111/OAS1_XXXX_MR1_mpr_n*_anon_111_t88_masked_gfc.img``.
    A labelled CSV row without an image is a problem only with ``require_all_csv_images`` (users often
    download a subset of the discs).
    """
    root = Path(root)
    problems = _check_root(root, "OASIS-1")
    if problems:
        return [], problems
    csv_path = Path(csv_path) if csv_path else root / OASIS_CSV_NAME
    if not csv_path.is_file():
        return [], [DataProblem(csv_path, "OASIS-1 CSV not found (set data.csv_path=<file>)")]
    rows, problems = _read_oasis_csv(csv_path)
    if problems:
        return [], problems

    images: dict[str, Path] = {}
    for disc in sorted(p for p in root.glob("disc*") if p.is_dir()):
        for session in sorted(p for p in disc.iterdir() if p.is_dir()):
            match = _OASIS_SESSION_RE.match(session.name)
            if not match or match.group(1) != "1":
                continue  # MR2 = reliability rescans; the paper uses MR1 sessions only
            t88 = session / "PROCESSED" / "MPRAGE" / "T88_111"
            found = sorted(p for p in t88.glob("*.img") if _OASIS_IMAGE_RE.match(p.name))
            if not found:
                problems.append(DataProblem(t88, "no *_t88_masked_gfc.img image for this session"))
            elif len(found) > 1:
                problems.append(DataProblem(t88, f"several masked_gfc images: {[p.name for p in found]}"))
            elif not found[0].with_suffix(".hdr").is_file():
                problems.append(DataProblem(found[0], "Analyze header (.hdr) missing beside the .img"))
            else:
                images[session.name] = found[0]
    if not images and not problems:
        problems.append(DataProblem(root, "no OASIS-1 MR1 sessions found under disc*/"))

    subjects = []
    for session_id, path in sorted(images.items()):
        row = rows.get(session_id)
        if row is None:
            problems.append(DataProblem(path, f"CSV row missing for {session_id} in {csv_path.name}"))
            continue
        cdr = _parse_cdr(row.get("CDR"))
        if cdr is not None and math.isnan(cdr):
            problems.append(
                DataProblem(csv_path, f"{session_id}: CDR value {row.get('CDR')!r} is not a number")
            )
            continue
        label = oasis_label(cdr, cdr_threshold, missing_cdr_as_cn)
        if label is not None:
            subjects.append(Subject(session_id, label, (path,), {"cdr": cdr}))
    if require_all_csv_images:
        for session_id, row in sorted(rows.items()):
            cdr = _parse_cdr(row.get("CDR"))
            labelled = cdr is not None and not math.isnan(cdr) and oasis_label(cdr, cdr_threshold) is not None
            if session_id.endswith("_MR1") and labelled and session_id not in images:
                problems.append(
                    DataProblem(csv_path, f"subject {session_id} has a CDR but no image under disc*/")
                )
    present = {s.label for s in subjects}
    if subjects:
        problems += [
            DataProblem(csv_path, f"class {c} has no subjects") for c in OASIS_CLASSES if c not in present
        ]
    return subjects, problems


# --------------------------------------------------------------------------------------------- writers


def write_brats_case(
    root: str | Path,
    grade: str,
    case_id: str,
    volumes: Mapping[str, np.ndarray],
    affine: np.ndarray | None = None,
    ext: str = ".nii.gz",
) -> Path:
    """Write one case as ``<root>/<grade>/<case>/<case>_<key>.nii.gz`` (keys: t1, t1ce, t2, flair, seg)."""
    case_dir = Path(root) / grade / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    for key, array in volumes.items():
        dtype = np.uint8 if key == "seg" else np.float32
        image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
        nib.save(image, case_dir / f"{case_id}_{key}{ext}")
    return case_dir


def oasis_image_path(root: str | Path, subject: str, disc: int = 1, n_variant: str = "n4") -> Path:
    session = f"{subject}_MR1"
    name = f"{session}_mpr_{n_variant}_anon_111_t88_masked_gfc.img"
    return Path(root) / f"disc{disc}" / session / "PROCESSED" / "MPRAGE" / "T88_111" / name


def write_oasis_subject(
    root: str | Path,
    subject: str,
    volume: np.ndarray,
    affine: np.ndarray | None = None,
    disc: int = 1,
    n_variant: str = "n4",
) -> Path:
    """Write an Analyze .img/.hdr pair with the trailing singleton dimension the real OASIS files carry."""
    path = oasis_image_path(root, subject, disc, n_variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(volume, dtype=np.float32)
    if data.ndim == 3:
        data = data[..., None]
    nib.save(nib.AnalyzeImage(data, np.eye(4) if affine is None else affine), path)
    return path


def write_oasis_csv(
    root: str | Path, rows: Iterable[Mapping[str, object]], name: str = OASIS_CSV_NAME
) -> Path:
    """Write the cross-sectional CSV with the official columns (missing values left empty)."""
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(OASIS_CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in OASIS_CSV_COLUMNS})
    return path

"""On-disk dataset layouts: discovery of subjects (BraTS 2019, OASIS-1) and writers for the same layouts.

Discovery only looks at names, permissions and the OASIS CSV; voxel checks happen when a file is decoded
(:func:`mrrl.data.preprocess.load_volume`, with the checks of :mod:`mrrl.data.validation`).
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

from mrrl.data.validation import access_problem
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
        return f"{self.path}: {' '.join(self.message.split())}"  # one line, whatever a decoder said


class DataValidationError(MrrlError, ValueError):
    """Raised before any training when the dataset is unusable; one line per problem, naming the file."""

    def __init__(self, problems: Sequence[DataProblem] | str, dataset: str = "dataset"):
        if isinstance(problems, str):  # re-raised from a DataLoader worker with its message only
            super().__init__(problems)
            self.problems = []
            return
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{dataset}: {len(self.problems)} problem(s) found:\n{lines}")


def _listdir(folder: Path) -> tuple[list[Path], DataProblem | None]:
    """A folder's entries, sorted; a folder that cannot be listed is a problem, not a traceback."""
    try:
        return sorted(folder.iterdir()), None
    except PermissionError:
        return [], DataProblem(folder, "cannot read this folder: permission denied (chmod u+rx on it)")
    except OSError as exc:
        return [], DataProblem(folder, f"cannot read this folder ({exc.strerror or exc})")


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. a permission error on stat: reported when the folder is listed
        return False


def _find_modality(case_dir: Path, names: set[str], modality: str) -> tuple[Path | None, DataProblem | None]:
    """``<case>_<modality>.nii.gz`` (or ``.nii``) in a listed case folder, or the problem with it."""
    stem = f"{case_dir.name}_{modality}"
    for ext in (".nii.gz", ".nii"):
        if stem + ext in names:
            path = case_dir / (stem + ext)
            problem = access_problem(path)
            return (None, DataProblem(path, problem)) if problem else (path, None)
    elsewhere = sorted(n for n in names if re.fullmatch(rf".+_{re.escape(modality)}\.nii(\.gz)?", n))
    hint = (
        f"; found {elsewhere[0]}: files must be named after their case folder ({stem}.nii.gz)"
        if elsewhere
        else ""
    )
    return None, DataProblem(case_dir, f"missing modality '{modality}' ({stem}.nii.gz){hint}")


def _check_root(root: Path, dataset: str) -> list[DataProblem]:
    if not root.exists():
        return [DataProblem(root, f"{dataset} root does not exist (set data.root=<dir>)")]
    if not root.is_dir():
        return [DataProblem(root, f"{dataset} root is not a directory")]
    entries, problem = _listdir(root)
    if problem:
        return [problem]
    if not entries:
        return [DataProblem(root, f"{dataset} root is empty")]
    return []


def discover_brats(
    root: str | Path,
    modalities: Sequence[str] = ("flair",),
    classes: Sequence[str] = BRATS_CLASSES,
    incomplete: list[Subject] | None = None,
) -> tuple[list[Subject], list[DataProblem]]:
    """Find BraTS 2019 training cases: ``<root>/HGG|LGG/<case>/<case>_<modality>.nii[.gz]``.

    Cases missing a modality are problems; their files that are present are appended to ``incomplete``
    (when given), so the caller can still check those files' voxels in the same pass.
    """
    root = Path(root)
    problems = _check_root(root, "BraTS 2019")
    if problems:
        return [], problems
    unknown = [m for m in modalities if m not in BRATS_MODALITIES]
    if unknown:
        return [], [DataProblem(root, f"unknown modality {unknown}; choose from {list(BRATS_MODALITIES)}")]
    subjects: list[Subject] = []
    entries, problem = _listdir(root)
    problems += [problem] if problem else []
    for entry in entries:
        if not _is_dir(entry) or entry.name.startswith("."):
            continue  # name_mapping.csv, survival_data.csv and hidden files are not cases
        if entry.name not in classes:
            problems.append(
                DataProblem(
                    entry, f"case folder outside {'/'.join(classes)} (expected <root>/<class>/<case>/)"
                )
            )
            continue
        case_dirs, problem = _listdir(entry)
        problems += [problem] if problem else []
        for case_dir in (p for p in case_dirs if _is_dir(p) and not p.name.startswith(".")):
            listing, problem = _listdir(case_dir)
            if problem:
                problems.append(problem)
                continue
            names = {p.name for p in listing}
            found = [_find_modality(case_dir, names, modality) for modality in modalities]
            problems += [problem for _, problem in found if problem]
            files = tuple(path for path, _ in found if path is not None)
            if len(files) < len(modalities):
                if incomplete is not None and files:
                    incomplete.append(Subject(case_dir.name, entry.name, files))
                continue
            seg, _ = _find_modality(case_dir, names, "seg")
            meta = {"seg": str(seg)} if seg else {}
            subjects.append(Subject(case_dir.name, entry.name, files, meta))
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


def _read_oasis_csv(csv_path: Path) -> tuple[dict[str, dict[str, str] | None], list[DataProblem]]:
    """Rows by ID; an ID on several rows maps to ``None`` (refused: which row is right is the user's call)."""
    lines: dict[str, list[tuple[int, dict[str, str]]]] = {}
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "ID" not in reader.fieldnames or "CDR" not in reader.fieldnames:
                return {}, [
                    DataProblem(csv_path, f"CSV needs columns 'ID' and 'CDR', found {reader.fieldnames}")
                ]
            for row in reader:
                if row.get("ID"):
                    lines.setdefault(row["ID"].strip(), []).append((reader.line_num, row))
    except PermissionError:
        return {}, [DataProblem(csv_path, "cannot read the CSV: permission denied (chmod u+r)")]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return {}, [DataProblem(csv_path, f"cannot read CSV: {exc}")]
    rows: dict[str, dict[str, str] | None] = {}
    problems = []
    for subject_id, found in lines.items():
        if len(found) == 1:
            rows[subject_id] = found[0][1]
            continue
        rows[subject_id] = None
        times = "twice" if len(found) == 2 else f"{len(found)} times"
        numbers = ", ".join(str(n) for n, _ in found[:-1]) + f" and {found[-1][0]}"
        cdrs = " vs ".join((row.get("CDR") or "").strip() or "empty" for _, row in found)
        problems.append(
            DataProblem(
                csv_path,
                f"{subject_id} appears {times} in {csv_path.name} (lines {numbers}, CDR {cdrs}): "
                "keep one row per subject",
            )
        )
    return rows, problems


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
    left_out: list[tuple[str, str]] | None = None,
) -> tuple[list[Subject], list[DataProblem]]:
    """Find OASIS-1 cross-sectional MR1 sessions and label them from ``oasis_cross-sectional.csv``.

    Sessions with an image that the labelling rule leaves out are appended to ``left_out`` (when given)
    as ``(session id, reason)``.

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
    if not rows:
        return [], problems

    images: dict[str, Path] = {}
    for disc in (p for p in _listdir(root)[0] if p.name.startswith("disc") and _is_dir(p)):
        sessions, problem = _listdir(disc)
        problems += [problem] if problem else []
        for session in (p for p in sessions if _is_dir(p)):
            match = _OASIS_SESSION_RE.match(session.name)
            if not match or match.group(1) != "1":
                continue  # MR2 = reliability rescans; the paper uses MR1 sessions only
            t88 = session / "PROCESSED" / "MPRAGE" / "T88_111"
            listing, problem = _listdir(t88) if _is_dir(t88) else ([], None)
            if problem:
                problems.append(problem)
                continue
            found = [p for p in listing if _OASIS_IMAGE_RE.match(p.name)]
            hdr = found[0].with_suffix(".hdr") if len(found) == 1 else None
            if not found:
                problems.append(DataProblem(t88, "no *_t88_masked_gfc.img image for this session"))
            elif len(found) > 1:
                problems.append(DataProblem(t88, f"several masked_gfc images: {[p.name for p in found]}"))
            elif access_problem(found[0]):
                problems.append(DataProblem(found[0], access_problem(found[0]) or ""))
            elif hdr not in listing:
                problems.append(DataProblem(found[0], "Analyze header (.hdr) missing beside the .img"))
            elif access_problem(hdr):
                problems.append(DataProblem(hdr, access_problem(hdr) or ""))
            else:
                images[session.name] = found[0]
    if not images and not problems:
        problems.append(DataProblem(root, "no OASIS-1 MR1 sessions found under disc*/"))

    subjects = []
    for session_id, path in sorted(images.items()):
        if session_id not in rows:
            problems.append(DataProblem(path, f"CSV row missing for {session_id} in {csv_path.name}"))
            continue
        row = rows[session_id]
        if row is None:
            continue  # an ID on several CSV rows: already a problem
        cdr = _parse_cdr(row.get("CDR"))
        if cdr is not None and math.isnan(cdr):
            problems.append(
                DataProblem(csv_path, f"{session_id}: CDR value {row.get('CDR')!r} is not a number")
            )
            continue
        label = oasis_label(cdr, cdr_threshold, missing_cdr_as_cn)
        if label is not None:
            subjects.append(Subject(session_id, label, (path,), {"cdr": cdr}))
        elif left_out is not None:
            reason = "no CDR" if cdr is None else f"0 < CDR < data.cdr_threshold={cdr_threshold:g}"
            left_out.append((session_id, reason))
    if require_all_csv_images:
        for session_id, row in sorted((k, v) for k, v in rows.items() if v is not None):
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

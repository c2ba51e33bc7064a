"""Checks of one image file, each returning a one-line reason (or ``None``) that names no path itself.

Discovery (:mod:`mrrl.data.layouts`) uses :func:`access_problem` on file names before anything is
decoded; :func:`mrrl.data.preprocess.load_volume` uses the others on the decoded image. The caller puts
the path in front of the reason (:class:`mrrl.data.layouts.DataProblem`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)


def access_problem(path: Path) -> str | None:
    """A dangling symlink, or a file this process may not read (permission), before decoding it."""
    try:
        if path.is_symlink() and not path.exists():
            return f"broken symlink: it points to {os.readlink(path)}, which does not exist"
        if not os.access(path, os.R_OK):
            return "cannot read the file: permission denied (give read permission: chmod u+r)"
    except PermissionError:
        return "cannot read the file: permission denied on its folder (chmod u+rx on the folder)"
    return None


def read_error(exc: BaseException) -> str:
    """The reason a decoder failed, saying "permission" when that is what it was."""
    if isinstance(exc, PermissionError):
        return "cannot read the file: permission denied (give read permission: chmod u+r)"
    if isinstance(exc, FileNotFoundError):
        return f"file not found ({exc.strerror}); a broken symlink or a file removed during the check"
    return f"unreadable, truncated or corrupt image ({type(exc).__name__}: {exc})"


def _affine_source(header) -> str:
    """Which header field nibabel took the affine from (NIfTI: sform before qform; Analyze: pixdim)."""
    try:
        if int(header["sform_code"]) > 0:
            return "sform"
        if int(header["qform_code"]) > 0:
            return "qform"
    except (KeyError, ValueError, TypeError):
        pass
    return "pixdim (voxel sizes)"


def geometry_problem(image) -> str | None:
    """A voxel-to-world affine that holds NaN/Inf or is singular: orientation and resampling need it."""
    affine = np.asarray(image.affine, dtype=np.float64)
    source = _affine_source(image.header)
    if not np.isfinite(affine).all():
        return (
            f"invalid geometry: the affine from the {source} holds NaN/Inf; "
            "fix the header (e.g. nibabel set_sform/set_qform) — volume refused"
        )
    scales = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if scales.min() <= 1e-6 * max(scales.max(), 1e-12):
        return (
            f"invalid geometry: the affine from the {source} is singular (a voxel size is 0); "
            "fix the header (e.g. nibabel set_sform/set_qform) — volume refused"
        )
    return None


def nonfinite_problem(image, as_float32: np.ndarray) -> str | None:
    """NaN/Inf voxels, told apart from finite values too large for float32 (e.g. 1e300 in float64)."""
    bad = ~np.isfinite(as_float32)
    if not bad.any():
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        wide = np.asarray(image.dataobj, dtype=np.float64)
    overflow = bad & np.isfinite(wide)
    if overflow.any():
        peak = float(np.abs(wide[overflow]).max())
        return (
            f"{int(overflow.sum())} voxel(s) with finite values up to {peak:.3g} overflow float32 "
            f"(largest {FLOAT32_MAX:.3g}): rescale the image"
        )
    return f"{int(bad.sum())} NaN/Inf voxels"

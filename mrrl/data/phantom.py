"""Deterministic synthetic two-class brain-MRI cohorts made from a real template.

Every subject is the MNI ICBM152 2009a template (T1 plus grey/white-matter probability maps, shipped
inside nilearn's wheel, so nothing is downloaded) under a random smooth deformation and a small affine,
with a class-dependent pathology, a smooth bias field, Rician noise and intensity jitter:

* ``tumor`` (HGG / LGG), written in the BraTS 2019 layout with t1, t1ce, t2, flair and a seg;
* ``atrophy`` (AD / CN), written in the OASIS-1 cross-sectional layout (Analyze T1 + the CSV).

The classes differ in pathology size and severity, but the distributions overlap on purpose so the
task is learnable without being trivial. All randomness derives from (seed, kind, class, index), so a
cohort is bit-for-bit reproducible and independent of the number of worker processes.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import logging
import math
import multiprocessing as mp
import re
import shutil
import sys
import uuid
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from tqdm import tqdm

from mrrl.data.layouts import (
    BRATS_CLASSES,
    BRATS_MODALITIES,
    OASIS_CLASSES,
    OASIS_CSV_COLUMNS,
    OASIS_CSV_NAME,
)

log = logging.getLogger(__name__)
PHANTOM_VERSION = 1
PHANTOM_CLASSES = {"tumor": BRATS_CLASSES, "atrophy": OASIS_CLASSES}  # the layouts they are written in
MARKER_NAME = ".phantom_complete.json"
OASIS_SUBJECTS_PER_DISC = 40
INTENSITY_UNIT = 1000.0  # images are stored as int16; template white matter on T1 is ~870

_KIND_CODES = {"tumor": 1, "atrophy": 2}
_TEMPLATE_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_MARGIN_MM = 10.0
# Centroid of the two lateral ventricles (CSF > 0.7 components) of the 2009a template, in MNI mm.
_VENTRICLE_CENTER_MM = (0.0, -13.6, 15.2)
_VENTRICLE_SIGMA_MM = (20.0, 30.0, 16.0)
_HIPPOCAMPUS_CENTERS_MM = ((-28.0, -22.0, -14.0), (28.0, -22.0, -14.0))
# Relative (csf, gm, wm) intensities of the contrasts that are not the template's own T1.
_TISSUE_CONTRAST = {"t2": (1.0, 0.62, 0.45), "flair": (0.12, 0.62, 0.48)}
_ETIV_ML = 1480.0  # eTIV of a subject with head_scale 1 (OASIS-1 mean)
_NWBV_FACTOR = 0.9  # brain-mask volume -> intracranial volume (the mask leaves out most exterior CSF)
_ENTRY_RE = re.compile(r"^(HGG|LGG|disc\d+|oasis_cross-sectional\.csv|\.phantom_complete\.json)$")


# ------------------------------------------------------------------------------------------ template
@dataclass(frozen=True, eq=False)
class Template:
    """The template on a ``resolution_mm`` grid cropped to the brain plus a margin (arrays read-only).

    ``t1, gm, wm, csf, brain_mask`` are float32 in [0, 1]; ``affine`` maps voxels to MNI mm.
    ``depth_mm`` (distance to the brain surface) places tumours; ``atrophy_weight`` says where AD-like
    grey-matter loss is strongest (next to sulcal CSF and in the medial temporal lobes).
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    resolution_mm: float
    depth_mm: np.ndarray
    atrophy_weight: np.ndarray
    t1_means: dict[str, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.t1.shape

    def world_axes(self) -> list[np.ndarray]:
        """MNI mm coordinate of the voxel centres along each axis (the affine is diagonal)."""
        return [self.affine[i, 3] + self.resolution_mm * np.arange(n) for i, n in enumerate(self.shape)]


def template_dir() -> Path:
    """nilearn's bundled data folder, found without importing nilearn (its import is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "phantom cohorts are made from the MNI ICBM152 template that ships with nilearn: pip install nilearn"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [str(data / _TEMPLATE_FILE.format(k)) for k in ("t1", "gm", "wm")]
    missing = [p for p in missing if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MNI ICBM152 2009a template files missing from the nilearn install: {', '.join(missing)}; "
            "reinstall nilearn (>= 0.10)"
        )
    return data


def _load_full_resolution() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The three template volumes as stored (uint8) and their affine."""
    data = template_dir()
    vols, affine = {}, None
    for key in ("t1", "gm", "wm"):
        image = nib.load(data / _TEMPLATE_FILE.format(key))
        vols[key] = np.asarray(image.dataobj)
        affine = image.affine
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(np.diag(affine)[:3] <= 0):
        raise ValueError(f"unexpected template orientation (need a positive diagonal affine):\n{affine}")
    return vols, affine


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = [], []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(hit[0])
        hi.append(hit[-1])
    return np.array(lo, float), np.array(hi, float)


def _resample(raw: dict[str, np.ndarray], affine: np.ndarray, res: float):
    """Tissue maps, anti-aliased (Gaussian, FWHM-matched) and linearly resampled onto a ``res`` grid.

    The grid covers the brain plus a margin; the work is done on a crop of the 1 mm volumes.
    """
    zooms, origin = np.diag(affine)[:3], affine[:3, 3]
    lo, hi = _bbox(raw["t1"] > 0)  # the template T1 is skull-stripped (one component, no holes)
    margin, step = _MARGIN_MM / zooms, res / zooms
    sigma = np.sqrt(np.maximum(res**2 - zooms**2, 0.0)) / 2.3548 / zooms
    pad = margin + np.ceil(4 * sigma) + 1
    crop = tuple(
        slice(int(max(a - p, 0)), int(min(b + p + 1, n))) for a, b, p, n in zip(lo, hi, pad, raw["t1"].shape)
    )
    vols = {k: v[crop].astype(np.float32) / np.float32(255.0) for k, v in raw.items()}
    mask = (vols["t1"] > 0).astype(np.float32)
    vols["gm"] *= mask
    vols["wm"] *= mask
    vols["csf"] = np.clip(mask - vols["gm"] - vols["wm"], 0.0, 1.0)
    vols["brain_mask"] = mask
    start = lo - margin - np.array([c.start for c in crop])
    shape = tuple(int(n) for n in np.floor((hi - lo + 2 * margin) / step) + 1)
    out = {}
    for key, vol in vols.items():
        smooth = ndi.gaussian_filter(vol, sigma) if np.any(sigma > 0) else vol
        sampled = ndi.affine_transform(smooth, step, offset=start, output_shape=shape, order=1, cval=0.0)
        out[key] = np.clip(sampled, 0.0, 1.0).astype(np.float32)
    new_affine = np.diag([res, res, res, 1.0])
    new_affine[:3, 3] = origin + zooms * (lo - margin)
    return out, new_affine


def _atrophy_weight(vols: dict[str, np.ndarray], axes: list[np.ndarray], res: float) -> np.ndarray:
    inside = vols["brain_mask"] > 0.5
    sulcal = ndi.gaussian_filter(vols["csf"], 2.0 / res)
    sulcal /= max(float(np.percentile(sulcal[inside], 99)), 1e-6)
    mtl = np.zeros_like(sulcal)
    for centre in _HIPPOCAMPUS_CENTERS_MM:
        d2 = sum(
            (a - c).reshape([-1 if i == k else 1 for k in range(3)]) ** 2
            for i, (a, c) in enumerate(zip(axes, centre))
        )
        mtl = np.maximum(mtl, np.exp(-d2 / (2 * 12.0**2)))
    return np.clip(0.25 + 0.75 * sulcal + 0.75 * mtl, 0.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=4)
def load_template(resolution_mm: float = 2.0) -> Template:
    """The MNI ICBM152 2009a template resampled to ``resolution_mm`` (cached per resolution)."""
    res = float(resolution_mm)
    if not 0.5 <= res <= 16.0:
        raise ValueError(f"resolution_mm must be in [0.5, 16], got {resolution_mm}")
    vols, affine = _resample(*_load_full_resolution(), res)
    axes = [affine[i, 3] + res * np.arange(n) for i, n in enumerate(vols["t1"].shape)]
    depth = ndi.distance_transform_edt(vols["brain_mask"] > 0.5, sampling=res).astype(np.float32)
    weight = _atrophy_weight(vols, axes, res)
    means = {k: float(np.median(vols["t1"][vols[k] > 0.8])) for k in ("csf", "gm", "wm")}  # pure-tissue T1
    arrays = {**vols, "depth_mm": depth, "atrophy_weight": weight, "affine": affine}
    for array in arrays.values():
        array.setflags(write=False)
    return Template(resolution_mm=res, t1_means=means, **arrays)


# ------------------------------------------------------------------------------------------ sampling
@dataclass
class PhantomSubject:
    """One generated subject. ``modalities`` hold integer-valued float32 intensities (stored as int16)."""

    modalities: dict[str, np.ndarray]
    seg: np.ndarray | None
    affine: np.ndarray
    params: dict[str, Any]
    # warped gm/wm/csf/brain_mask probability maps (after atrophy; a tumour is painted over, not in them)
    tissue: dict[str, np.ndarray] = field(default_factory=dict)


def _check_label(kind: str, label: str) -> None:
    if kind not in PHANTOM_CLASSES:
        raise ValueError(f"unknown phantom kind {kind!r}; choose from {sorted(PHANTOM_CLASSES)}")
    if label not in PHANTOM_CLASSES[kind]:
        raise ValueError(f"unknown {kind} class {label!r}; choose from {list(PHANTOM_CLASSES[kind])}")


# Parameter ranges per class, in the order they are drawn. A constant is a range of zero width (no draw).
_TUMOR_RANGES = {
    "HGG": dict(  # large, necrotic, ring-enhancing, with oedema
        radius_mm=(14, 28),
        necrosis_fraction=(0.35, 0.7),
        edema_ratio=(1.25, 1.75),
        enhancement=(0.25, 0.7),
        irregularity=(0.12, 0.3),
        mass_effect=(0.2, 0.5),
        boundary_width=(0.06, 0.12),
        edema_flair=(0.75, 0.95),
        hyperintensity=(0.0, 0.0),
    ),
    "LGG": dict(  # smaller, diffuse, non-enhancing, mild T2/FLAIR hyperintensity, little oedema
        radius_mm=(9, 20),
        necrosis_fraction=(0.0, 0.0),
        edema_ratio=(1.0, 1.25),
        enhancement=(0.0, 0.0),
        irregularity=(0.2, 0.45),
        mass_effect=(0.05, 0.3),
        boundary_width=(0.2, 0.35),
        edema_flair=(0.0, 0.0),
        hyperintensity=(0.12, 0.3),
    ),
}
_SEVERITY_RANGES = {"AD": (0.35, 1.0), "CN": (0.0, 0.5)}  # CN: normal ageing, overlaps mild AD


def _blend(own: tuple[float, float], other: tuple[float, float], separation: float) -> tuple[float, float]:
    """``separation`` 1 keeps a class's own range (exactly); 0 gives both classes the average range."""
    mid = [(a + b) / 2 for a, b in zip(own, other)]
    return tuple(separation * o + (1.0 - separation) * m for o, m in zip(own, mid))  # type: ignore[return-value]


def check_separation(separation: float) -> float:
    separation = float(separation)
    if not 0.0 <= separation <= 1.0:
        raise ValueError(
            f"class_separation must be in [0, 1] (1 = the default classes, 0 = identical), got {separation}"
        )
    return separation


def _tumor_params(label: str, rng: np.random.Generator, separation: float = 1.0) -> dict[str, Any]:
    other = "LGG" if label == "HGG" else "HGG"
    out = {}
    for key, own in _TUMOR_RANGES[label].items():
        lo, hi = _blend(own, _TUMOR_RANGES[other][key], separation)
        out[key] = lo if lo == hi else rng.uniform(lo, hi)
    return out


def _atrophy_params(label: str, rng: np.random.Generator, separation: float = 1.0) -> dict[str, Any]:
    u = rng.uniform
    other = "CN" if label == "AD" else "AD"
    severity = u(*_blend(_SEVERITY_RANGES[label], _SEVERITY_RANGES[other], separation))
    p = dict(
        severity=severity, gm_thinning=severity * u(0.3, 0.45), ventricle_expansion=severity * u(0.35, 0.5)
    )
    if label == "AD":
        stage = severity + rng.normal(0, 0.08)
        cdr = 0.5 if stage < 0.75 else 1.0 if stage < 0.95 else 2.0
        mmse_range = {0.5: (22, 30), 1.0: (16, 26), 2.0: (10, 21)}[cdr]
        age = 70 + 14 * severity + rng.normal(0, 6)
    else:
        cdr, mmse_range = 0.0, (27, 31)
        age = 52 + 60 * severity + rng.normal(0, 8)
    p.update(
        cdr=cdr,
        mmse=int(rng.integers(*mmse_range)),
        age=int(np.clip(round(age), 33, 96)),
        sex="F" if u() < 0.6 else "M",
        educ=int(rng.integers(1, 6)),
        ses=int(rng.integers(1, 6)),
        n_averages=int(rng.integers(3, 5)),
    )
    return p


def sample_params(kind: str, label: str, rng: np.random.Generator, separation: float = 1.0) -> dict[str, Any]:
    """One subject's random parameters: pathology (class dependent) and acquisition. Cheap, no volumes.

    ``separation`` < 1 pulls both classes' pathology ranges towards their average (harder to tell apart).
    """
    _check_label(kind, label)
    separation = check_separation(separation)
    if kind == "tumor":
        p = _tumor_params(label, rng, separation)
        if separation != 1.0:
            p["separation"] = separation
    else:
        p = _atrophy_params(label, rng, separation)
    u = rng.uniform
    n_images = len(BRATS_MODALITIES) if kind == "tumor" else 1
    p.update(
        rotation_deg=u(-4, 4, 3).tolist(),
        head_scale=(u(0.93, 1.07) * u(0.98, 1.02, 3)).tolist(),
        shift_mm=u(-4, 4, 3).tolist(),
        deform_mm=u(1.0, 3.0),
        bias=u(0.05, 0.2),
        noise=u(0.01, 0.035),
        gamma=u(0.9, 1.1),
        intensity_scale=u(0.85, 1.15, n_images).tolist(),
    )
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in p.items()}


# ------------------------------------------------------------------------------------------ geometry
def _smooth_fields(rng: np.random.Generator, shape: tuple[int, ...], n: int, order: int) -> np.ndarray:
    """``n`` random smooth fields (cosine series up to ``order``), zero mean and unit RMS, float32.

    Plain ``einsum`` (no BLAS) keeps the result bit-identical whatever the thread count.
    """
    k = np.arange(order + 1)
    bases = [np.cos(np.pi * np.outer(k, (np.arange(s) + 0.5) / s)) for s in shape]
    decay = 1.0 / (1.0 + k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    coef = rng.standard_normal((n, order + 1, order + 1, order + 1)) * decay
    coef[:, 0, 0, 0] = 0.0
    f = np.einsum("nabc,cz->nabz", coef, bases[2])
    f = np.einsum("nabz,by->nayz", f, bases[1])
    f = np.einsum("nayz,ax->nxyz", f, bases[0]).astype(np.float32)
    rms = np.sqrt(np.mean(np.square(f, dtype=np.float64), axis=(1, 2, 3)))
    return f / np.maximum(rms, 1e-12).astype(np.float32)[:, None, None, None]


def _rotation(angles_deg: list[float]) -> np.ndarray:
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _subject_coords(template: Template, p: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """(3, X, Y, Z) template-space mm position seen by each output voxel: affine + smooth warp."""
    axes = template.world_axes()
    centre = [(a[0] + a[-1]) / 2 for a in axes]
    matrix = _rotation(p["rotation_deg"]) / np.asarray(p["head_scale"])[None, :]
    rel = [
        (a - c).reshape([-1 if i == k else 1 for k in range(3)]) for i, (a, c) in enumerate(zip(axes, centre))
    ]
    coords = np.empty((3, *template.shape), dtype=np.float32)
    for i in range(3):
        coords[i] = centre[i] + p["shift_mm"][i] + sum(matrix[i, j] * rel[j] for j in range(3))
    coords += np.float32(p["deform_mm"]) * _smooth_fields(rng, template.shape, 3, order=3)
    return coords


def _radial_pull(coords: np.ndarray, centre, strength: float, sigma) -> np.ndarray:
    """Sampling positions that enlarge the neighbourhood of ``centre`` (mass effect, ventricle growth).

    Output voxel q samples c + (q - c)(1 - s g(q)), g a Gaussian bump: monotone for s < 1.
    """
    c = np.asarray(centre, np.float32).reshape(3, 1, 1, 1)
    s = np.asarray(sigma, np.float32).reshape(3, 1, 1, 1)
    diff = coords - c
    bump = np.exp(-0.5 * np.sum(np.square(diff / s), axis=0))
    return c + diff * (1.0 - np.float32(strength) * bump)


def _sample(template: Template, coords: np.ndarray, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Trilinear lookup of template maps at mm positions (``grid_sample``, zeros outside)."""
    origin = template.affine[:3, 3]
    norm = [
        (coords[i] - origin[i]) * (2.0 / (template.resolution_mm * (n - 1))) - 1.0
        for i, n in enumerate(template.shape)
    ]
    grid = torch.from_numpy(np.stack(norm[::-1], axis=-1).astype(np.float32))[None]
    volume = torch.from_numpy(np.stack([getattr(template, k) for k in keys]))[None]
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0].numpy()
    return dict(zip(keys, out))


# ------------------------------------------------------------------------------------------ subjects
def _acquire(image: np.ndarray, mask: np.ndarray, p: dict, index: int, bias: np.ndarray, rng) -> np.ndarray:
    """Intensity jitter, bias field, Rician noise, skull-stripping and int16 quantisation."""
    image = np.power(np.clip(image, 0.0, None), np.float32(p["gamma"]))
    image *= np.float32(p["intensity_scale"][index]) * np.exp(np.float32(p["bias"]) * bias)
    values = image[mask]
    noise = rng.standard_normal((2, values.size), dtype=np.float32) * np.float32(p["noise"])
    out = np.zeros_like(image)
    out[mask] = np.sqrt(np.square(values + noise[0]) + np.square(noise[1]))
    return np.clip(np.rint(out * INTENSITY_UNIT), 0, 32767).astype(np.float32)


def _tissue_mix(tissue: dict[str, np.ndarray], contrast: tuple[float, float, float]) -> np.ndarray:
    return contrast[0] * tissue["csf"] + contrast[1] * tissue["gm"] + contrast[2] * tissue["wm"]


def _tumor_center(template: Template, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A white-matter voxel deep enough for the tumour, above the tentorium (z > -10 mm)."""
    z = template.world_axes()[2]
    depth = min(0.6 * radius + 4.0, 0.8 * float(template.depth_mm.max()))
    ok = (template.wm > 0.8) & (template.depth_mm >= depth) & (z >= -10.0)[None, None, :]
    candidates = np.flatnonzero(ok)
    if candidates.size == 0:
        candidates = np.flatnonzero(template.wm >= 0.9 * template.wm.max())
    voxel = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], template.shape))
    jitter = rng.uniform(-0.5, 0.5, 3) * template.resolution_mm
    return template.affine[:3, 3] + template.resolution_mm * voxel + jitter


def _tumor_values(p: dict[str, Any], hgg: bool) -> dict[str, tuple[float, float, float]]:
    """(core, enhancing rim, oedema) intensity per modality; HGG core is necrosis, LGG core is tumour.

    With ``p["separation"]`` < 1 each class's map moves towards the other's (weight (1 + s) / 2 on its own).
    """
    own = _class_tumor_values(p, hgg)
    s = float(p.get("separation", 1.0))
    if s == 1.0:
        return own
    other, w = _class_tumor_values(p, not hgg), (1.0 + s) / 2.0
    return {m: tuple(w * a + (1.0 - w) * b for a, b in zip(own[m], other[m])) for m in own}  # type: ignore[misc]


def _class_tumor_values(p: dict[str, Any], hgg: bool) -> dict[str, tuple[float, float, float]]:
    if hgg:
        return {
            "t1": (0.30, 0.55, 0.60),
            "t1ce": (0.30, 0.87 * (1 + p["enhancement"]), 0.60),
            "t2": (0.95, 0.70, 0.80),
            "flair": (0.50, 0.72, p["edema_flair"]),
        }
    h = p["hyperintensity"]
    t1 = (0.62 - 0.3 * h, 0.0, 0.72)
    return {
        "t1": t1,
        "t1ce": t1,
        "t2": (0.45 + 1.2 * h, 0.0, 0.45 + 0.6 * h),
        "flair": (0.48 + h, 0.0, 0.48 + 0.5 * h),
    }


def _waves(rng: np.random.Generator, x: np.ndarray, n: int, freq: tuple[float, float]) -> np.ndarray:
    """Sum of ``n`` random plane waves evaluated at points ``x`` (3, ...): unit RMS, lobulated patterns."""
    directions = rng.standard_normal((n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    freqs, phases = rng.uniform(*freq, n), rng.uniform(0, 2 * np.pi, n)
    out = np.zeros(x.shape[1:], np.float32)
    for d, f, ph in zip(directions, freqs, phases):
        out += np.cos(np.float32(f) * (d[0] * x[0] + d[1] * x[1] + d[2] * x[2]) + np.float32(ph))
    return out * np.float32(math.sqrt(2.0 / n))


def _tumor_box(coords: np.ndarray, centre: np.ndarray, reach: float) -> tuple[slice, ...]:
    """Voxel box around every output voxel within ``reach`` mm of the tumour centre (tumour work stays in it)."""
    near = np.sum(np.square(coords - centre), axis=0) < reach**2
    if not near.any():
        return (slice(0, 0),) * 3
    lo, hi = _bbox(near)
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))


def _tumor_regions(p: dict, coords: np.ndarray, centre: np.ndarray, tissue: dict, mask: np.ndarray, rng):
    """Soft memberships (core, enhancing rim, oedema, texture) in the tumour box, and the hard BraTS seg.

    The boundaries are spheres whose radius is modulated by random lobes (plane waves over the direction).
    The random fields are evaluated only within reach of the centre, which keeps this cheap.
    """
    c = centre.astype(np.float32).reshape(3, 1, 1, 1)
    irr, width, hgg = p["irregularity"], p["boundary_width"], p["necrosis_fraction"] > 0
    reach = p["radius_mm"] * max(p["edema_ratio"], 1.0) * (1 + irr) * (1 + 1.5 * irr) * (1 + width) + 1.0
    box = _tumor_box(coords, c, reach)
    rel = coords[(slice(None), *box)] - c
    dist = np.sqrt(np.sum(np.square(rel), axis=0))
    near = dist < reach
    rel, dist = rel[:, near], dist[near]
    direction = rel / np.maximum(dist, 1e-3)
    radius = p["radius_mm"] * (1.0 + irr * np.tanh(_waves(rng, direction, 5, (1.5, 3.5))))
    rho = dist / radius
    lobes = 1.0 + 1.5 * irr * np.tanh(_waves(rng, direction, 6, (2.5, 5.0)))
    rho_edema = dist / (radius * p["edema_ratio"] * lobes)
    texture = 1.0 + 0.08 * _waves(rng, rel / np.float32(p["radius_mm"]), 6, (3.0, 7.0))
    inside = tissue["brain_mask"][box][near]
    spreadable = np.clip(1.6 * tissue["wm"][box][near] + 0.4 * tissue["gm"][box][near], 0, 1)  # follows WM
    tumour = np.clip((1.0 - rho) / width + 0.5, 0, 1) * inside
    core = np.clip((p["necrosis_fraction"] - rho) / width + 0.5, 0, 1) * inside if hgg else tumour
    edema = np.clip((1.0 - rho_edema) / width + 0.5, 0, 1) * spreadable * (1.0 - tumour)
    labels = np.zeros(dist.shape, np.uint8)
    labels[(rho_edema < 1) & (spreadable >= 0.5)] = 2
    labels[rho < 1] = 4 if hgg else 1
    if hgg:
        labels[rho < p["necrosis_fraction"]] = 1
    seg = np.zeros(mask.shape, np.uint8)
    seg[box] = _scatter(labels, near)
    seg[~mask] = 0
    regions = {"core": core, "enhancing": tumour - core, "edema": edema, "texture": texture}
    return box, {k: _scatter(v, near, fill=1.0 if k == "texture" else 0.0) for k, v in regions.items()}, seg


def _scatter(values: np.ndarray, where: np.ndarray, fill: float = 0.0) -> np.ndarray:
    out = np.full(where.shape, fill, dtype=values.dtype)
    out[where] = values
    return out


def _tumor_subject(template: Template, label: str, p: dict, coords: np.ndarray, rng) -> PhantomSubject:
    centre = _tumor_center(template, p["radius_mm"], rng)
    p["center_mm"] = [float(c) for c in centre]
    pulled = _radial_pull(coords, centre, p["mass_effect"], (p["radius_mm"],) * 3)
    tissue = _sample(template, pulled, ("t1", "gm", "wm", "brain_mask"))
    tissue["csf"] = np.clip(tissue["brain_mask"] - tissue["gm"] - tissue["wm"], 0.0, 1.0)
    mask = tissue["brain_mask"] > 0.5
    box, regions, seg = _tumor_regions(p, coords, centre, tissue, mask, rng)
    normal = 1.0 - regions["core"] - regions["enhancing"] - regions["edema"]
    contrasts = {m: _tissue_mix(tissue, c) for m, c in _TISSUE_CONTRAST.items()}
    t1 = tissue.pop("t1")
    bases = {"t1": t1, "t1ce": t1.copy(), **contrasts}
    values = _tumor_values(p, label == "HGG")
    bias = _smooth_fields(rng, template.shape, len(BRATS_MODALITIES), order=2)
    modalities = {}
    for i, mod in enumerate(BRATS_MODALITIES):
        core, rim, edema = values[mod]
        lesion = regions["core"] * core + regions["enhancing"] * rim + regions["edema"] * edema
        image = bases[mod]
        image[box] = image[box] * normal + regions["texture"] * lesion
        modalities[mod] = _acquire(image, mask, p, i, bias[i], rng)
    ml = template.resolution_mm**3 / 1000.0
    for name, labels in (("tumor", (1, 2, 4)), ("core", (1,)), ("edema", (2,)), ("enhancing", (4,))):
        p[f"{name}_volume_ml"] = float(np.isin(seg, labels).sum() * ml)
    return PhantomSubject(modalities, seg, template.affine.copy(), p, tissue)


def _atrophy_subject(template: Template, p: dict, coords: np.ndarray, rng) -> PhantomSubject:
    pulled = _radial_pull(coords, _VENTRICLE_CENTER_MM, p["ventricle_expansion"], _VENTRICLE_SIGMA_MM)
    tissue = _sample(template, pulled, ("t1", "gm", "wm", "brain_mask", "atrophy_weight"))
    tissue["csf"] = np.clip(tissue["brain_mask"] - tissue["gm"] - tissue["wm"], 0.0, 1.0)
    loss = np.float32(p["gm_thinning"]) * tissue.pop("atrophy_weight") * tissue["gm"]
    tissue["gm"] -= loss  # grey matter turns into CSF: sulci widen, cortex thins
    tissue["csf"] += loss
    t1 = tissue.pop("t1") - loss * np.float32(template.t1_means["gm"] - template.t1_means["csf"])
    mask = tissue["brain_mask"] > 0.5
    bias = _smooth_fields(rng, template.shape, 1, order=2)
    image = _acquire(t1, mask, p, 0, bias[0], rng)
    ml = template.resolution_mm**3 / 1000.0
    brain = float((tissue["gm"] + tissue["wm"])[mask].sum())
    etiv = _ETIV_ML * float(np.prod(p["head_scale"])) * (1.0 + 0.03 * float(rng.standard_normal()))
    p.update(
        gm_volume_ml=float(tissue["gm"][mask].sum() * ml),
        csf_volume_ml=float(tissue["csf"][mask].sum() * ml),
        etiv=int(round(etiv)),
        nwbv=round(_NWBV_FACTOR * brain / max(int(mask.sum()), 1), 3),
        asf=round(1755.0 / etiv, 3),
    )
    return PhantomSubject({"t1": image}, None, template.affine.copy(), p, tissue)


def generate_subject(
    kind: str, label: str, seed: int, template: Template, separation: float = 1.0
) -> PhantomSubject:
    """One synthetic subject; a pure function of (kind, label, seed, separation) and the template."""
    _check_label(kind, label)
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([int(seed), _KIND_CODES[kind], PHANTOM_CLASSES[kind].index(label)])
    p = sample_params(kind, label, rng, separation)
    coords = _subject_coords(template, p, rng)
    if kind == "tumor":
        return _tumor_subject(template, label, p, coords, rng)
    return _atrophy_subject(template, p, coords, rng)


# ------------------------------------------------------------------------------------------ writing
def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def _write_brats(subject: PhantomSubject, case_dir: Path) -> None:
    case_dir.mkdir(parents=True)
    case = case_dir.name
    for mod in BRATS_MODALITIES:
        _save_nifti(
            subject.modalities[mod].astype(np.int16), subject.affine, case_dir / f"{case}_{mod}.nii.gz"
        )
    _save_nifti(subject.seg, subject.affine, case_dir / f"{case}_seg.nii.gz")


def oasis_image_name(session: str, n_averages: int) -> str:
    return f"{session}_mpr_n{n_averages}_anon_111_t88_masked_gfc.img"


def _write_oasis(subject: PhantomSubject, session_dir: Path) -> None:
    """Analyze pair with shape (X, Y, Z, 1), stored left-right flipped as the Analyze default affine assumes."""
    t88 = session_dir / "PROCESSED" / "MPRAGE" / "T88_111"
    t88.mkdir(parents=True)
    data = np.ascontiguousarray(subject.modalities["t1"][::-1, :, :, None].astype(np.int16))
    affine = subject.affine.copy()
    affine[0, 3] += affine[0, 0] * (data.shape[0] - 1)
    affine[0, 0] = -affine[0, 0]
    name = oasis_image_name(session_dir.name, subject.params["n_averages"])
    nib.AnalyzeImage(data, affine).to_filename(t88 / name)


def _oasis_row(session: str, p: dict[str, Any]) -> dict[str, Any]:
    return {
        "ID": session,
        "M/F": p["sex"],
        "Hand": "R",
        "Age": p["age"],
        "Educ": p["educ"],
        "SES": p["ses"],
        "MMSE": p["mmse"],
        "CDR": f"{p['cdr']:g}",
        "eTIV": p["etiv"],
        "nWBV": f"{p['nwbv']:.3f}",
        "ASF": f"{p['asf']:.3f}",
        "Delay": "N/A",
    }


@dataclass(frozen=True)
class _Job:
    kind: str
    label: str
    index: int
    seed: int
    name: str
    relpath: str
    out_root: str
    resolution_mm: float
    separation: float = 1.0


def _subject_seed(seed: int, kind: str, label: str, index: int) -> int:
    entropy = [int(seed), _KIND_CODES[kind], PHANTOM_CLASSES[kind].index(label), int(index)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def _plan(
    kind: str, counts: dict[str, int], seed: int, out_root: Path, res: float, separation: float = 1.0
) -> list[_Job]:
    """Every subject's name, folder and seed. OASIS IDs are a seeded shuffle so they do not reveal the class."""
    pairs = [(label, i) for label in PHANTOM_CLASSES[kind] for i in range(counts[label])]
    if kind == "tumor":
        named = [(label, i, f"Phantom_{label}_{i + 1:04d}") for label, i in pairs]
        folders = [f"{label}/{name}" for label, _, name in named]
    else:
        order = np.random.default_rng([int(seed), _KIND_CODES[kind], 99]).permutation(len(pairs))
        named = [(*pairs[k], f"OAS1_{position + 1:04d}_MR1") for position, k in enumerate(order)]
        folders = [
            f"disc{pos // OASIS_SUBJECTS_PER_DISC + 1}/{name}" for pos, (_, _, name) in enumerate(named)
        ]
    return [
        _Job(
            kind, label, i, _subject_seed(seed, kind, label, i), name, folder, str(out_root), res, separation
        )
        for (label, i, name), folder in zip(named, folders)
    ]


def _make_one(job: _Job) -> dict[str, Any]:
    subject = generate_subject(
        job.kind, job.label, job.seed, load_template(job.resolution_mm), job.separation
    )
    target = Path(job.out_root) / job.relpath
    (_write_brats if job.kind == "tumor" else _write_oasis)(subject, target)
    return {
        "name": job.name,
        "label": job.label,
        "index": job.index,
        "seed": job.seed,
        "params": subject.params,
    }


def _init_worker() -> None:
    torch.set_num_threads(1)


def _run(jobs: list[_Job], workers: int, progress: bool) -> list[dict[str, Any]]:
    bar = {"total": len(jobs), "desc": f"phantom {jobs[0].kind}", "unit": "subject", "disable": not progress}
    if workers <= 1 or len(jobs) <= 1:
        return [_make_one(job) for job in tqdm(jobs, **bar)]
    # fork (Linux): workers start at once and inherit the cached template; one torch thread each, as in
    # torch's DataLoader workers, avoids the OpenMP-after-fork hang. Elsewhere spawn, the safe default.
    context = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_init_worker) as pool:
        return list(tqdm(pool.map(_make_one, jobs), **bar))


# ------------------------------------------------------------------------------------------ cohorts
def _counts(kind: str, n_per_class: int | Mapping[str, int]) -> dict[str, int]:
    classes = PHANTOM_CLASSES[kind]
    if isinstance(n_per_class, Mapping):
        unknown = sorted(set(n_per_class) - set(classes))
        missing = [c for c in classes if c not in n_per_class]
        if unknown or missing:
            raise ValueError(
                f"n_per_class for {kind} needs exactly the keys {list(classes)} (unknown {unknown}, missing {missing})"
            )
        counts = {c: int(n_per_class[c]) for c in classes}
    else:
        counts = {c: int(n_per_class) for c in classes}
    if any(n < 0 for n in counts.values()) or sum(counts.values()) == 0:
        raise ValueError(f"n_per_class must be >= 0 with at least one subject, got {counts}")
    return counts


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_replaceable(root: Path) -> None:
    """Refuse to replace a folder that holds anything a phantom cohort would not write."""
    if not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory; cannot write a phantom cohort there")
    foreign = sorted(p.name for p in root.iterdir() if not _ENTRY_RE.match(p.name))
    if foreign:
        raise FileExistsError(
            f"{root} holds files that are not part of a phantom cohort ({', '.join(foreign[:5])}); "
            "refusing to overwrite it: choose another root or empty it"
        )


def _replace_dir(new: Path, root: Path) -> None:
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
        root.rename(old)
    new.rename(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_phantom_cohort(
    kind: str,
    root: str | Path,
    n_per_class: int | Mapping[str, int],
    seed: int = 0,
    resolution_mm: float = 2.0,
    workers: int = 1,
    progress: bool = True,
    class_separation: float = 1.0,
) -> Path:
    """Write a synthetic two-class cohort to ``root`` (BraTS 2019 layout for tumor, OASIS-1 for atrophy).

    Idempotent: ``root/.phantom_complete.json`` is written last; with identical parameters the call returns
    at once. Otherwise the cohort is built in a temporary sibling folder and renamed into place, so an
    interrupted run never leaves a folder that looks complete.

    ``class_separation`` in [0, 1] sets how different the two classes are (1: the default ranges; lower
    values pull both classes' pathology parameters and intensities towards their average: a harder task).
    """
    if kind not in PHANTOM_CLASSES:
        raise ValueError(f"unknown phantom kind {kind!r}; choose from {sorted(PHANTOM_CLASSES)}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    root = Path(root)
    config = {
        "version": PHANTOM_VERSION,
        "kind": kind,
        "n_per_class": _counts(kind, n_per_class),
        "seed": int(seed),
        "resolution_mm": float(resolution_mm),
    }
    if check_separation(class_separation) != 1.0:  # absent at 1: cohorts made before the option stay valid
        config["class_separation"] = float(class_separation)
    if _read_marker(root) == config:
        return root
    if root.exists():
        _check_replaceable(root)
    load_template(config["resolution_mm"])  # fail early if nilearn or its template is missing
    root.parent.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temp_dirs(root.parent)
    if stale:
        log.info("removed %d folder(s) left by killed phantom generations: %s", len(stale), stale)
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    with _TempLock(tmp):
        try:
            tmp.mkdir()
            jobs = _plan(
                kind,
                config["n_per_class"],
                config["seed"],
                tmp,
                config["resolution_mm"],
                float(class_separation),
            )
            results = _run(jobs, int(workers), progress)
            if kind == "atrophy":
                _write_csv(tmp / OASIS_CSV_NAME, [_oasis_row(r["name"], r["params"]) for r in results])
            marker = {"config": config, "subjects": results}
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=1))
            _replace_dir(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root


# ------------------------------------------------------------------------------------------ temp folders
_TEMP_RE = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


class _TempLock:
    """An exclusive ``flock`` on ``<tmp>.lock`` held while a generation writes ``<tmp>``.

    Taken before ``<tmp>`` exists and released (file removed) after it is gone, so a folder whose lock
    can be taken belongs to no running generation: a killed one (the kernel drops its lock).
    """

    def __init__(self, tmp: Path):
        self.path = tmp.with_name(tmp.name + ".lock")
        self.handle = None

    def acquire(self, blocking: bool = True) -> bool:
        import fcntl

        try:
            self.handle = self.path.open("a")
        except OSError:
            return False
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            self.handle.close()
            self.handle = None
            return False
        return True

    def release(self) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()  # closing drops the lock
            self.handle = None

    def __enter__(self) -> _TempLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temp_dirs(parent: Path) -> list[Path]:
    """Delete the ``.<cohort>.tmp-*`` / ``.old-*`` folders that killed generations left in ``parent``.

    A ``.tmp-*`` folder is stale when no process holds its lock (``.old-*`` ones are always stale: a
    running generation deletes its own right away). A folder is removed only if it holds nothing but cohort
    files, so a user's dot-folder with a similar name is never touched. Returns what was removed.
    """
    removed = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    for path in entries:
        name = path.name.removesuffix(".lock")
        if not _TEMP_RE.match(name):
            continue
        folder = path.with_name(name)
        try:
            if folder.is_dir() and any(not _ENTRY_RE.match(p.name) for p in folder.iterdir()):
                continue  # not a cohort: not ours
        except OSError:
            continue  # gone meanwhile (renamed into place by its generation)
        lock = _TempLock(folder)
        if ".tmp-" in name and not lock.acquire(blocking=False):
            continue  # a running generation is writing it
        try:
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        finally:
            lock.release()
    return removed


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(OASIS_CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


__all__ = [
    "PHANTOM_CLASSES",
    "PhantomSubject",
    "Template",
    "generate_subject",
    "load_template",
    "make_phantom_cohort",
    "sample_params",
]

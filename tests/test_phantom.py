"""Phantom cohorts: official layouts, determinism, class differences, idempotent generation."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrrl.data import phantom
from mrrl.data.layouts import discover_brats, discover_oasis
from mrrl.data.phantom import (
    PHANTOM_CLASSES,
    generate_subject,
    load_template,
    make_phantom_cohort,
    sample_params,
)

RES = 6.0  # coarse grids keep the whole file fast; the code path is the same as at 2 mm


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _all_voxels(root: Path) -> dict[str, np.ndarray]:
    files = sorted(p for p in root.rglob("*") if p.name.endswith((".nii.gz", ".img")))
    return {str(p.relative_to(root)): _voxels(p) for p in files}


def _marker(root: Path) -> dict:
    return json.loads((root / phantom.MARKER_NAME).read_text())


@pytest.fixture(scope="module")
def tumor_root(tmp_path_factory) -> Path:
    return make_phantom_cohort(
        "tumor", tmp_path_factory.mktemp("ph") / "tumor", 2, seed=3, resolution_mm=RES, progress=False
    )


@pytest.fixture(scope="module")
def atrophy_root(tmp_path_factory) -> Path:
    return make_phantom_cohort(
        "atrophy", tmp_path_factory.mktemp("ph") / "atrophy", 3, seed=3, resolution_mm=RES, progress=False
    )


# ------------------------------------------------------------------------------------------ template
def test_template_maps_are_consistent():
    t = load_template(RES)
    assert load_template(RES) is t  # cached
    for name in ("t1", "gm", "wm", "csf", "brain_mask"):
        array = getattr(t, name)
        assert array.dtype == np.float32 and array.shape == t.shape and not array.flags.writeable
        assert 0.0 <= array.min() and array.max() <= 1.0
    np.testing.assert_allclose(np.diag(t.affine)[:3], RES)
    inside = t.brain_mask > 0.5
    assert np.all(t.gm + t.wm + t.csf <= t.brain_mask + 1e-5)
    assert t.t1[inside].mean() > 0.4 and t.t1[~inside].mean() < 0.05  # skull-stripped template
    assert t.t1_means["csf"] < t.t1_means["gm"] < t.t1_means["wm"]  # T1 contrast


def test_missing_nilearn_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(phantom.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install nilearn"):
        phantom.template_dir()

    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(phantom.importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(FileNotFoundError, match="mni_icbm152_t1_tal_nlin_sym_09a_converted"):
        phantom.template_dir()


# ------------------------------------------------------------------------------------------ layouts
def test_tumor_cohort_has_the_brats_layout(tumor_root):
    cases = sorted(p.relative_to(tumor_root).as_posix() for p in tumor_root.glob("*/*"))
    assert cases == [f"{c}/Phantom_{c}_{i:04d}" for c in ("HGG", "LGG") for i in (1, 2)]
    for case_dir in (tumor_root / c for c in cases):
        names = sorted(p.name for p in case_dir.iterdir())
        assert names == sorted(f"{case_dir.name}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))
        shapes = set()
        for mod in ("t1", "t1ce", "t2", "flair"):
            data = _voxels(case_dir / f"{case_dir.name}_{mod}.nii.gz")
            assert data.ndim == 3 and np.isfinite(data).all() and data.std() > 0 and data.min() >= 0
            shapes.add(data.shape)
        seg = _voxels(case_dir / f"{case_dir.name}_seg.nii.gz")
        assert seg.dtype == np.uint8 and {seg.shape} == shapes
        assert set(np.unique(seg)) <= {0, 1, 2, 4} and (seg > 0).any()
        assert (4 in seg) == case_dir.name.startswith("Phantom_HGG")
    subjects, problems = discover_brats(tumor_root, modalities=("t1", "t1ce", "t2", "flair"))
    assert not problems and len(subjects) == 4


def test_atrophy_cohort_has_the_oasis_layout(atrophy_root):
    labels = {s["name"]: s["label"] for s in _marker(atrophy_root)["subjects"]}
    assert sorted(labels) == [f"OAS1_{i:04d}_MR1" for i in range(1, 7)]
    assert sorted(labels.values()) == ["AD"] * 3 + ["CN"] * 3
    for session in labels:
        [image] = (atrophy_root / "disc1" / session / "PROCESSED" / "MPRAGE" / "T88_111").glob("*.img")
        assert image.name.startswith(f"{session}_mpr_n") and image.name.endswith(
            "_anon_111_t88_masked_gfc.img"
        )
        assert image.with_suffix(".hdr").is_file()
        loaded = nib.load(image)
        assert isinstance(loaded, nib.AnalyzeImage) and loaded.ndim == 4 and loaded.shape[-1] == 1
        data = np.asarray(loaded.dataobj)
        assert np.isfinite(data).all() and data.std() > 0 and data.min() == 0  # brain-masked
    with (atrophy_root / "oasis_cross-sectional.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == (
        "ID",
        "M/F",
        "Hand",
        "Age",
        "Educ",
        "SES",
        "MMSE",
        "CDR",
        "eTIV",
        "nWBV",
        "ASF",
        "Delay",
    )
    assert {r["ID"] for r in rows} == set(labels)
    for row in rows:
        cdr = float(row["CDR"])
        assert cdr in ((0.5, 1.0, 2.0) if labels[row["ID"]] == "AD" else (0.0,))
        assert 18 <= int(row["Age"]) <= 96 and 0 <= int(row["MMSE"]) <= 30
        assert 0.6 < float(row["nWBV"]) < 0.9 and 1000 < int(row["eTIV"]) < 2100
        assert float(row["ASF"]) == pytest.approx(1755 / int(row["eTIV"]), abs=2e-3)
    subjects, problems = discover_oasis(atrophy_root)
    assert not problems and {s.id: s.label for s in subjects} == labels


def test_oasis_spreads_subjects_over_discs(tmp_path, monkeypatch):
    monkeypatch.setattr(phantom, "OASIS_SUBJECTS_PER_DISC", 2)
    jobs = phantom._plan("atrophy", {"AD": 3, "CN": 2}, 0, tmp_path, RES)
    assert [j.relpath.split("/")[0] for j in jobs] == ["disc1", "disc1", "disc2", "disc2", "disc3"]
    assert sorted(j.label for j in jobs) == ["AD"] * 3 + ["CN"] * 2
    assert [j.name for j in jobs] == [f"OAS1_{i:04d}_MR1" for i in range(1, 6)]
    many = [j.label for j in phantom._plan("atrophy", {"AD": 20, "CN": 20}, 0, tmp_path, RES)]
    assert 5 < many[:20].count("AD") < 15  # IDs are shuffled: the ID does not give the class away


# ------------------------------------------------------------------------------------------ determinism
def test_subjects_are_deterministic():
    template = load_template(RES)
    for kind, (label, _) in PHANTOM_CLASSES.items():
        a, b = (generate_subject(kind, label, 11, template) for _ in range(2))
        c = generate_subject(kind, label, 12, template)
        for mod in a.modalities:
            assert a.modalities[mod].dtype == np.float32
            np.testing.assert_array_equal(a.modalities[mod], b.modalities[mod])
            assert not np.array_equal(a.modalities[mod], c.modalities[mod])
        assert a.params == b.params != c.params


def test_cohort_is_independent_of_workers(tmp_path, atrophy_root):
    parallel = make_phantom_cohort(
        "atrophy", tmp_path / "w2", 3, seed=3, resolution_mm=RES, workers=2, progress=False
    )
    reference, again = _all_voxels(atrophy_root), _all_voxels(parallel)
    assert reference.keys() == again.keys() and len(reference) == 6
    for name in reference:
        np.testing.assert_array_equal(reference[name], again[name])
    assert (parallel / "oasis_cross-sectional.csv").read_bytes() == (
        atrophy_root / "oasis_cross-sectional.csv"
    ).read_bytes()
    other = make_phantom_cohort("atrophy", tmp_path / "s4", 3, seed=4, resolution_mm=RES, progress=False)
    assert any(not np.array_equal(reference[n], v) for n, v in _all_voxels(other).items() if n in reference)


# ------------------------------------------------------------------------------------------ pathology
def test_hgg_is_larger_and_enhancing_lgg_is_not():
    template = load_template(RES)
    volumes = {}
    for label in ("HGG", "LGG"):
        subjects = [generate_subject("tumor", label, seed, template) for seed in range(4)]
        volumes[label] = np.mean([s.params["tumor_volume_ml"] for s in subjects])
        for s in subjects:
            labels = set(np.unique(s.seg))
            assert labels <= {0, 1, 2, 4} and 1 in labels
            assert (4 in labels) == (label == "HGG")
            if label == "HGG":  # the enhancing rim is brighter on t1ce than on t1
                rim = s.seg == 4
                assert s.modalities["t1ce"][rim].mean() > 1.2 * s.modalities["t1"][rim].mean()
    assert volumes["HGG"] > 1.5 * volumes["LGG"]


def test_ad_has_more_csf_and_less_grey_matter_than_cn():
    template = load_template(RES)
    ventricles = (
        np.sqrt(
            sum(
                (a.reshape([-1 if i == k else 1 for k in range(3)]) - c) ** 2
                for i, (a, c) in enumerate(zip(template.world_axes(), phantom._VENTRICLE_CENTER_MM))
            )
        )
        < 25
    )
    stats = {}
    for label in ("AD", "CN"):
        rows = []
        for seed in range(4):
            tissue = generate_subject("atrophy", label, seed, template).tissue
            inside = tissue["brain_mask"] > 0.5
            rows.append(
                (tissue["csf"][inside].mean(), tissue["gm"][inside].mean(), tissue["csf"][ventricles].sum())
            )
        stats[label] = np.mean(rows, axis=0)
    assert stats["AD"][0] > stats["CN"][0]  # CSF fraction
    assert stats["AD"][1] < stats["CN"][1]  # grey-matter fraction
    assert stats["AD"][2] > stats["CN"][2]  # ventricle region


def test_class_parameter_ranges_overlap():
    rng = np.random.default_rng(0)
    draw = {
        label: [sample_params(kind, label, rng) for _ in range(200)]
        for kind, labels in PHANTOM_CLASSES.items()
        for label in labels
    }
    hgg = np.array([p["radius_mm"] for p in draw["HGG"]])
    lgg = np.array([p["radius_mm"] for p in draw["LGG"]])
    assert 14 <= hgg.min() and hgg.max() <= 28 and 9 <= lgg.min() and lgg.max() <= 20
    assert lgg.max() > hgg.min() and hgg.mean() > lgg.mean()
    assert np.mean((hgg >= lgg.min()) & (hgg <= lgg.max())) > 0.1  # a real overlap, not a touch
    assert all(p["enhancement"] == 0 and p["necrosis_fraction"] == 0 for p in draw["LGG"])
    ad = np.array([p["severity"] for p in draw["AD"]])
    cn = np.array([p["severity"] for p in draw["CN"]])
    assert cn.max() > ad.min() and ad.mean() > cn.mean()
    assert np.mean(ad <= cn.max()) > 0.05 and np.mean(cn >= ad.min()) > 0.05
    assert {p["cdr"] for p in draw["AD"]} == {0.5, 1.0, 2.0} and {p["cdr"] for p in draw["CN"]} == {0.0}
    json.dumps(draw)  # parameters are recorded in the completion marker


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown phantom kind"):
        make_phantom_cohort("lesion", tmp_path / "x", 1)
    with pytest.raises(ValueError, match="unknown atrophy class"):
        generate_subject("atrophy", "HGG", 0, load_template(RES))
    with pytest.raises(ValueError, match="exactly the keys"):
        make_phantom_cohort("tumor", tmp_path / "x", {"HGG": 1, "GBM": 1})
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ idempotence
def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_second_call_is_a_no_op(tmp_path):
    root = make_phantom_cohort(
        "atrophy", tmp_path / "c", {"AD": 1, "CN": 1}, resolution_mm=RES, progress=False
    )
    before = _mtimes(root)
    start = time.perf_counter()
    assert make_phantom_cohort("atrophy", root, {"AD": 1, "CN": 1}, resolution_mm=RES) == root
    assert time.perf_counter() - start < 0.5
    assert _mtimes(root) == before
    assert _marker(root)["config"]["n_per_class"] == {"AD": 1, "CN": 1}


def test_interrupted_or_changed_cohorts_are_regenerated(tmp_path, monkeypatch):
    root = make_phantom_cohort("tumor", tmp_path / "c", 1, seed=0, resolution_mm=RES, progress=False)
    first = _all_voxels(root)
    (root / phantom.MARKER_NAME).unlink()  # as if the run had stopped before the marker
    (root / "HGG" / "Phantom_HGG_0001" / "Phantom_HGG_0001_t2.nii.gz").unlink()
    make_phantom_cohort("tumor", root, 1, seed=0, resolution_mm=RES, progress=False)
    assert (root / phantom.MARKER_NAME).is_file()
    again = _all_voxels(root)
    assert again.keys() == first.keys() and all(np.array_equal(first[k], again[k]) for k in first)

    make_phantom_cohort("tumor", root, 1, seed=1, resolution_mm=RES, progress=False)
    assert _marker(root)["config"]["seed"] == 1
    assert not all(np.array_equal(first[k], v) for k, v in _all_voxels(root).items())

    calls = []

    def fail_on_second(job):  # a crash half-way leaves the previous complete cohort untouched
        calls.append(job)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(job)

    real = phantom._make_one
    monkeypatch.setattr(phantom, "_make_one", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        make_phantom_cohort("tumor", root, 1, seed=2, resolution_mm=RES, progress=False)
    assert _marker(root)["config"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folders left behind


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "my_scans.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="my_scans.txt"):
        make_phantom_cohort("tumor", root, 1, resolution_mm=RES, progress=False)
    assert (root / "my_scans.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ difficulty
def _separability(separation: float, n: int = 30) -> float:
    """Cross-validated accuracy of a logistic-regression probe on the brain's FLAIR intensity quantiles
    (location-free, so it sees tumour size and brightness, which is what tells HGG from LGG)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    template = load_template(4.0)
    mask = template.brain_mask > 0.5
    features, labels = [], []
    for label in PHANTOM_CLASSES["tumor"]:
        for i in range(n):
            flair = generate_subject("tumor", label, 1000 + i, template, separation).modalities["flair"][mask]
            features.append(np.quantile(flair / np.median(flair), np.linspace(0.5, 1.0, 21)))
            labels.append(label == "HGG")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(probe, np.array(features), np.array(labels), cv=5).mean())


def test_lower_class_separation_makes_the_classes_harder_to_tell_apart():
    """Measured: probe accuracy 0.87 at separation 1, 0.62 at 0.5, chance at 0 (30 subjects per class)."""
    assert _separability(1.0) - _separability(0.0) > 0.25
    with pytest.raises(ValueError, match="class_separation must be in"):
        sample_params("tumor", "HGG", np.random.default_rng(0), separation=1.5)


def test_separation_one_reproduces_the_default_cohort_and_zero_merges_the_ranges():
    draws = {s: sample_params("tumor", "LGG", np.random.default_rng(7), separation=s) for s in (1.0, 0.0)}
    assert draws[1.0] == sample_params("tumor", "LGG", np.random.default_rng(7))
    assert draws[1.0]["enhancement"] == 0 and draws[0.0]["enhancement"] > 0  # LGG borrows HGG's range
    severity = [
        sample_params("atrophy", "CN", np.random.default_rng(i), separation=0.0)["severity"]
        for i in range(50)
    ]
    assert 0.175 <= min(severity) and max(severity) <= 0.75  # the average of AD's and CN's ranges

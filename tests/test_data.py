"""Discovery, labels, validation errors, preprocessing, cache reuse and splits of the shared DataModule."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import blob_volume, make_brats

from mrrl.data.datamodule import MRIDataModule
from mrrl.data.layouts import (
    DataValidationError,
    discover_brats,
    discover_oasis,
    oasis_label,
    write_oasis_csv,
)
from mrrl.data.splits import SplitError, load_or_create_splits, make_splits


def datamodule(root: Path, tmp_path: Path, fmt: str = "brats", **kw) -> MRIDataModule:
    options = dict(
        name=f"t{fmt}",
        format=fmt,
        root=root,
        image_size=16,
        cache_dir=tmp_path / "cache",
        split_path=tmp_path / "splits.json",
        test_per_class=1,
        val_fraction=0.25,
        progress=False,
        modalities=["flair"] if fmt == "brats" else ["t1"],
    )
    options.update(kw)
    return MRIDataModule(**options)


def problems_of(dm: MRIDataModule) -> str:
    with pytest.raises(DataValidationError) as info:
        dm.prepare_data()
    return str(info.value)


# ------------------------------------------------------------------------------------------ discovery


def test_brats_discovery_labels_and_modalities(brats_root: Path) -> None:
    subjects, problems = discover_brats(brats_root, ["t1", "flair"])
    assert problems == []
    assert len(subjects) == 8
    assert {s.label for s in subjects} == {"HGG", "LGG"}
    first = subjects[0]
    assert [p.name for p in first.files] == [f"{first.id}_t1.nii.gz", f"{first.id}_flair.nii.gz"]
    assert first.meta["seg"].endswith("_seg.nii.gz")


def test_brats_accepts_uncompressed_nii(tmp_path: Path) -> None:
    root = make_brats(tmp_path / "b", 1, 1, modalities=("flair",))
    for path in root.rglob("*_flair.nii.gz"):
        nib.save(nib.load(path), str(path).replace(".nii.gz", ".nii"))
        path.unlink()
    subjects, problems = discover_brats(root, ["flair"])
    assert problems == [] and all(s.files[0].suffix == ".nii" for s in subjects)


def test_oasis_discovery_and_cdr_rule(oasis_root: Path) -> None:
    subjects, problems = discover_oasis(oasis_root)
    assert problems == []
    labels = {s.id: s.label for s in subjects}
    assert sum(v == "AD" for v in labels.values()) == 4 and sum(v == "CN" for v in labels.values()) == 4
    assert "OAS1_0009_MR1" not in labels  # no CDR: left out by default
    subjects, _ = discover_oasis(oasis_root, missing_cdr_as_cn=True)
    assert {s.id: s.label for s in subjects}["OAS1_0009_MR1"] == "CN"
    assert (
        oasis_label(0.5) == "AD" and oasis_label(0.0) == "CN" and oasis_label(0.5, cdr_threshold=1.0) is None
    )
    assert oasis_label(None) is None and oasis_label(float("nan"), missing_cdr_as_cn=True) == "CN"


def test_oasis_ignores_mr2_sessions(oasis_root: Path) -> None:
    mr1 = next(oasis_root.glob("disc*/OAS1_0001_MR1"))
    mr2 = mr1.parent / "OAS1_0001_MR2"
    mr2.mkdir()
    subjects, problems = discover_oasis(oasis_root)
    assert problems == [] and all(s.id.endswith("_MR1") for s in subjects)


def test_oasis_volume_with_trailing_singleton_is_squeezed(oasis_root: Path, tmp_path: Path) -> None:
    image = next(oasis_root.rglob("*.img"))
    assert nib.load(image).shape[-1] == 1 and len(nib.load(image).shape) == 4
    dm = datamodule(oasis_root, tmp_path, fmt="oasis").prepare()
    assert dm.dataset("train")[0]["image"].shape == (1, 16, 16, 16)


# ------------------------------------------------------------------------------------------ bad input


def test_empty_and_missing_root(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "root is empty" in problems_of(datamodule(tmp_path / "empty", tmp_path))
    assert "does not exist" in problems_of(datamodule(tmp_path / "nowhere", tmp_path))


def test_missing_modality_is_named(brats_root: Path, tmp_path: Path) -> None:
    victim = next(brats_root.rglob("*_flair.nii.gz"))
    victim.unlink()
    message = problems_of(datamodule(brats_root, tmp_path))
    assert "missing modality 'flair'" in message and victim.parent.name in message


def test_case_folder_outside_classes(brats_root: Path, tmp_path: Path) -> None:
    (brats_root / "Other" / "case1").mkdir(parents=True)
    message = problems_of(datamodule(brats_root, tmp_path))
    assert "case folder outside HGG/LGG" in message and "Other" in message


def _replace_volume(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


@pytest.mark.parametrize(
    ("corruption", "expected"),
    [
        ("truncated", "unreadable, truncated or corrupt"),
        ("garbage", "unreadable, truncated or corrupt"),
        ("2d", "expected a 3D volume"),
        ("4d", "expected a 3D volume"),
        ("nan", "NaN/Inf voxels"),
        ("inf", "NaN/Inf voxels"),
        ("zeros", "empty (all zeros) volume"),
        ("constant", "constant (all voxels = 7) volume"),
    ],
)
def test_bad_volumes_are_named(brats_root: Path, tmp_path: Path, corruption: str, expected: str) -> None:
    victim = sorted(brats_root.rglob("*_flair.nii.gz"))[3]
    good = blob_volume(1)
    if corruption == "truncated":
        raw = gzip.decompress(victim.read_bytes())
        victim.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    elif corruption == "garbage":
        victim.write_bytes(b"not a nifti file at all" * 10)
    elif corruption == "2d":
        _replace_volume(victim, good[:, :, 0])
    elif corruption == "4d":
        _replace_volume(victim, np.stack([good, good], axis=-1))
    elif corruption in ("nan", "inf"):
        good[3, 4, 5] = np.nan if corruption == "nan" else np.inf
        _replace_volume(victim, good)
    elif corruption == "zeros":
        _replace_volume(victim, np.zeros_like(good))
    else:
        _replace_volume(victim, np.full_like(good, 7.0))
    message = problems_of(datamodule(brats_root, tmp_path))
    assert expected in message
    assert str(victim) in message
    assert message.count("\n  - ") == 1  # exactly one problem, on its own line


def test_all_problems_reported_at_once(brats_root: Path, tmp_path: Path) -> None:
    flair = sorted(brats_root.rglob("*_flair.nii.gz"))
    _replace_volume(flair[0], np.zeros((20, 24, 18), np.float32))
    _replace_volume(flair[1], np.full((20, 24, 18), np.nan, np.float32))
    with pytest.raises(DataValidationError) as info:
        datamodule(brats_root, tmp_path).prepare_data()
    assert len(info.value.problems) == 2
    assert not (tmp_path / "splits.json").exists()  # nothing written when the data is bad


def test_oasis_csv_problems(oasis_root: Path, tmp_path: Path) -> None:
    csv_path = oasis_root / "oasis_cross-sectional.csv"
    rows = [r for r in csv_path.read_text().splitlines()[1:] if not r.startswith("OAS1_0002_MR1")]
    csv_path.write_text("\n".join([csv_path.read_text().splitlines()[0], *rows]) + "\n")
    message = problems_of(datamodule(oasis_root, tmp_path, fmt="oasis"))
    assert "CSV row missing for OAS1_0002_MR1" in message

    write_oasis_csv(
        oasis_root, [{"ID": f"OAS1_{i:04d}_MR1", "CDR": 0.0 if i > 4 else 1.0} for i in range(1, 12)]
    )
    subjects, problems = discover_oasis(oasis_root, require_all_csv_images=True)
    assert any("OAS1_0011_MR1 has a CDR but no image" in str(p) for p in problems)
    csv_path.unlink()
    assert "CSV not found" in problems_of(datamodule(oasis_root, tmp_path, fmt="oasis"))


def test_unknown_modality_and_oasis_modality(brats_root: Path, oasis_root: Path, tmp_path: Path) -> None:
    assert "unknown modality" in problems_of(datamodule(brats_root, tmp_path, modalities=["dwi"]))
    assert "one modality" in problems_of(datamodule(oasis_root, tmp_path, fmt="oasis", modalities=["flair"]))


# ------------------------------------------------------------------------------------------ preprocessing


def test_batches_shapes_range_and_channels(brats_root: Path, tmp_path: Path) -> None:
    dm = datamodule(brats_root, tmp_path, modalities=["t1", "flair"], image_size=[16, 12, 8], batch_size=3)
    dm.prepare()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 2, 16, 12, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and isinstance(batch["id"][0], str)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert float(batch["image"].amin()) == -1.0  # background maps onto the low end of intensity_range
    assert dm.image_shape == (2, 16, 12, 8)


def test_orientation_is_ras(tmp_path: Path) -> None:
    """The same anatomy stored LPS and RAS on disk gives the same preprocessed volume."""
    vol = blob_volume(3, lesion=80.0)
    from mrrl.data.layouts import write_brats_case

    for name, affine, data in (
        ("ras", np.eye(4), vol),
        ("lps", np.diag([-1.0, -1.0, 1.0, 1.0]), vol[::-1, ::-1, :].copy()),
    ):
        root = tmp_path / name
        for grade in ("HGG", "LGG"):
            for i in range(2):
                write_brats_case(root, grade, f"{grade}{i}", {"flair": data}, affine)
    arrays = []
    for name in ("ras", "lps"):
        dm = datamodule(tmp_path / name, tmp_path / f"out_{name}", test_per_class=1, val_fraction=0)
        dm.prepare()
        arrays.append(dm.cache.load("HGG0"))
    np.testing.assert_allclose(arrays[0], arrays[1], atol=1e-5)


def test_cache_is_reused_and_invalidated(brats_root: Path, tmp_path: Path, monkeypatch) -> None:
    datamodule(brats_root, tmp_path).prepare()
    calls = []
    import mrrl.data.preprocess as pre

    original = pre.load_volume
    monkeypatch.setattr(pre, "load_volume", lambda p: calls.append(p) or original(p))
    datamodule(brats_root, tmp_path).prepare()
    assert calls == []  # second run decodes no NIfTI
    victim = sorted(brats_root.rglob("*_flair.nii.gz"))[0]
    _replace_volume(victim, blob_volume(99))
    os.utime(victim, ns=(1, 10**18))
    dm = datamodule(brats_root, tmp_path).prepare()
    assert calls == [victim]  # only the changed file is re-read
    datamodule(brats_root, tmp_path, image_size=12, split_path=tmp_path / "s2.json").prepare()
    assert len(calls) == 9  # new preprocessing settings = new cache entries
    assert dm.dataset("train")[0]["image"].shape[-1] == 16


def test_augmentation_only_on_train(brats_root: Path, tmp_path: Path) -> None:
    dm = datamodule(
        brats_root, tmp_path, augment={"flip_prob": 1.0, "flip_axes": [0], "crop_margin": 0}
    ).prepare()
    raw = torch.from_numpy(dm.cache.load(dm.datasets["train"].subjects[0].id))
    assert torch.equal(dm.datasets["train"][0]["image"], torch.flip(raw, dims=(1,)))
    val_id = dm.datasets["val"].subjects[0].id
    assert torch.equal(dm.datasets["val"][0]["image"], torch.from_numpy(dm.cache.load(val_id)))
    dm2 = datamodule(brats_root, tmp_path, augment={"flip_prob": 0.0, "flip_axes": [0], "crop_margin": 2})
    dm2.prepare()
    assert dm2.datasets["train"][0]["image"].shape == raw.shape


# ------------------------------------------------------------------------------------------ splits


def test_splits_counts_stratification_and_seed(tmp_path: Path) -> None:
    root = make_brats(tmp_path / "b", n_hgg=12, n_lgg=6, modalities=("flair",))
    subjects, _ = discover_brats(root)
    splits = make_splits(subjects, test_per_class=2, val_fraction=0.25, seed=0)
    labels = {s.id: s.label for s in subjects}
    count = {k: {c: sum(labels[i] == c for i in v) for c in ("HGG", "LGG")} for k, v in splits.items()}
    assert count["test"] == {"HGG": 2, "LGG": 2}
    assert count["val"] == {"HGG": 2, "LGG": 1} and count["train"] == {"HGG": 8, "LGG": 3}
    assert sorted(sum(splits.values(), [])) == sorted(labels)  # a partition
    assert make_splits(subjects, 2, 0.25, seed=0) == splits
    assert make_splits(subjects, 2, 0.25, seed=1) != splits
    with pytest.raises(SplitError, match="nothing would be left"):
        make_splits(subjects, test_per_class=6, val_fraction=0.1, seed=0)


def test_split_file_written_reused_and_overridden(brats_root: Path, tmp_path: Path) -> None:
    dm = datamodule(brats_root, tmp_path).prepare()
    payload = json.loads((tmp_path / "splits.json").read_text())
    assert payload["counts"]["test"] == {"HGG": 1, "LGG": 1}
    subjects, _ = discover_brats(brats_root)
    again = load_or_create_splits(subjects, tmp_path / "splits.json", 1, 0.25, 0, dataset="tbrats")
    assert again == dm.splits
    with pytest.raises(SplitError, match="same split"):
        load_or_create_splits(subjects, tmp_path / "splits.json", 1, 0.25, seed=5, dataset="tbrats")
    user = tmp_path / "mine.csv"
    ids = sorted(s.id for s in subjects)
    user.write_text(
        "id,split\n" + "".join(f"{i},{'test' if n < 3 else 'train'}\n" for n, i in enumerate(ids))
    )
    dm2 = datamodule(brats_root, tmp_path, split_file=str(user)).prepare()
    assert len(dm2.dataset("test")) == 3 and len(dm2.dataset("train")) == 5 and len(dm2.dataset("val")) == 0
    user.write_text("id,split\nnobody,train\n")
    with pytest.raises(SplitError, match="not in the dataset"):
        datamodule(brats_root, tmp_path, split_file=str(user)).prepare()


def test_summary_counts(brats_root: Path, tmp_path: Path) -> None:
    summary = datamodule(brats_root, tmp_path).prepare().summary()
    assert summary["counts"]["total"] == {"HGG": 4, "LGG": 4, "All": 8}
    assert summary["counts"]["test"]["All"] == 2 and summary["image_shape"] == [1, 16, 16, 16]
    assert len(summary["counts"]) == 4


def test_cohorts_with_the_same_subject_ids_get_their_own_cache(tmp_path: Path) -> None:
    """Two roots (e.g. phantom cohorts of another class_separation) never share preprocessed entries."""
    a = datamodule(tmp_path / "a", tmp_path)
    b = datamodule(tmp_path / "b", tmp_path)
    assert a.cache.dir != b.cache.dir and a.cache.dir.parent == b.cache.dir.parent
    assert datamodule(tmp_path / "a", tmp_path).cache.dir == a.cache.dir

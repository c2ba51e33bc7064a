"""``mrrl stage=export``: NIfTI cohorts in the dataset layouts, geometry, resume, ranks, weights, round trip."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_brats, make_oasis
from helpers import TINY_DATA, TINY_VQGAN, compose_cfg, run_mrrl, tiny_checkpoints

from mrrl.errors import ConfigError, ManifestError
from mrrl.evaluation.sources import GenerationSettings, ModelSpec, load_volume_files
from mrrl.export.cohort import Block, Case, plan_blocks
from mrrl.export.geometry import subject_geometry
from mrrl.export.weights import load_exported_model
from mrrl.stages import check_data as check_data_stage
from mrrl.stages import export as export_stage
from mrrl.stages import vqgan as vqgan_stage
from mrrl.training.runtime import build_datamodule

CLASSES = ["HGG", "LGG"]
N, BATCH = 3, 2  # 3 cases per class in blocks of 2: one full and one partial block per class


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("export")
    torch.set_num_threads(1)
    return {
        "base": base,
        "data": make_brats(base / "brats", n_hgg=4, n_lgg=4, modalities=("flair",)),
        "ckpt": tiny_checkpoints(base / "ckpt", CLASSES),
    }


def export_cfg(setup: dict, *extra: str, name: str = "ex", data: str = "brats2019", root: Path | None = None):
    return compose_cfg(
        [
            "stage=export",
            f"data={data}",
            f"data.root={root or setup['data']}",
            f"experiment_name={name}",
            *TINY_DATA,
            f"stage.ckpt={setup['ckpt']['diffusion']}",
            f"stage.n_per_class={N}",
            "stage.num_steps=3",
            f"stage.sample_batch_size={BATCH}",
            "logger=none",
            *extra,
        ],
        setup["base"] / "runs",
    )


def run_export(cfg):
    return export_stage.run(cfg, Path(cfg.paths.run_root) / cfg.experiment_name / "export")


@pytest.fixture(scope="module")
def exported(setup: dict) -> dict:
    cfg = export_cfg(setup)
    outputs = run_export(cfg)
    return {"cfg": cfg, "outputs": outputs, "cohort": Path(outputs["cohort"])}


def cohort_arrays(cohort: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(cohort)): np.asanyarray(nib.load(p).dataobj) for p in cohort.rglob("*.nii.gz")}


# ---------------------------------------------------------------------------------------------- the files


def test_every_file_has_the_training_grid_and_says_synthetic(setup: dict, exported: dict) -> None:
    datamodule = build_datamodule(exported["cfg"]).prepare()
    train = datamodule.dataset("train").subjects
    recorded = [json.loads(datamodule.cache.array_path(s.id).with_suffix(".json").read_text()) for s in train]
    assert all(r["geometry"]["axcodes"] == "RAS" for r in recorded)  # kept by preprocessing
    spacing = np.median([r["geometry"]["spacing_mm"] for r in recorded], axis=0)
    assert not np.allclose(spacing, 1.0)  # the real grid, not an invented 1 mm one
    files = sorted(exported["cohort"].rglob("*.nii.gz"))
    assert len(files) == 2 * N
    for path in files:
        image = nib.load(path)
        assert image.shape == (16, 16, 16)
        assert np.allclose(image.header.get_zooms(), spacing, atol=1e-5)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
        assert b"SYNTHETIC" in bytes(image.header["descrip"])
        assert np.isfinite(image.get_fdata()).all() and image.get_fdata().std() > 0


def test_geometry_of_caches_made_before_it_was_recorded_is_recomputed(exported: dict) -> None:
    datamodule = build_datamodule(exported["cfg"]).prepare()
    subject = datamodule.dataset("train").subjects[0]
    meta_path = datamodule.cache.array_path(subject.id).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    old = {k: v for k, v in meta.items() if k != "geometry"}
    meta_path.write_text(json.dumps(old))
    try:
        again = subject_geometry(datamodule.cache, subject)
        assert again["axcodes"] == meta["geometry"]["axcodes"]
        for key in ("affine", "spacing_mm", "source_range"):
            np.testing.assert_allclose(again[key], meta["geometry"][key], rtol=1e-6)
    finally:
        meta_path.write_text(json.dumps(meta))


def test_labels_csv_matches_the_files(exported: dict) -> None:
    cohort = exported["cohort"]
    rows = list(csv.DictReader((cohort / "labels.csv").open()))
    assert [r["class"] for r in rows] == ["HGG"] * N + ["LGG"] * N
    assert len({r["case"] for r in rows}) == len(rows)
    listed = {r["files"] for r in rows}
    on_disk = {str(p.relative_to(cohort)) for p in cohort.rglob("*.nii.gz")}
    assert listed == on_disk
    for r in rows:
        assert Path(r["files"]).parts[:2] == (r["class"], r["case"])
    # The seed column reproduces a case: item seed_index of generate_volumes(..., manual_seed(seed)).
    assert len({(r["seed"], r["seed_index"]) for r in rows}) == len(rows)
    assert {r["seed_index"] for r in rows} == {"0", "1"}


def test_provenance_names_checkpoint_hash_settings_and_quality(setup: dict, exported: dict) -> None:
    provenance = json.loads((exported["cohort"] / "provenance.json").read_text())
    ckpt = Path(setup["ckpt"]["diffusion"])
    assert provenance["checkpoint"]["path"] == str(ckpt.resolve())
    assert provenance["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert provenance["sampling"]["sampler"] == "ddim" and provenance["sampling"]["num_steps"] == 3
    assert provenance["sampling"]["eta"] == 0.0 and provenance["sampling"]["guidance_scale"] == 1.0
    assert provenance["seed"] == 0 and provenance["mrrl_version"]
    assert provenance["synthetic"] is True
    quality = provenance["quality"]
    for c in CLASSES:
        assert quality["synthetic"][c]["n"] == N
        assert 0.0 <= quality["synthetic"][c]["foreground_fraction"][0] <= 1.0
        assert quality["real_train"][c]["n"] >= 1
    card = (Path(exported["outputs"]["model"]["model_card"])).read_text()
    assert "not for clinical diagnosis" in card and provenance["checkpoint"]["sha256"] in card


# ---------------------------------------------------------------------------------------------- round trip


def test_exported_cohort_passes_check_data_and_trains_a_vqgan(setup: dict, exported: dict) -> None:
    cohort = exported["cohort"]
    args = ["data=brats2019", f"data.root={cohort}", "experiment_name=back", *TINY_DATA, "logger=none"]
    cfg = compose_cfg(["stage=check_data", *args], setup["base"] / "runs")
    summary = check_data_stage.run(cfg, setup["base"] / "runs" / "back" / "check_data")
    assert summary["counts"]["total"] == {"HGG": N, "LGG": N, "All": 2 * N}
    cfg = compose_cfg(
        [
            "stage=vqgan",
            *args,
            *TINY_VQGAN,
            "stage.trainer.max_epochs=1",
            "stage.latents.export=false",
        ],
        setup["base"] / "runs",
    )
    outputs = vqgan_stage.run(cfg, setup["base"] / "runs" / "back" / "vqgan")
    assert Path(outputs["last_ckpt"]).is_file()


def test_source_intensities_map_back_and_classify_reads_the_cohort(setup: dict, exported: dict) -> None:
    out = setup["base"] / "source_cohort"
    outputs = run_export(export_cfg(setup, "stage.intensity=source", f"stage.out_dir={out}", name="src"))
    provenance = json.loads((out / "provenance.json").read_text())
    lo, hi = provenance["intensity"]["source_range"][0]
    assert hi > 10  # the blob phantoms' source intensities, not [-1, 1]
    values = np.concatenate([np.asarray(nib.load(p).dataobj).ravel() for p in out.rglob("*.nii.gz")])
    assert lo - 1e-3 <= values.min() and values.max() <= hi + 1e-3
    assert outputs["n_cases"] == 2 * N
    # An exported folder is an extra generator for classify / evaluate, read back into the model range.
    for cohort in (exported["cohort"], out):
        spec = ModelSpec("synthetic", "synthetic", "volumes", str(cohort))
        volumes = load_volume_files(spec, CLASSES, (1, 16, 16, 16))
        assert {c: tuple(v.shape) for c, v in volumes.items()} == {c: (N, 1, 16, 16, 16) for c in CLASSES}
        if cohort == exported["cohort"]:
            reference = volumes
    for c in CLASSES:
        assert torch.allclose(volumes[c], reference[c], atol=1e-4)


def test_oasis_layout_with_its_csv_passes_check_data(setup: dict, tmp_path: Path) -> None:
    oasis = make_oasis(tmp_path / "oasis", n_ad=3, n_cn=3, n_nocdr=0)
    ckpt = tiny_checkpoints(tmp_path / "ckpt", ["AD", "CN"])
    cfg = export_cfg(setup, f"stage.ckpt={ckpt['diffusion']}", name="oas", data="oasis1", root=oasis)
    outputs = run_export(cfg)
    cohort = Path(outputs["cohort"])
    images = sorted(cohort.rglob("*.img"))
    assert len(images) == 2 * N and all(p.with_suffix(".hdr").is_file() for p in images)
    image = nib.load(images[0])
    assert isinstance(image, nib.Nifti1Pair) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert b"SYNTHETIC" in bytes(image.header["descrip"])
    back = compose_cfg(
        ["stage=check_data", "data=oasis1", f"data.root={cohort}", "experiment_name=oasback", *TINY_DATA],
        setup["base"] / "runs",
    )
    summary = check_data_stage.run(back, tmp_path / "check")
    assert summary["counts"]["total"] == {"AD": N, "CN": N, "All": 2 * N}


# ---------------------------------------------------------------------------------------------- resume


def test_interrupted_export_resumes_without_duplicates(setup: dict, exported: dict, monkeypatch) -> None:
    cfg = export_cfg(setup, name="resume")
    real_write, written, sampled = export_stage.write_case, [], []

    def dying_write(layout, root, case, *args):
        if len(written) == 4:
            raise KeyboardInterrupt  # stopped mid-export: every HGG case and the first LGG one written
        written.append(case.id)
        return real_write(layout, root, case, *args)

    monkeypatch.setattr(export_stage, "write_case", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_export(cfg)
    cohort = Path(cfg.paths.run_root) / "resume" / "export" / "cohort"
    assert len(list(cohort.rglob("*.nii.gz"))) == 4 and not (cohort / "labels.csv").exists()
    monkeypatch.setattr(export_stage, "write_case", real_write)
    real_sample = export_stage.Models.sample
    monkeypatch.setattr(
        export_stage.Models, "sample", lambda self, b, *a: sampled.append(b) or real_sample(self, b, *a)
    )
    outputs = run_export(cfg)
    assert outputs["made_this_run"] == 2 * N - 4
    # The two LGG blocks (the cut one again, whole: its seed draws all its cases), no HGG block.
    assert [(b.class_name, len(b.cases)) for b in sampled] == [("LGG", 2), ("LGG", 1)]
    assert not [p for p in cohort.rglob(".*") if p.name != ".export_plan.json"]  # no temp files left
    assert cohort_arrays(cohort).keys() == cohort_arrays(exported["cohort"]).keys()
    for key, array in cohort_arrays(cohort).items():
        np.testing.assert_array_equal(array, cohort_arrays(exported["cohort"])[key])
    sampled.clear()
    assert run_export(cfg) is None and not sampled  # finished: skipped


def test_other_settings_into_the_same_folder_need_force(setup: dict, exported: dict) -> None:
    with pytest.raises(ConfigError, match="stage.force=true") as info:
        run_export(export_cfg(setup, "stage.n_per_class=2"))
    assert "\n" not in str(info.value)
    outputs = run_export(export_cfg(setup, "stage.n_per_class=2", "stage.force=true", name="forced"))
    assert outputs["n_cases"] == 4


def test_bad_input_gives_one_line_errors(setup: dict, tmp_path: Path) -> None:
    cases = [
        (["stage.ckpt=" + str(tmp_path / "nope.ckpt")], ConfigError, "does not exist"),
        (["stage.n_per_class=0"], ConfigError, "n_per_class must be >= 1"),
        (["stage.n_per_class=-3"], ConfigError, "n_per_class must be >= 1"),
        (["stage.intensity=hounsfield"], ConfigError, "stage.intensity must be one of"),
        (["stage.sampler=euler"], ConfigError, "stage.sampler must be one of"),
        (["stage.ckpt=null", "stage.model=rl"], ManifestError, "no checkpoint to export"),
    ]
    for extra, error, message in cases:
        with pytest.raises(error, match=message) as info:
            run_export(export_cfg(setup, *extra, name="bad"))
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="OAS1_0001"):
        plan_blocks("oasis", ["AD", "CN"], 5000, 4, 0)


def test_blocks_are_the_unit_of_seeds() -> None:
    blocks = plan_blocks("brats", CLASSES, 5, 2, seed=7)
    assert [len(b.cases) for b in blocks] == [2, 2, 1, 2, 2, 1]
    assert len({b.seed for b in blocks}) == len(blocks)
    assert blocks == plan_blocks("brats", CLASSES, 5, 2, seed=7)
    assert all(isinstance(b, Block) and isinstance(b.cases[0], Case) for b in blocks)


# ---------------------------------------------------------------------------------------------- ranks


def test_two_ddp_ranks_write_disjoint_cases_whose_union_is_the_single_process_export(
    setup: dict, exported: dict
) -> None:
    run_root = setup["base"] / "ddp_runs"
    result = run_mrrl(
        "stage=export",
        "data=brats2019",
        f"data.root={setup['data']}",
        "experiment_name=ddp",
        *TINY_DATA,
        f"stage.ckpt={setup['ckpt']['diffusion']}",
        f"stage.n_per_class={N}",
        "stage.num_steps=3",
        f"stage.sample_batch_size={BATCH}",
        "stage.weights=false",
        "logger=none",
        "trainer=ddp_cpu",
        f"paths.run_root={run_root}",
        env={"OMP_NUM_THREADS": "1"},
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((run_root / "ddp" / "export" / "manifest.json").read_text())["outputs"]
    rank0, rank1 = (set(ids) for ids in manifest["written_by_rank"])
    assert rank0 and rank1 and not rank0 & rank1
    rows = list(csv.DictReader((exported["cohort"] / "labels.csv").open()))
    assert rank0 | rank1 == {r["case"] for r in rows}
    ddp, single = cohort_arrays(Path(manifest["cohort"])), cohort_arrays(exported["cohort"])
    assert ddp.keys() == single.keys()
    for key in single:
        np.testing.assert_allclose(ddp[key], single[key], atol=1e-5)


# ---------------------------------------------------------------------------------------------- weights


def test_safetensors_weights_reload_without_pickle_to_identical_samples(
    setup: dict, exported: dict, monkeypatch
) -> None:
    cfg = exported["cfg"]
    reference = export_stage.Models(cfg, setup["ckpt"]["diffusion"], CLASSES, torch.device("cpu"))
    model_dir = Path(exported["outputs"]["model"]["model_card"]).parent

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) called")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_exported_model(model_dir)
    assert loaded.diffusion.class_names == CLASSES
    settings = GenerationSettings(n_per_class=N, num_steps=3, batch_size=BATCH)
    block = plan_blocks("brats", CLASSES, N, BATCH, 0)[1]
    expected = reference.sample(block, settings, (-1.0, 1.0))
    reference.loaded, reference.vqgan = loaded.diffusion, loaded.vqgan
    assert torch.equal(reference.sample(block, settings, (-1.0, 1.0)), expected)


def test_model_card_shows_the_table2_row_training_and_reward_accuracy(tmp_path: Path) -> None:
    from mrrl.export.model_card import render_model_card
    from mrrl.manifest import write_manifest

    exp, ckpt = tmp_path / "exp", tmp_path / "final.ckpt"
    ckpt.write_bytes(b"weights")
    fids = {"HGG": 12.5, "LGG": 14.0, "All": 13.25}
    metrics = {
        "classes": CLASSES,
        "split": "test",
        "models": [{"key": "rl", "label": "RL fine-tuned", "source": str(ckpt), "n_per_class": {"HGG": 3}}],
        "extractors": [{"name": "random3d"}],
        "scores": [
            {"model": "rl", "extractor": "random3d", "class": c, "fid": f, "fid_ci_low": f - 1}
            for c, f in fids.items()
        ],
    }
    (exp / "evaluate").mkdir(parents=True)
    (exp / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
    write_manifest(exp / "evaluate", "evaluate", {"metrics_json": str(exp / "evaluate" / "metrics.json")})
    write_manifest(
        exp / "reward", "reward", {"models": {"r3d": {"val": {"rank_acc": 0.75, "spearman": 0.5}}}}
    )
    write_manifest(exp / "ppo", "ppo", {"final_ckpt": str(ckpt), "iterations": 7, "skipped_updates": 0})
    write_manifest(exp / "diffusion", "diffusion", {"global_step": 123, "val_loss": 0.05})
    provenance = {
        "model": "rl",
        "checkpoint": {"path": str(ckpt), "sha256": "abc123", "vqgan_path": str(tmp_path / "vq.ckpt")},
        "classes": CLASSES,
        "image_shape": [1, 16, 16, 16],
        "modalities": ["flair"],
        "sampling": {"sampler": "ddim", "num_steps": 3, "eta": 0.0, "guidance_scale": 1.0},
        "mrrl_version": "0.1.0",
    }
    summary = {"dataset": "brats2019", "root": "/data", "counts": {"total": {"HGG": 4, "LGG": 4, "All": 8}}}
    card = render_model_card(exp, provenance, summary, "rl")
    assert "| random3d FID | 12.5 (fid_ci_low 11.5) | 14 (fid_ci_low 13) | 13.25 (fid_ci_low 12.25) |" in card
    assert "r3d: val ranking accuracy 0.75" in card
    assert "123 steps" in card and "7 iterations" in card
    assert "not for clinical diagnosis" in card and "abc123" in card
    bare = render_model_card(tmp_path / "none", provenance, summary, "checkpoint")
    assert "No evaluate manifest" in bare and "No reward manifest" in bare

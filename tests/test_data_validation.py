"""Bad input (issue 17, data and config half): every defect of a cohort listed in one pass, one line
naming the file; duplicate OASIS IDs refused; corrupt cache files rebuilt; stale phantom temp folders
removed; bad config values as one line. docs/bad_input.md tabulates what each defect prints. (The data
errors through the real CLI: tests/test_cli.py::test_check_data_bad_input_exits_nonzero_with_named_files.)"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_volume, make_brats, make_oasis
from helpers import compose_cfg, run_mrrl

from mrrl.config_checks import check_config, config_problems
from mrrl.data import validation as checks
from mrrl.data.datamodule import MRIDataModule
from mrrl.data.layouts import DataValidationError, discover_brats, discover_oasis, write_oasis_csv
from mrrl.data.phantom import _TempLock, remove_stale_temp_dirs
from mrrl.data.splits import SplitError, make_splits
from mrrl.errors import ConfigError, MrrlError
from mrrl.stages.check_data import format_left_out

SHAPE = (10, 12, 9)  # tiny volumes: the whole file runs in seconds


def datamodule(root: Path, tmp_path: Path, fmt: str = "brats", **kw) -> MRIDataModule:
    options = dict(
        name=f"v{fmt}",
        format=fmt,
        root=root,
        image_size=8,
        cache_dir=tmp_path / "cache",
        split_path=tmp_path / "splits.json",
        test_per_class=1,
        val_fraction=0.25,
        progress=False,
        modalities=["flair"] if fmt == "brats" else ["t1"],
    )
    options.update(kw)
    return MRIDataModule(**options)


def problems_of(dm: MRIDataModule) -> list[str]:
    """The error's problem lines; also checks it is the CLI's error type and one line per problem."""
    with pytest.raises(DataValidationError) as info:
        dm.prepare_data()
    assert isinstance(info.value, MrrlError)  # the CLI prints it without a traceback, exit status 1
    lines = [str(p) for p in info.value.problems]
    assert all("\n" not in line for line in lines), lines
    return lines


def only(lines: list[str], needle: str) -> str:
    found = [line for line in lines if needle in line]
    assert len(found) == 1, (needle, lines)
    return found[0]


def small_brats(root: Path, n: int = 3, modalities=("t1", "flair")) -> Path:
    make_brats(root, n_hgg=n, n_lgg=n, modalities=modalities)
    for path in root.rglob("*.nii.gz"):  # shrink to SHAPE: faster preprocessing
        if not path.name.endswith("_seg.nii.gz"):
            image = nib.load(path)
            save(path, np.asarray(image.dataobj)[: SHAPE[0], : SHAPE[1], : SHAPE[2]] + 1, image.affine)
    return root


def save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def save_with_sform(path: Path, srow_x: list[float]) -> None:
    """A NIfTI whose sform (code 1) has the given first row; qform unset, so nibabel uses the sform."""
    data = blob_volume(5, shape=SHAPE) + 1
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = srow_x, [0, 1, 0, 0], [0, 0, 1, 0]
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(data, None, header=header), path)


def case_file(root: Path, grade: str, index: int, modality: str) -> Path:
    case = f"BraTS19_TEST_{grade}_{index:03d}"
    return root / grade / case / f"{case}_{modality}.nii.gz"


def truncate(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))


# ------------------------------------------------------------------------------------------ one pass


def test_every_defect_of_a_cohort_is_listed_in_one_run(tmp_path: Path) -> None:
    root = small_brats(tmp_path / "brats", n=5)
    missing = case_file(root, "HGG", 0, "flair")
    missing.unlink()
    truncate(case_file(root, "HGG", 0, "t1"))  # same case as the missing modality: still checked
    truncated = case_file(root, "HGG", 1, "flair")
    truncate(truncated)
    nan = case_file(root, "HGG", 2, "flair")
    volume = blob_volume(1, shape=SHAPE) + 1
    volume[1, 2, 3] = np.nan
    save(nan, volume)
    nan_sform = case_file(root, "HGG", 3, "flair")
    save_with_sform(nan_sform, [np.nan, 0, 0, 0])
    singular = case_file(root, "LGG", 0, "flair")
    save_with_sform(singular, [0, 0, 0, 0])
    overflow = case_file(root, "LGG", 1, "flair")
    big = (blob_volume(2, shape=SHAPE) + 1).astype(np.float64)
    big[2, 2, 2] = 1e300
    save(overflow, big)
    mismatch = case_file(root, "LGG", 2, "flair")
    save(mismatch, blob_volume(3, shape=(8, 8, 8)) + 1)
    dangling = case_file(root, "LGG", 3, "flair")
    dangling.unlink()
    dangling.symlink_to(tmp_path / "gone.nii.gz")
    renamed = case_file(root, "HGG", 4, "flair")
    for path in renamed.parent.iterdir():
        path.rename(path.with_name(path.name.replace("HGG_004", "HGG_099")))

    lines = problems_of(datamodule(root, tmp_path, modalities=["t1", "flair"]))

    assert "missing modality 'flair'" in only(lines, f"{missing.parent}:")
    assert "unreadable, truncated or corrupt" in only(lines, str(case_file(root, "HGG", 0, "t1")))
    assert "unreadable, truncated or corrupt" in only(lines, str(truncated))
    assert "1 NaN/Inf voxels" in only(lines, str(nan))
    assert "affine from the sform holds NaN/Inf" in only(lines, str(nan_sform))
    assert "affine from the sform is singular" in only(lines, str(singular))
    line = only(lines, str(overflow))
    assert "overflow float32" in line and "1e+300" in line and "NaN" not in line
    line = only(lines, str(mismatch))
    assert "shape (8, 8, 8) differs from" in line and f"shape {SHAPE}" in line
    assert "broken symlink" in only(lines, str(dangling)) and "missing modality" not in only(lines, "LGG_003")
    assert "found BraTS19_TEST_HGG_099_t1.nii.gz: files must be named after their case folder" in only(
        lines, f"{renamed.parent}: missing modality 't1'"
    )
    assert "found BraTS19_TEST_HGG_099_flair.nii.gz" in only(
        lines, f"{renamed.parent}: missing modality 'flair'"
    )
    assert len(lines) == 11
    assert not (tmp_path / "splits.json").exists()


def test_unreadable_case_folder_and_file_say_permission(tmp_path: Path, monkeypatch) -> None:
    root = small_brats(tmp_path / "brats", n=2, modalities=("flair",))
    locked_case = case_file(root, "HGG", 0, "flair").parent
    locked_file = case_file(root, "LGG", 1, "flair")
    real_iterdir, real_access = Path.iterdir, os.access

    def iterdir(self):  # what a folder without read permission does for a non-root user
        if self == locked_case:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setattr(checks.os, "access", lambda p, mode: Path(p) != locked_file and real_access(p, mode))
    lines = problems_of(datamodule(root, tmp_path))
    assert "permission denied" in only(lines, f"{locked_case}:")
    assert "permission denied" in only(lines, str(locked_file))
    assert "missing modality" not in " ".join(lines)
    assert "permission denied" in checks.read_error(PermissionError(13, "Permission denied"))


NOBODY = 65534  # uid/gid of `nobody`: the permission test's reader when the suite runs as root


def locked_cohort(base: Path) -> tuple[Path, Path, Path]:
    """A cohort whose HGG case folder and one LGG file have mode 0: (root, locked folder, locked file)."""
    root = small_brats(base / "brats", n=2, modalities=("flair",))
    case_dir = case_file(root, "HGG", 0, "flair").parent
    unreadable = case_file(root, "LGG", 0, "flair")
    case_dir.chmod(0)
    unreadable.chmod(0)
    return root, case_dir, unreadable


def _problems_in_child(root: Path, work: Path, connection) -> None:
    try:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        except PermissionError as exc:
            connection.send(("no setuid", str(exc)))
            return
        connection.send(("ok", problems_of(datamodule(root, work))))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent's assertion
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        connection.close()


def problems_as_nobody(root: Path, work: Path) -> list[str]:
    """The validator's lines for ``root`` from a forked child that dropped to ``nobody`` (root reads every
    file whatever its mode, so a suite running as root checks real permissions through an unprivileged
    reader). Forked, not exec'd: the interpreter may live where ``nobody`` cannot run it (/root/.pyenv)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_problems_in_child, args=(root, work, send))
    child.start()
    send.close()
    status, payload = receive.recv() if receive.poll(120) else ("error", "no answer within 120 s")
    child.join(30)
    if child.is_alive():
        child.kill()
    if status == "no setuid":  # a container without CAP_SETUID: no unprivileged reader to be had
        pytest.skip(f"running as root and cannot switch to uid {NOBODY}: {payload}")
    assert status == "ok", payload
    return payload


def test_real_permissions(tmp_path: Path) -> None:
    """Real modes, no mocks: as a normal user directly; as root through a child process running as nobody."""
    if os.geteuid() != 0:
        root, case_dir, unreadable = locked_cohort(tmp_path)
        try:
            lines = problems_of(datamodule(root, tmp_path))
        finally:
            case_dir.chmod(0o755)
    else:
        import shutil
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="mrrl-permissions-"))  # pytest's tmp_path is root-only (0700)
        try:
            base.chmod(0o755)
            work = base / "work"
            work.mkdir()
            os.chown(work, NOBODY, NOBODY)
            root, case_dir, unreadable = locked_cohort(base)
            for path in root.rglob("*"):  # everything else readable by others, whatever the umask
                if path not in (case_dir, unreadable) and case_dir not in path.parents:
                    path.chmod(0o755 if path.is_dir() else 0o644)
            root.chmod(0o755)
            lines = problems_as_nobody(root, work)
        finally:
            for path in (case_dir, base):
                if path.exists():
                    path.chmod(0o755)
            shutil.rmtree(base, ignore_errors=True)
    assert "permission denied" in only(lines, f"{case_dir}:")
    assert "permission denied" in only(lines, str(unreadable))


# ------------------------------------------------------------------------------------------ OASIS


def _oasis_rows(root: Path) -> list[dict[str, str]]:
    import csv

    with (root / "oasis_cross-sectional.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_duplicate_oasis_id_is_refused(tmp_path: Path) -> None:
    root = make_oasis(tmp_path / "oasis", n_ad=2, n_cn=2, n_nocdr=0)
    rows = _oasis_rows(root)
    rows.append({**rows[0], "CDR": "0.0"})  # OAS1_0001_MR1: CDR 1.0 on line 2, then 0.0 on line 6
    write_oasis_csv(root, rows)
    csv_path = root / "oasis_cross-sectional.csv"
    lines = problems_of(datamodule(root, tmp_path, fmt="oasis"))
    assert lines == [
        f"{csv_path}: OAS1_0001_MR1 appears twice in oasis_cross-sectional.csv "
        "(lines 2 and 6, CDR 1.0 vs 0.0): keep one row per subject"
    ]
    subjects, _ = discover_oasis(root)
    assert "OAS1_0001_MR1" not in {s.id for s in subjects}  # never silently labelled


def test_left_out_oasis_subjects_are_counted_and_named(tmp_path: Path) -> None:
    root = make_oasis(tmp_path / "oasis", n_ad=3, n_cn=3, n_nocdr=1)
    rows = _oasis_rows(root)
    rows[0]["CDR"] = "0.3"  # below the 0.5 threshold: neither AD nor CN
    write_oasis_csv(root, rows)
    dm = datamodule(root, tmp_path, fmt="oasis").prepare()
    left_out = dm.summary()["left_out"]
    assert {e["id"]: e["reason"] for e in left_out} == {
        "OAS1_0001_MR1": "0 < CDR < data.cdr_threshold=0.5",
        "OAS1_0007_MR1": "no CDR",
    }
    lines = format_left_out(left_out)
    assert (
        "left out 1 subject(s), no CDR (data.missing_cdr_as_cn=true labels them CN): OAS1_0007_MR1" in lines
    )
    assert "left out 1 subject(s), 0 < CDR < data.cdr_threshold=0.5: OAS1_0001_MR1" in lines
    many = format_left_out([{"id": f"S{i}", "reason": "no CDR"} for i in range(12)])
    assert many[0].startswith("left out 12 subject(s)") and "2 more in manifest.json" in many[0]


def test_split_messages_name_real_keys(tmp_path: Path) -> None:
    root = make_brats(tmp_path / "b", n_hgg=2, n_lgg=2, modalities=("flair",))
    subjects, _ = discover_brats(root)
    with pytest.raises(SplitError, match=r"lower data\.test_per_class") as info:
        make_splits(subjects, test_per_class=5, val_fraction=0.1, seed=0)
    assert "data.split." not in str(info.value)
    with pytest.raises(SplitError, match=r"data\.val_fraction must be"):
        make_splits(subjects, test_per_class=1, val_fraction=1.5, seed=0)
    for path in (Path(__file__).parent.parent / "mrrl").rglob("*.py"):
        assert "data.split." not in path.read_text(), path


# ------------------------------------------------------------------------------------------ cache


def _junk(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes((b"\x00junk" * size)[:size])  # same size: only the header check can tell


CORRUPTIONS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:100]), "truncated"),
    "junk": (_junk, "not a valid .npy"),
    "all-nan": (lambda p: np.save(p, np.full_like(np.load(p), np.nan)), "checksum mismatch"),
    "wrong-shape": (lambda p: np.save(p, np.zeros((1, 4, 4, 4), np.float32)), "shape (1, 4, 4, 4)"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_cache_files_are_detected_and_rebuilt(tmp_path: Path, kind: str, caplog) -> None:
    root = small_brats(tmp_path / "brats", n=2, modalities=("flair",))
    dm = datamodule(root, tmp_path).prepare()
    subject = dm.datasets["train"].subjects[0]
    path = dm.cache.array_path(subject.id)
    good = np.load(path)
    corrupt, reason = CORRUPTIONS[kind]

    corrupt(path)  # check_data: every checksum verified up front
    check = datamodule(root, tmp_path, verify_checksums=True).prepare()
    assert [p for p, _ in check.cache.rebuilt] == [path] and reason in check.cache.rebuilt[0][1]
    assert check.summary()["cache_rebuilt"] == [{"file": str(path), "reason": check.cache.rebuilt[0][1]}]
    assert "rebuilt 1 corrupt cache file(s)" in caplog.text and path.name in caplog.text
    np.testing.assert_array_equal(np.load(path), good)

    corrupt(path)  # any other stage: size and header checked up front, the checksum on first read
    stage = datamodule(root, tmp_path).prepare()
    index = [s.id for s in stage.datasets["train"].subjects].index(subject.id)
    image = stage.datasets["train"][index]["image"].numpy()
    np.testing.assert_array_equal(image, good)
    assert [p for p, _ in stage.cache.rebuilt] == [path]


def test_cache_sidecar_records_checksum_and_a_bad_source_is_named_on_read(tmp_path: Path) -> None:
    import json

    root = small_brats(tmp_path / "brats", n=2, modalities=("flair",))
    dm = datamodule(root, tmp_path).prepare()
    subject = dm.datasets["train"].subjects[0]
    meta = json.loads(dm.cache.array_path(subject.id).with_suffix(".json").read_text())
    assert {"shape", "dtype", "bytes", "crc32"} <= set(meta) and meta["dtype"] == "float32"
    subject.files[0].write_bytes(b"garbage")  # the source went bad after preprocessing: not rebuildable
    with pytest.raises(DataValidationError, match="unreadable, truncated or corrupt") as info:
        dm.dataset("train")[0]
    assert str(subject.files[0]) in str(info.value)


# ------------------------------------------------------------------------------------------ phantom temp


def _fake_temp(parent: Path, name: str) -> Path:
    folder = parent / name
    (folder / "HGG" / "Phantom_HGG_0001").mkdir(parents=True)
    (folder / "HGG" / "Phantom_HGG_0001" / "x.nii.gz").write_bytes(b"partial")
    return folder


def test_stale_phantom_temp_folders_are_removed(tmp_path: Path) -> None:
    stale = _fake_temp(tmp_path, ".phantom_tumor-n40-s0-r3.0.tmp-0123abcd")
    old = _fake_temp(tmp_path, ".phantom_tumor-n40-s0-r3.0.old-89abcdef")
    running = _fake_temp(tmp_path, ".phantom_tumor-n2-s0-r6.0.tmp-fedcba98")
    foreign = tmp_path / ".mine.tmp-00000000"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    orphan_lock = tmp_path / ".phantom_x.tmp-11111111.lock"
    orphan_lock.write_text("")
    with _TempLock(running):  # a generation in progress (this process holds its lock)
        removed = remove_stale_temp_dirs(tmp_path)
        assert running.is_dir()
    assert sorted(removed) == sorted([stale, old])
    assert not stale.exists() and not old.exists() and foreign.is_dir() and not orphan_lock.exists()
    assert remove_stale_temp_dirs(tmp_path) == [running]  # its lock is free now: a killed generation


def test_phantom_generation_cleans_what_a_killed_one_left(tmp_path: Path) -> None:
    from mrrl.data.phantom import make_phantom_cohort

    stale = _fake_temp(tmp_path, ".c.tmp-0123abcd")
    make_phantom_cohort("tumor", tmp_path / "c", 1, seed=0, resolution_mm=8.0, progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# ------------------------------------------------------------------------------------------ config


BAD_CONFIG = {
    "data.image_size=abc": "data.image_size=abc: expected a positive int or [D, H, W]",
    "data.image_size=[8,8]": "data.image_size=[8, 8]: expected",
    "data.batch_size=0": "data.batch_size=0: expected an int >= 1",
    "data.val_fraction=1.0": "data.val_fraction=1.0: expected a number in [0, 1)",
    "data.percentiles=[99,1]": "data.percentiles=[99, 1]: expected",
    "seed=x": "seed=x: expected an int",
    "trainer.precision=17": "trainer.precision=17: expected one of",
}


def test_bad_config_values_are_one_line(tmp_path: Path) -> None:
    for override, expected in BAD_CONFIG.items():
        cfg = compose_cfg([override], tmp_path)
        with pytest.raises(ConfigError) as info:
            check_config(cfg)
        message = str(info.value)
        assert expected in message and "\n" not in message, (override, message)
    cfg = compose_cfg(["stage=vqgan", "stage.trainer.max_epochs=abc"], tmp_path)
    assert config_problems(cfg) == [
        "stage.trainer.max_epochs=abc: expected null or an int >= -1 (-1: no limit)"
    ]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = compose_cfg([], blocker / "runs")
    assert config_problems(cfg) == [f"paths.run_root={blocker / 'runs'}: {blocker} is a file, not a folder"]


def test_unwritable_run_root(tmp_path: Path, monkeypatch) -> None:
    import mrrl.config_checks as cc

    readonly = tmp_path / "ro"
    readonly.mkdir()
    monkeypatch.setattr(cc.os, "access", lambda p, mode: Path(p) != readonly)
    problems = config_problems(compose_cfg([], readonly / "runs"))
    assert problems == [
        f"paths.run_root={readonly / 'runs'}: cannot write in {readonly} (permission denied); "
        "choose a writable folder"
    ]


def test_shipped_configs_pass_the_checks(tmp_path: Path) -> None:
    for experiment in ("demo", "brats2019"):  # CPU and GPU trainers, every stage they run
        for stage in compose_cfg([f"experiment={experiment}"], tmp_path).pipeline.stages:
            cfg = compose_cfg([f"experiment={experiment}", f"stage={stage}"], tmp_path)
            assert config_problems(cfg) == [], (experiment, stage)


def test_cli_bad_config_value_is_one_line(tmp_path: Path) -> None:
    result = run_mrrl("stage=check_data", "data.batch_size=0", f"paths.run_root={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "mrrl: error: bad config value: data.batch_size=0: expected an int >= 1"
    assert not any(tmp_path.iterdir())  # refused before Hydra made the run directory


def test_pipeline_typos_and_cfg(tmp_path: Path, capsys) -> None:
    from mrrl import pipeline

    for args, expected in (
        (["experiment=demoo"], "Could not find 'experiment/demoo'"),
        (["data.imagesize=3"], "Key 'imagesize' is not in struct"),
        (["data.batch_size=0"], "bad config value: data.batch_size=0"),
        (["--bogus"], "unknown option --bogus"),
    ):
        with pytest.raises(SystemExit) as info:
            pipeline.main([*args, f"paths.run_root={tmp_path}"])
        err = capsys.readouterr().err
        assert info.value.code == 1 and err.startswith("mrrl-pipeline: error: ") and expected in err, err
        assert "Traceback" not in err
    pipeline.main(["--cfg", "job", "experiment=demo", f"paths.run_root={tmp_path}"])
    out = capsys.readouterr().out
    assert "experiment_name: demo" in out and "hydra:" not in out
    pipeline.main(["--cfg", "hydra", "experiment=demo"])
    assert "run:" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_deterministic_flag_in_trainer_configs(tmp_path: Path) -> None:
    assert compose_cfg([], tmp_path).trainer.deterministic == "warn"
    assert compose_cfg(["trainer=gpu"], tmp_path).trainer.deterministic is False
    assert "trainer.deterministic=maybe" in " ".join(
        config_problems(compose_cfg(["trainer.deterministic=maybe"], tmp_path))
    )

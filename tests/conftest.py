"""Shared fixtures: tiny datasets written in the real BraTS 2019 / OASIS-1 layouts."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mrrl.data.layouts import write_brats_case, write_oasis_csv, write_oasis_subject

# Tiny convolutions run fastest single-threaded on small CI machines (and tests run in parallel helpers).
torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parent.parent


# The slowest files first (measured with --durations=0): `make test` runs pytest-xdist with --dist loadfile, which
# hands whole files to the workers in collection order, so a slow file collected last would leave the other
# worker idle at the end. Order within a file is kept.
SLOW_FILES_FIRST = (
    "test_scaleout.py",
    "test_evaluate_stage.py",
    "test_cli.py",
    "test_ppo.py",
    "test_classify_stage.py",
    "test_config.py",
    "test_optuna_sweep.py",
    "test_reward_data_stage.py",
    "test_safe_loading.py",
    "test_gpu_check.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread for every test (OpenMP oversubscription on a shared 2-core box is ~30× slower),
    restored afterwards in case a test (e.g. a benchmark-like one) changed it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _wandb_offline_home(tmp_path_factory):
    """W&B runs in tests are offline and keep W&B's own files (settings, artefact staging) out of $HOME."""
    import os

    home = tmp_path_factory.mktemp("wandb_home")
    names = {
        "WANDB_DIR": "",
        "WANDB_CACHE_DIR": "cache",
        "WANDB_CONFIG_DIR": "config",
        "WANDB_DATA_DIR": "data",
    }
    saved = {k: os.environ.get(k) for k in [*names, "WANDB_MODE", "WANDB_SILENT"]}
    os.environ.update({k: str(home / sub) for k, sub in names.items()})
    os.environ.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def blob_volume(seed: int, shape=(20, 24, 18), lesion: float = 0.0) -> np.ndarray:
    """A brain-like ellipsoid with smooth texture and an optional bright blob, background exactly 0."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.8, 0.85, 0.75])[:, None, None, None]) ** 2).sum(0))
    brain = (radius < 1).astype(np.float32)
    texture = 100 + 20 * np.sin(3 * grid[0] + rng.uniform(0, 6)) + rng.normal(0, 3, shape)
    volume = brain * texture
    if lesion:
        centre = rng.uniform(-0.3, 0.3, 3)[:, None, None, None]
        volume += brain * lesion * np.exp(-(((grid - centre) ** 2).sum(0)) / 0.05)
    return volume.astype(np.float32)


def make_brats(root: Path, n_hgg: int = 4, n_lgg: int = 4, modalities=("t1", "t1ce", "t2", "flair")) -> Path:
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS-like on disk, so orientation to RAS matters
    for grade, n, lesion in (("HGG", n_hgg, 80.0), ("LGG", n_lgg, 30.0)):
        for i in range(n):
            case = f"BraTS19_TEST_{grade}_{i:03d}"
            vols = {
                m: blob_volume(zlib.crc32(f"{grade}-{i}-{m}".encode()), lesion=lesion) for m in modalities
            }
            vols["seg"] = (vols[modalities[0]] > 115).astype(np.uint8)
            write_brats_case(root, grade, case, vols, affine)
    (root / "name_mapping.csv").write_text("BraTS_2019_subject_ID\n")
    return root


def make_oasis(root: Path, n_ad: int = 4, n_cn: int = 4, n_nocdr: int = 1) -> Path:
    rows = []
    index = 1
    for label, n in (("AD", n_ad), ("CN", n_cn), (None, n_nocdr)):
        for _ in range(n):
            subject = f"OAS1_{index:04d}"
            cdr = {"AD": 1.0, "CN": 0.0, None: None}[label]
            write_oasis_subject(
                root,
                subject,
                blob_volume(index, lesion=0.0),
                disc=1 + index % 2,
                n_variant="n3" if index % 3 == 0 else "n4",
            )
            rows.append({"ID": f"{subject}_MR1", "M/F": "F", "Hand": "R", "Age": 70, "CDR": cdr, "MMSE": 27})
            index += 1
    write_oasis_csv(root, rows)
    return root


@pytest.fixture
def brats_root(tmp_path: Path) -> Path:
    return make_brats(tmp_path / "brats")


@pytest.fixture
def oasis_root(tmp_path: Path) -> Path:
    return make_oasis(tmp_path / "oasis")

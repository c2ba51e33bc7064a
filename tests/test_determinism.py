"""Runs repeat across processes: the same tiny VQGAN trained by two fresh ``python -m mrrl`` processes has
bit-identical weights.

The two processes differ in everything that should not matter: run root (name and path length), hash seed
(``PYTHONHASHSEED``), and whether the preprocessed-volume cache is built or read. They share what must be
shared for a bit-identical result on one machine: the software, the data, and the intra-op thread count
(``OMP_NUM_THREADS``): a different thread count changes the summation order of the CPU kernels, and the
weights then differ by ~1e-8 (README, "Determinism").
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_brats
from helpers import TINY_DATA, TINY_VQGAN, run_mrrl


def train_in_a_fresh_process(data_root: Path, run_root: Path, cache_dir: Path, hash_seed: str) -> dict:
    result = run_mrrl(
        "stage=vqgan",
        "data=brats2019",
        f"data.root={data_root}",
        *TINY_DATA,
        *TINY_VQGAN,
        "stage.loss.adv_start_step=1",  # both discriminators on, random slices from step 1
        "stage.trainer.max_epochs=2",
        "stage.latents.export=false",
        "logger=csv",
        f"paths.run_root={run_root}",
        f"paths.cache_dir={cache_dir}",
        env={"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": hash_seed},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    (ckpt,) = run_root.glob("*/vqgan/checkpoints/last.ckpt")
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_two_fresh_processes_train_bit_identical_weights(tmp_path: Path) -> None:
    data_root = make_brats(tmp_path / "brats", n_hgg=5, n_lgg=5, modalities=("flair",))
    cache = tmp_path / "cache"
    first = train_in_a_fresh_process(data_root, tmp_path / "a", cache, hash_seed="1")  # builds the cache
    assert any(cache.rglob("*.npy"))
    second = train_in_a_fresh_process(data_root, tmp_path / "second_run", cache, hash_seed="2")  # reads it
    assert first["global_step"] == second["global_step"] > 0
    assert first["state_dict"].keys() == second["state_dict"].keys()
    different = [k for k, v in first["state_dict"].items() if not torch.equal(v, second["state_dict"][k])]
    assert not different, f"weights differ between two fresh processes: {different[:5]}"

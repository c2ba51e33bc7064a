"""The evaluate stage (paper Table 2) on a tiny VQGAN run: tables, missing rows, caches, FID direction."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_brats
from helpers import TINY_DATA, TINY_VQGAN, check_wandb_run, compose_cfg, run_mrrl

import mrrl.evaluation.scores as scores_module
from mrrl.errors import ConfigError, ManifestError
from mrrl.evaluation.tables import gap_closed, render_markdown
from mrrl.stages import evaluate as evaluate_stage
from mrrl.stages import vqgan as vqgan_stage
from mrrl.training.runtime import build_datamodule

DATA = [o for o in TINY_DATA if not o.startswith("data.test_per_class")] + ["data.test_per_class=3"]
CLASSES = ["HGG", "LGG"]
EXTRACTORS = ["random3d", "random2d"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, run root) with a finished tiny VQGAN stage in experiment ``ev``; test split 3 per class.

    100 one-step epochs (~2 s): enough for reconstructions that look like brains, not a constant.
    """
    base = tmp_path_factory.mktemp("ev")
    data_root = make_brats(base / "brats", n_hgg=5, n_lgg=5, modalities=("flair",))
    run_root = base / "runs"
    torch.set_num_threads(1)
    cfg = compose_cfg(
        [
            "stage=vqgan",
            "data=brats2019",
            f"data.root={data_root}",
            "experiment_name=ev",
            *DATA,
            *TINY_VQGAN,
            "stage.trainer.max_epochs=100",
            "stage.trainer.check_val_every_n_epoch=100",
            "stage.optim.lr_g=3e-3",
            "stage.latents.export=false",
            "logger=none",
        ],
        run_root,
    )
    vqgan_stage.run(cfg, run_root / "ev" / "vqgan")
    return data_root, run_root


# The instrument's checks, tiny: 2-step ladder and trajectory, few bootstrap resamples.
TINY_CALIBRATION = [
    "stage.calibration.ladder_steps=[0,2]",
    "stage.calibration.ladder_num_steps=4",
    "stage.calibration.synthetic_steps=[2,4]",
    "stage.intervals.n_boot=20",
    "stage.intervals.floor_splits=4",
]


def eval_cfg(experiment: tuple[Path, Path], *extra: str, name: str = "ev"):
    data_root, run_root = experiment
    return compose_cfg(
        [
            "stage=evaluate",
            "data=brats2019",
            f"data.root={data_root}",
            f"experiment_name={name}",
            *DATA,
            "stage.metrics.extractor_options.random2d.slice_size=32",
            "stage.metrics.batch_size=4",
            "stage.metrics.diversity_pairs=4",
            *TINY_CALIBRATION,
            *extra,
        ],
        run_root,
    )


def read_table(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_table_with_only_the_vqgan_names_the_missing_rows(experiment, tmp_path: Path, capsys) -> None:
    cfg = eval_cfg(experiment, f"stage.metrics.stats_cache_dir={tmp_path / 'stats'}")
    run_dir = tmp_path / "evaluate"
    outputs = evaluate_stage.run(cfg, run_dir)
    stdout = capsys.readouterr().out

    rows = read_table(run_dir / "table2.csv")
    assert [(r["extractor"], r["model"]) for r in rows] == [
        (e, "3D-VQGAN reconstruction") for e in EXTRACTORS
    ]
    assert list(rows[0]) == ["extractor", "extractor_identity", "model", *CLASSES, "All"]
    assert rows[0]["extractor_identity"].startswith("random3d(") and "seed=0" in rows[0]["extractor_identity"]
    for row in rows:
        assert all(math.isfinite(float(row[c])) and float(row[c]) >= 0 for c in [*CLASSES, "All"])

    markdown = (run_dir / "table2.md").read_text()
    for text in (markdown, stdout):
        assert "Standard diffusion: no diffusion manifest at" in text and "`mrrl stage=diffusion`" in text
        assert "RL fine-tuned: no ppo manifest at" in text and "`mrrl stage=ppo`" in text
    assert "## FID — random3d" in markdown and rows[0]["extractor_identity"] in markdown
    assert "gap closed by RL" not in markdown  # needs all three rows

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["real"]["n"] == {"HGG": 3, "LGG": 3, "All": 6}
    (model,) = metrics["models"]
    assert model["key"] == "vqgan" and model["n_per_class"] == {"HGG": 3, "LGG": 3}
    assert set(metrics["missing"]) == {"standard", "rl"}
    all_row = next(r for r in metrics["scores"] if r["extractor"] == "random3d" and r["class"] == "All")
    assert all_row["n_real"] == all_row["n_fake"] == 6 and 0 <= all_row["coverage"] <= 1
    assert 0 < model["diversity"]["All"] <= 1
    assert (
        outputs["rows"] == ["vqgan"]
        and json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    )
    assert sorted(p.name for p in (run_dir / "figures").glob("*.png")) == [
        "samples_HGG.png",
        "samples_LGG.png",
    ]


def test_real_statistics_and_samples_are_reused(experiment, tmp_path: Path, monkeypatch) -> None:
    calls = []
    original = scores_module.compute_real_features
    monkeypatch.setattr(
        scores_module, "compute_real_features", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    stats_dir = tmp_path / "stats"
    cfg = eval_cfg(experiment, f"stage.metrics.stats_cache_dir={stats_dir}")
    run_dir = tmp_path / "evaluate"
    first = evaluate_stage.run(cfg, run_dir)
    assert len(calls) == len(EXTRACTORS) * len(CLASSES)  # "All" pools the class features: no extraction
    assert len(list(stats_dir.glob("real-stats-*.npz"))) == len(EXTRACTORS) * (len(CLASSES) + 1)
    samples = sorted((run_dir / "samples" / "vqgan").glob("*.npy"))
    stamps = [p.stat().st_mtime_ns for p in samples]
    assert len(samples) == len(CLASSES)

    assert evaluate_stage.run(cfg, run_dir) is None  # same inputs: nothing to do
    second = evaluate_stage.run(
        eval_cfg(experiment, f"stage.metrics.stats_cache_dir={stats_dir}", "stage.force=true"), run_dir
    )
    assert len(calls) == len(EXTRACTORS) * len(CLASSES)  # real features came from the cache
    assert [p.stat().st_mtime_ns for p in samples] == stamps  # reconstructions were not recomputed
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["models"][0]["reused_samples"] == {"HGG": True, "LGG": True}
    assert second["fid"] == first["fid"]  # cached statistics and samples give the same numbers

    # A changed setting is a new evaluation (no force needed); regenerate=true recomputes the samples.
    third = evaluate_stage.run(
        eval_cfg(
            experiment,
            f"stage.metrics.stats_cache_dir={stats_dir}",
            "stage.metrics.prdc_k=2",
            "stage.regenerate=true",
        ),
        run_dir,
    )
    assert third is not None and [p.stat().st_mtime_ns for p in samples] != stamps


def test_reconstruction_scores_better_than_noise(experiment, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    noise_dir = tmp_path / "noise"
    noise_dir.mkdir()
    arrays = {c: (torch.rand(3, 1, 16, 16, 16, generator=gen) * 2 - 1).numpy() for c in CLASSES}
    for c, a in arrays.items():
        np.save(noise_dir / f"{c}.npy", a[:, 0])  # [N, D, H, W] is accepted for one channel
    np.savez(tmp_path / "noise.npz", **arrays)
    # The real test set itself, as a {class: file} mapping: the ideal row.
    real_sets, _ = evaluate_stage.load_real_sets(build_datamodule(eval_cfg(experiment)).prepare(), "test")
    for c, volumes in real_sets.items():
        np.save(tmp_path / f"real_{c}.npy", volumes.numpy())
    real_map = "{" + ",".join(f"{c}:{tmp_path / f'real_{c}.npy'}" for c in CLASSES) + "}"
    cfg = eval_cfg(
        experiment,
        f"+stage.extra_models.noise={noise_dir}",
        f"+stage.extra_models.noise_npz={tmp_path / 'noise.npz'}",
        f"+stage.extra_models.real={real_map}",
        "stage.intervals.pairs=[[noise,real]]",
    )
    outputs = evaluate_stage.run(cfg, tmp_path / "evaluate")
    assert outputs["rows"] == ["vqgan", "noise", "noise_npz", "real"]
    for extractor in EXTRACTORS:
        fid = outputs["fid"][extractor]
        for column in [*CLASSES, "All"]:
            assert fid["real"][column] == pytest.approx(0, abs=1e-6)
            assert fid["vqgan"][column] < fid["noise"][column], (extractor, column)
            assert fid["noise_npz"][column] == pytest.approx(fid["noise"][column])
    table = read_table(tmp_path / "evaluate" / "table2.csv")
    assert [r["model"] for r in table[:4]] == ["3D-VQGAN reconstruction", "noise", "noise_npz", "real"]
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    real_all = next(r for r in metrics["scores"] if r["model"] == "real" and r["class"] == "All")
    assert real_all["precision"] == real_all["recall"] == real_all["coverage"] == 1.0
    for extractor in EXTRACTORS:  # the paired difference noise − real: the real volumes score lower
        (pair,) = metrics["intervals"][extractor]["pairs"]
        assert (pair["a"], pair["b"]) == ("noise", "real")
        assert pair["difference"]["fid"]["All"]["low"] > 0 and pair["verdict"]["fid"]["All"] == "real better"
    assert "Paired differences between rows" in (tmp_path / "evaluate" / "table2.md").read_text()


def test_bad_extra_volumes_and_empty_experiment_are_clear_errors(experiment, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for c in CLASSES:
        np.save(bad / f"{c}.npy", np.zeros((2, 1, 8, 8, 8), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"expected volumes \[N, 1, 16, 16, 16\]"):
        evaluate_stage.run(eval_cfg(experiment, f"+stage.extra_models.bad={bad}"), tmp_path / "e1")
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_stage.run(
            eval_cfg(experiment, f"+stage.extra_models.x={tmp_path / 'nope'}"), tmp_path / "e2"
        )
    with pytest.raises(ConfigError, match="pairs: no row named nope; this run's rows: vqgan"):
        evaluate_stage.run(eval_cfg(experiment, "stage.intervals.pairs=[[vqgan,nope]]"), tmp_path / "e4")
    with pytest.raises(ConfigError, match=r"pairs\[0\]=\['vqgan'\]: give two different row names"):
        evaluate_stage.run(eval_cfg(experiment, "stage.intervals.pairs=[[vqgan]]"), tmp_path / "e5")
    with pytest.raises(ManifestError, match="nothing to evaluate(.|\n)*no vqgan manifest"):
        evaluate_stage.run(eval_cfg(experiment, name="empty"), tmp_path / "e3")


def test_gap_closed_and_markdown_with_all_three_rows() -> None:
    fid = {
        "vqgan": {"HGG": 10.0, "All": 5.0},
        "standard": {"HGG": 30.0, "All": 5.0},
        "rl": {"HGG": 20.0, "All": 4.0},
    }
    gap = gap_closed(fid, ["HGG", "All"])
    assert gap == {"HGG": pytest.approx(50.0), "All": None}  # no gap to close in "All"
    assert gap_closed({"vqgan": fid["vqgan"], "standard": fid["standard"]}, ["HGG"]) is None
    models = [{"key": k, "label": k, "diversity": {}} for k in fid]
    results = {
        "classes": ["HGG"],
        "models": models,
        "missing": {},
        "extractors": [{"name": "random3d", "identity": "random3d(seed=0)#abc"}],
        "scores": [
            {"model": k, "extractor": "random3d", "class": c, "fid": v}
            for k in fid
            for c, v in fid[k].items()
        ],
        "gap_closed": {"random3d": gap},
        "real": {"n": {"HGG": 3, "All": 3}},
    }
    markdown = render_markdown(results)
    assert "gap closed by RL: HGG 50.0 %, All n/a" in markdown
    assert "| rl | 20.000 | 4.000 |" in markdown and "random3d(seed=0)#abc" in markdown


def tiny_diffusion_ckpt(path: Path, vqgan_ckpt: str, seed: int, perturb: bool = True) -> Path:
    """A randomly initialised tiny denoiser in the diffusion stage's checkpoint format (what
    ``load_diffusion`` reads: hyper-parameters, EMA weights, scale factor); training is that stage's test.
    ``perturb=False`` keeps MONAI's zero output conv: a denoiser that predicts ε = 0 everywhere."""
    from mrrl.diffusion.generate import EMA_PREFIX, SCALE_KEY, denoiser_from_hparams

    hparams = {
        "latent_shape": [4, 4, 4, 4],
        "class_names": CLASSES,
        "cfg_dropout": 0.0,
        "vqgan_ckpt": vqgan_ckpt,
        "unet": {
            "channels": [8, 8],
            "attention_levels": [False, False],
            "num_res_blocks": 1,
            "num_head_channels": 8,
            "norm_num_groups": 4,
            "use_flash_attention": False,
        },
        "schedule": {"num_train_timesteps": 100, "schedule": "linear_beta", "prediction_type": "epsilon"},
        "sampling": {"sampler": "ddim", "num_steps": 50, "eta": 1.0, "decode_quantize": True},
    }
    torch.manual_seed(seed)
    unet = denoiser_from_hparams(hparams).unet
    with torch.no_grad():  # MONAI zero-initialises the output conv: perturb, or every seed predicts 0
        for param in unet.parameters() if perturb else []:
            param.add_(0.1 * torch.randn_like(param))
    state = {EMA_PREFIX + k: v for k, v in unet.state_dict().items()}
    state[SCALE_KEY] = torch.tensor(1.0)
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    return path


def test_three_rows_from_diffusion_and_ppo_manifests(experiment, tmp_path: Path, monkeypatch) -> None:
    from mrrl.evaluation import sources
    from mrrl.manifest import write_manifest

    _, run_root = experiment
    vqgan_ckpt = json.loads((run_root / "ev" / "vqgan" / "manifest.json").read_text())["outputs"]["best_ckpt"]
    exp_dir = run_root / "evd"  # its own experiment, pointing at the shared VQGAN
    std = tiny_diffusion_ckpt(tmp_path / "ema.pt", vqgan_ckpt, seed=1)
    rl = tiny_diffusion_ckpt(tmp_path / "ppo.ckpt", vqgan_ckpt, seed=2)
    write_manifest(exp_dir / "diffusion", "diffusion", {"ema_ckpt": str(std), "best_ckpt": None})
    write_manifest(exp_dir / "ppo", "ppo", {"final_ckpt": str(rl)})
    loads = []
    original = sources.load_sampler
    monkeypatch.setattr(sources, "load_sampler", lambda *a: loads.append(a[0]) or original(*a))

    overrides = [
        f"stage.vqgan_ckpt={vqgan_ckpt}",
        "stage.eta=0.0",  # deterministic DDIM: samples independent of the sampling batch size
        "stage.n_per_class=3",
        "stage.num_steps=3",
        "stage.sample_batch_size=2",
        "stage.metrics.extractors=[random3d]",
        "stage.metrics.headline_extractor=random3d",
    ]
    run_dir = tmp_path / "evaluate"
    outputs = evaluate_stage.run(eval_cfg(experiment, *overrides, "logger=wandb", name="evd"), run_dir)
    # W&B: Table 2 with intervals, per model and class values in the summary (the headline extractor).
    run = check_wandb_run(run_dir, "evaluate", "evd/evaluate", CLASSES)
    assert run.summary["evaluate/fid/rl/HGG"] == pytest.approx(outputs["fid"]["random3d"]["rl"]["HGG"])
    gap = outputs["gap_closed"]["random3d"]["All"]  # None where standard is not worse than the limit
    assert run.summary.get("evaluate/gap_closed/All") == (pytest.approx(gap) if gap is not None else None)
    table2 = run.table("evaluate/table2")
    assert table2["columns"][:6] == ["extractor", "model", "label", "class", "n", "fid"]
    assert {(r[1], r[3]) for r in table2["data"]} == {
        (m, c) for m in ("vqgan", "standard", "rl") for c in [*CLASSES, "All"]
    }
    assert all(r[6] <= r[7] and r[9] <= r[10] for r in table2["data"])  # FID and KID intervals
    assert outputs["rows"] == ["vqgan", "standard", "rl"] and outputs["missing"] == {}
    assert sorted(loads) == sorted([str(std), str(rl)])
    markdown = (run_dir / "table2.md").read_text()
    assert "gap closed by RL: HGG " in markdown and "Missing rows" not in markdown
    table = read_table(run_dir / "table2.csv")
    assert [r["model"] for r in table] == ["3D-VQGAN reconstruction", "Standard diffusion", "RL fine-tuned"]
    assert all(math.isfinite(float(r[c])) for r in table for c in [*CLASSES, "All"])
    standard = np.load(run_dir / "samples" / "standard" / "HGG.npy")
    assert standard.shape == (3, 1, 16, 16, 16) and np.abs(standard).max() <= 1
    assert not np.allclose(standard, np.load(run_dir / "samples" / "rl" / "HGG.npy"))  # different weights
    assert not np.allclose(standard, np.load(run_dir / "samples" / "standard" / "LGG.npy"))  # other class

    # Same settings: the samples are reused, the checkpoints are not even loaded; a new batch size changes
    # nothing for deterministic DDIM.
    again = evaluate_stage.run(
        eval_cfg(
            experiment,
            *overrides[:-2],
            "stage.sample_batch_size=3",
            "stage.metrics.extractors=[random3d]",
            "stage.metrics.headline_extractor=random3d",
            name="evd",
        ),
        run_dir,
    )
    assert len(loads) == 2 and again["fid"] == outputs["fid"]
    # Another seed is another sample set.
    evaluate_stage.run(eval_cfg(experiment, *overrides, "stage.seed=1", name="evd"), run_dir)
    assert len(loads) == 4
    assert not np.allclose(standard, np.load(run_dir / "samples" / "standard" / "HGG.npy"))


def test_two_ranks_share_the_sampling_and_match_one_process(experiment, tmp_path: Path) -> None:
    """``trainer=ddp_cpu`` through the real CLI: 2 gloo ranks sample and reconstruct interleaved shares
    (3 volumes per class: 2 on rank 0, 1 on rank 1); rank 0 alone scores and writes, and with deterministic
    DDIM the volumes equal those of a single process."""
    from mrrl.manifest import write_manifest

    data_root, run_root = experiment
    vqgan_ckpt = json.loads((run_root / "ev" / "vqgan" / "manifest.json").read_text())["outputs"]["best_ckpt"]
    std = tiny_diffusion_ckpt(tmp_path / "ema.pt", vqgan_ckpt, seed=1)
    write_manifest(run_root / "evr" / "diffusion", "diffusion", {"ema_ckpt": str(std), "best_ckpt": None})
    overrides = [
        f"stage.vqgan_ckpt={vqgan_ckpt}",
        "stage.eta=0.0",
        "stage.n_per_class=3",
        "stage.num_steps=3",
        "stage.sample_batch_size=2",
        "stage.metrics.extractors=[random3d]",
        "stage.metrics.headline_extractor=random3d",
        "logger=none",
    ]
    single = evaluate_stage.run(eval_cfg(experiment, *overrides, name="evr"), tmp_path / "single")

    cli_args = [
        "stage=evaluate",
        "data=brats2019",
        f"data.root={data_root}",
        "experiment_name=evr",
        f"paths.run_root={run_root}",
        *DATA,
        "stage.metrics.extractor_options.random2d.slice_size=32",
        "stage.metrics.batch_size=4",
        "stage.metrics.diversity_pairs=4",
        *TINY_CALIBRATION,
        *overrides,
        "trainer=ddp_cpu",
    ]
    result = run_mrrl(*cli_args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = run_root / "evr" / "evaluate"
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run_dir / "train_ddp_process_1.log").read_text()
    assert result.stdout.count("Table 2 (evr") == 1  # rank 0 alone printed the tables
    assert "evaluate: rank 1 made its share of every row" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["settings"]["ranks"] == 2
    for model in ("standard", "vqgan"):
        for c in CLASSES:
            ddp = np.load(run_dir / "samples" / model / f"{c}.npy")
            one = np.load(tmp_path / "single" / "samples" / model / f"{c}.npy")
            assert ddp.shape == one.shape and np.allclose(ddp, one, atol=1e-5), (model, c)
    fid = json.loads((run_dir / "manifest.json").read_text())["outputs"]["fid"]["random3d"]
    for model in ("standard", "vqgan"):
        assert fid[model] == pytest.approx(single["fid"]["random3d"][model], rel=1e-4)


@pytest.fixture(scope="module")
def phantom_test_volumes(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Preprocessed 16³ test volumes (8 per class) of a small phantom tumour cohort."""
    from mrrl.data.phantom import make_phantom_cohort

    base = tmp_path_factory.mktemp("phladder")
    cohort = make_phantom_cohort("tumor", base / "phantom", 12, seed=0, resolution_mm=8.0, progress=False)
    cfg = compose_cfg(
        ["stage=evaluate", "data=brats2019", f"data.root={cohort}", *DATA, "data.test_per_class=8"], base
    )
    real, _ = evaluate_stage.load_real_sets(build_datamodule(cfg).prepare(), "test")
    return real


def test_every_extractor_orders_a_known_corruption_ladder(phantom_test_volumes) -> None:
    """The instrument validated, not assumed: phantom test volumes with growing Gaussian noise (known
    ordering) score a rising FID and KID with every extractor, and the premise check calls it a pass."""
    from mrrl.evaluation.calibration import premise_checks, trend
    from mrrl.metrics.extractors import build_extractor
    from mrrl.metrics.intervals import bootstrap_scores, split_half_floor

    gen = torch.Generator().manual_seed(0)
    sigmas = (0.0, 0.1, 0.2, 0.4)
    ladder = {
        f"ladder_t{i:03d}": {
            c: (v + s * torch.randn(v.shape, generator=gen)).clamp(-1, 1)
            for c, v in phantom_test_volumes.items()
        }
        for i, s in enumerate(sigmas)
    }
    info = {name: {"kind": "ladder", "t": i, "num_steps": 3} for i, name in enumerate(ladder)}
    for name, options in (("random3d", {}), ("random2d", {"slice_size": 32})):
        extractor = build_extractor(name, **options)
        real = {c: extractor(v) for c, v in phantom_test_volumes.items()}
        fake = {m: {c: extractor(v) for c, v in per_class.items()} for m, per_class in ladder.items()}
        iv = bootstrap_scores(real, fake, 30, 0, rows_per_volume=extractor.rows_per_volume())
        for metric in ("fid", "kid"):
            values = [iv["scores"][metric][m]["All"]["value"] for m in ladder]
            assert values == sorted(values) and values[-1] > values[0], (name, metric, values)
        floor = split_half_floor(real, 5, rows_per_volume=extractor.rows_per_volume())
        (check,) = premise_checks(iv, info, floor, "All")
        assert check["premise"] == "reconstruction FID rises with t" and check["passed"] and check["monotone"]
        assert (
            trend(list(reversed([iv["scores"]["fid"][m]["All"] for m in ladder])), rising=True)["passed"]
            is False
        )


def test_evaluate_computes_the_ladder_and_the_synthetic_trajectory(experiment, tmp_path: Path) -> None:
    """With a standard model, evaluate adds noised reconstructions at every t and samples at every step
    count, scores them with intervals, judges the premises and draws the calibration figure."""
    _, run_root = experiment
    vqgan_ckpt = json.loads((run_root / "ev" / "vqgan" / "manifest.json").read_text())["outputs"]["best_ckpt"]
    std = tiny_diffusion_ckpt(tmp_path / "ema.pt", vqgan_ckpt, seed=1)
    cfg = eval_cfg(
        experiment,
        f"stage.vqgan_ckpt={vqgan_ckpt}",
        f"stage.diffusion_ckpt={std}",
        "stage.n_per_class=3",
        "stage.num_steps=3",
        "stage.eta=0.0",
        "stage.sample_batch_size=3",
        "stage.calibration.ladder_steps=[0,2,4]",
        "stage.calibration.synthetic_steps=[2,4]",
        "logger=none",
        name="evladder",
    )
    outputs = evaluate_stage.run(cfg, tmp_path / "run")
    metrics = json.loads(Path(outputs["metrics_json"]).read_text())
    assert set(metrics["intervals"]) == set(EXTRACTORS)
    assert set(metrics["calibration"]) == {
        "ladder_t000",
        "ladder_t002",
        "ladder_t004",
        "synthetic_s002",
        "synthetic_s004",
    }
    for iv in metrics["intervals"].values():
        for name in metrics["calibration"]:
            est = iv["scores"]["fid"][name]["All"]
            assert math.isfinite(est["value"]) and est["low"] <= est["high"]
    premises = {p["premise"]: p for p in metrics["premises"]["All"]}
    assert premises["reconstruction FID rises with t"]["x"] == [0, 2, 4]
    assert premises["synthetic FID falls with sampler steps"]["x"] == [2, 4]
    assert isinstance(premises["limit→standard gap above the noise floor"]["passed"], bool)
    assert (tmp_path / "run" / "figures" / "calibration.png").is_file()
    table = Path(outputs["table_md"]).read_text()
    assert "## Headline: random2d (held out ✓)" in table and "reconstruction FID rises with t" in table
    assert outputs["headline_table"]["extractor"] == "random2d"


def test_headline_extractor_that_labelled_the_reward_data_is_flagged(experiment, tmp_path: Path) -> None:
    from mrrl.evaluation.judge import headline_judge
    from mrrl.manifest import write_manifest
    from mrrl.metrics.extractors import build_extractor

    _, run_root = experiment
    extractors = [build_extractor("random3d", seed=0), build_extractor("random2d", seed=0)]
    write_manifest(run_root / "evjudge" / "reward_data", "reward_data", {"extractor": extractors[0].identity})
    cfg = eval_cfg((tmp_path, run_root), name="evjudge")
    with pytest.warns(UserWarning, match="NOT HELD OUT"):
        judged = headline_judge(cfg, extractors, "random3d")
    assert not judged["held_out"] and judged["coincides_with"] == ["reward_data (reward labels)"]
    fine = headline_judge(cfg, extractors, "random2d")
    assert fine["held_out"] and fine["checked"] == ["reward_data (reward labels)"]
    with pytest.raises(ConfigError, match="headline_extractor='medicalnet' is not among"):
        headline_judge(cfg, extractors, "medicalnet")

"""The classify stage (paper §4.3, Tables 3–4): metrics, aggregation, learning, synthetic caching, reruns.

Data: the phantom tumour cohort (16 HGG + 16 LGG at 6 mm, resized to 16³; test split 6 per class), whose
HGG tumours are large, oedematous and ring-enhancing: a tiny ResNet-10 separates the classes in seconds.
Generators: a randomly initialised tiny VQGAN and two random tiny denoisers in the stages' checkpoint
formats (what the classify stage loads), so nothing is trained but the classifiers.
"""

from __future__ import annotations

import csv
import json
import math
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import check_wandb_run, compose_cfg, run_mrrl, wandb_runs

import mrrl.classify.runner as runner
import mrrl.diffusion.generate as generate_module
import mrrl.diffusion.loading as diffusion_loading
from mrrl.classify.metrics import aggregate, binary_metrics, mean_std
from mrrl.data.phantom import make_phantom_cohort
from mrrl.errors import ConfigError
from mrrl.manifest import write_manifest
from mrrl.stages import classify as classify_stage
from mrrl.utils.markdown import fmt_pm as mean_pm_std

CLASSES = ["HGG", "LGG"]
TEST_PER_CLASS = 6
DATA = [
    "data=brats2019",
    "data.image_size=16",
    f"data.test_per_class={TEST_PER_CLASS}",
    "data.val_fraction=0.25",
    "data.progress=false",
    "trainer.log_every_n_steps=1",
]
TINY = [
    "stage=classify",
    "stage.arch=resnet10",
    "stage.net.widen_factor=0.25",
    "stage.batch_size=4",
    "stage.eval_batch_size=8",
    "stage.num_workers=0",
    "stage.progress_bar=false",
    "stage.monitor=val/loss",
    "stage.augment.crop_margin=2",
    "stage.pretrain.max_epochs=1",
    "stage.finetune.max_epochs=1",
    "stage.finetune.lr=1e-3",
]
SAMPLING = ["stage.n_synthetic_per_class=3", "stage.num_steps=2", "stage.sample_batch_size=3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """The phantom cohort, a shared run root (one preprocessing cache) and random generator checkpoints."""
    root = tmp_path_factory.mktemp("classify")
    data_root = make_phantom_cohort("tumor", root / "phantom", 16, resolution_mm=6.0, progress=False)
    vqgan = random_vqgan_ckpt(root / "vqgan.ckpt")
    return {
        "data": data_root,
        "runs": root / "runs",
        "vqgan": vqgan,
        "standard": random_diffusion_ckpt(root / "ema.pt", vqgan, seed=1),
        "rl": random_diffusion_ckpt(root / "ppo.ckpt", vqgan, seed=2),
    }


def cfg_for(base: dict[str, Path], name: str, *extra: str):
    return compose_cfg(
        [*TINY, *DATA, f"data.root={base['data']}", f"experiment_name={name}", *extra], base["runs"]
    )


def run_dir(base: dict[str, Path], name: str) -> Path:
    return base["runs"] / name / "classify"


def random_vqgan_ckpt(path: Path) -> Path:
    """A randomly initialised tiny VQGAN in the ``stage=vqgan`` checkpoint format (×4 down, 4-dim codes)."""
    from mrrl.vqgan.networks import VQGAN

    net_cfg = {"channels": [8, 16], "num_res_blocks": 1, "codebook_size": 32, "codebook_dim": 4}
    torch.manual_seed(0)
    net = VQGAN(**net_cfg, in_channels=1)
    state = {f"vqgan.{k}": v for k, v in net.state_dict().items()}
    torch.save(
        {"hyper_parameters": {"net": net_cfg, "image_shape": [1, 16, 16, 16]}, "state_dict": state}, path
    )
    return path


def random_diffusion_ckpt(path: Path, vqgan_ckpt: Path, seed: int) -> Path:
    """A random tiny denoiser in the diffusion stage's checkpoint format (as in test_evaluate_stage)."""
    from mrrl.diffusion.generate import EMA_PREFIX, SCALE_KEY, denoiser_from_hparams

    hparams = {
        "latent_shape": [4, 4, 4, 4],
        "class_names": CLASSES,
        "cfg_dropout": 0.0,
        "vqgan_ckpt": str(vqgan_ckpt),
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
    with torch.no_grad():  # MONAI zero-initialises the output conv: perturb, or every model predicts 0
        for param in unet.parameters():
            param.add_(0.1 * torch.randn_like(param))
    state = {EMA_PREFIX + k: v for k, v in unet.state_dict().items()}
    state[SCALE_KEY] = torch.tensor(1.0)
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    return path


def publish(base: dict[str, Path], name: str, *stages: str) -> None:
    """Manifests of finished ``diffusion`` / ``ppo`` stages in experiment ``name``."""
    exp = base["runs"] / name
    if "diffusion" in stages:
        write_manifest(exp / "diffusion", "diffusion", {"ema_ckpt": str(base["standard"])})
    if "ppo" in stages:
        write_manifest(exp / "ppo", "ppo", {"final_ckpt": str(base["rl"])})


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def count_calls(monkeypatch, module, name: str) -> list:
    calls: list = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or original(*a, **k))
    return calls


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computation() -> None:
    probs = [0.9, 0.8, 0.6, 0.6, 0.4, 0.3, 0.2, 0.6]
    targets = [1, 1, 0, 1, 1, 0, 0, 0]
    # Threshold 0.5: predicted 1 1 1 1 0 0 0 1 → TP 3, FP 2, FN 1, TN 2.
    tp, fp, fn, tn = 3, 2, 1, 2
    # AUC = P(score_pos > score_neg) + ½ P(tie), over the 4 × 4 pairs.
    pos = [p for p, t in zip(probs, targets, strict=True) if t]
    neg = [p for p, t in zip(probs, targets, strict=True) if not t]
    wins = sum((a > b) + 0.5 * (a == b) for a, b in product(pos, neg))
    expected = {"accuracy": (tp + tn) / 8, "f1": 2 * tp / (2 * tp + fp + fn), "auc": wins / 16}
    assert expected == pytest.approx({"accuracy": 0.625, "f1": 2 / 3, "auc": 13 / 16})
    assert binary_metrics(probs, targets) == pytest.approx(expected)
    # Another threshold moves accuracy and F1, never the AUC: predicted 1 1 0 0 0 0 0 0 → TP 2, FN 2, TN 4.
    high = binary_metrics(probs, targets, threshold=0.7)
    assert high == pytest.approx({"accuracy": 6 / 8, "f1": 4 / 6, "auc": expected["auc"]})
    assert binary_metrics([0.9, 0.1, 0.8, 0.2], [1, 0, 1, 0]) == {"accuracy": 1.0, "f1": 1.0, "auc": 1.0}
    assert binary_metrics([0.9, 0.1, 0.8, 0.2], [0, 1, 0, 1])["auc"] == 0.0
    one_class = binary_metrics([0.2, 0.7], [0, 0])
    assert math.isnan(one_class["auc"]) and one_class["accuracy"] == 0.5 and one_class["f1"] == 0.0
    with pytest.raises(ValueError, match="as many"):
        binary_metrics([0.5, 0.5], [1])


def test_mean_and_sample_std_over_seeds() -> None:
    mean, std = mean_std([0.6, 0.7, 0.8])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.1)  # sample std (ddof = 1), not 0.0816
    assert mean_std([0.5])[0] == 0.5 and math.isnan(mean_std([0.5])[1])
    runs = [{"accuracy": 0.5, "f1": 0.4, "auc": 0.9}, {"accuracy": 0.7, "f1": 0.8, "auc": math.nan}]
    agg = aggregate(runs)
    assert agg["accuracy"] == pytest.approx({"mean": 0.6, "std": math.sqrt(0.02)})
    assert agg["f1"]["std"] == pytest.approx(math.sqrt(0.08)) and math.isnan(agg["auc"]["mean"])
    assert mean_pm_std(agg["accuracy"]) == "0.600 ± 0.141"
    assert mean_pm_std({"mean": 0.5, "std": math.nan}) == "0.500"


# ---------------------------------------------------------------------------------------------- stage


def test_real_only_classifier_learns_and_table_aggregates_the_seeds(base) -> None:
    """Real learning check: 20 epochs of a tiny ResNet-10 rank the 12 unseen test volumes far above chance."""
    cfg = cfg_for(base, "real", "stage.seeds=[0,1]", "stage.finetune.max_epochs=20", "logger=wandb")
    out_dir = run_dir(base, "real")
    outputs = classify_stage.run(cfg, out_dir)

    per_seed = read_csv(out_dir / "per_seed.csv")
    assert [(r["protocol"], r["seed"]) for r in per_seed] == [("real", "0"), ("real", "1")]
    aucs = [float(r["auc"]) for r in per_seed]
    accs = [float(r["accuracy"]) for r in per_seed]
    assert min(aucs) >= 0.85, aucs  # chance: 0.5; P(AUC ≥ 0.85 | 6 v 6, no signal) ≈ 2 %
    assert np.mean(accs) > 0.5, accs
    (row,) = read_csv(out_dir / "table3.csv")
    assert row["protocol"] == "real" and row["label"] == "Real data only" and row["n_seeds"] == "2"
    for metric in ("accuracy", "f1", "auc"):
        values = [float(r[metric]) for r in per_seed]
        assert float(row[f"{metric}_mean"]) == pytest.approx(np.mean(values), abs=1e-6)
        assert float(row[f"{metric}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-6)

    # The stored predictions are the test split, and its metrics are recomputable from them.
    for r in per_seed:
        preds = read_csv(Path(r["dir"]) / "predictions.csv")
        assert len(preds) == 2 * TEST_PER_CLASS and {p["label"] for p in preds} == set(CLASSES)
        targets = [int(p["target"]) for p in preds]
        assert targets == [int(p["label"] == "HGG") for p in preds]  # positive class: the first (HGG)
        assert binary_metrics([float(p["prob_positive"]) for p in preds], targets)["auc"] == pytest.approx(
            float(r["auc"]), abs=1e-5
        )
        seed_dir = Path(r["dir"])
        assert (seed_dir / "finetune" / "checkpoints" / "best.ckpt").is_file()
        assert (seed_dir / "finetune" / "logs" / "metrics.csv").is_file()
        assert not (seed_dir / "pretrain").exists()

    # W&B: one run per protocol × seed, told apart by config, the test scores in its summary.
    for r in per_seed:
        name = f"real/classify/runs/real/seed{r['seed']}/finetune"
        run = check_wandb_run(Path(r["dir"]), "classify", name, CLASSES)
        assert {k: run.config[k] for k in ("protocol", "seed", "phase")} == {
            "protocol": "real", "seed": int(r["seed"]), "phase": "finetune"
        }  # fmt: skip
        assert run.summary["test/auc"] == pytest.approx(float(r["auc"]), abs=1e-5)
    markdown = (out_dir / "table3.md").read_text()
    assert "| Real data only | 2 | " in markdown and " ± " in markdown and "ddof = 1" in markdown
    assert (
        "Standard synthetic: no diffusion manifest" in markdown
        and "RL synthetic (ours): no ppo manifest" in markdown
    )
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == "classify"
    assert set(manifest["outputs"]["missing"]) == {"standard", "rl"}
    real = outputs["protocols"]["real"]
    assert set(real["per_seed"]) == {"0", "1"} and real["metrics"]["auc"]["mean"] == pytest.approx(
        np.mean(aucs)
    )


@pytest.fixture(scope="module")
def synthetic_experiment(base) -> dict:
    """Standard and RL protocols (from manifests) × seeds 0, 1; counts generator loads and sampling calls."""
    publish(base, "syn", "diffusion", "ppo")
    mp = pytest.MonkeyPatch()
    try:
        samples = count_calls(mp, generate_module, "generate_volumes")
        loads = count_calls(mp, diffusion_loading, "load_diffusion")  # the one loader every stage uses
        cfg = cfg_for(base, "syn", "stage.seeds=[0,1]", "stage.protocols=[standard,rl]", *SAMPLING)
        outputs = classify_stage.run(cfg, run_dir(base, "syn"))
    finally:
        mp.undo()
    return {"outputs": outputs, "samples": samples, "loads": loads, "cfg": cfg}


def test_synthetic_volumes_are_generated_once_and_shared_by_seeds(base, synthetic_experiment) -> None:
    out_dir = run_dir(base, "syn")
    # Two generators × two classes: one sampling call each, although four runs pre-trained on them.
    assert [str(a[0]) for a in synthetic_experiment["loads"]] == [str(base["standard"]), str(base["rl"])]
    assert len(synthetic_experiment["samples"]) == 4
    for model in ("standard", "rl"):
        for c in CLASSES:
            volumes = np.load(out_dir / "synthetic" / model / f"{c}.npy")
            assert volumes.shape == (3, 1, 16, 16, 16) and np.abs(volumes).max() <= 1
        for seed in (0, 1):
            seed_dir = out_dir / "runs" / model / f"seed{seed}"
            done = json.loads((seed_dir / "pretrain" / "done.json").read_text())
            result = json.loads((seed_dir / "result.json").read_text())
            assert done["n_volumes"] == 6 and result["pretrain"] == done
            assert (seed_dir / "pretrain" / "logs" / "metrics.csv").is_file()
    assert not np.allclose(
        np.load(out_dir / "synthetic" / "standard" / "HGG.npy"),
        np.load(out_dir / "synthetic" / "rl" / "HGG.npy"),
    )
    table = read_csv(out_dir / "table3.csv")
    assert [r["protocol"] for r in table] == ["standard", "rl"] and all(r["n_seeds"] == "2" for r in table)
    assert "Missing protocols" not in (out_dir / "table3.md").read_text()


def test_rerun_skips_finished_runs_and_resumes_an_unfinished_one(
    base, synthetic_experiment, monkeypatch
) -> None:
    out_dir = run_dir(base, "syn")
    table = (out_dir / "table3.csv").read_text()
    executed = count_calls(monkeypatch, classify_stage, "execute")
    samples = count_calls(monkeypatch, generate_module, "generate_volumes")
    fits = count_calls(monkeypatch, runner, "fit")

    again = classify_stage.run(synthetic_experiment["cfg"], out_dir)
    assert executed == [] and samples == [] and fits == []  # nothing trained, nothing sampled
    assert (out_dir / "table3.csv").read_text() == table  # rebuilt from the stored results
    assert again["protocols"] == synthetic_experiment["outputs"]["protocols"]

    # An interrupted run (checkpoints, no result) resumes from its last.ckpt: fine-tuning is not repeated
    # (already at max_epochs), pre-training is skipped (done.json), the volumes come from the disk cache.
    unfinished = out_dir / "runs" / "rl" / "seed1"
    before = json.loads((unfinished / "result.json").read_text())
    (unfinished / "result.json").unlink()
    classify_stage.run(synthetic_experiment["cfg"], out_dir)
    assert [a[2] for a in executed] == [1] and samples == []
    (finetune_fit,) = fits  # only the fine-tuning phase was started, from its checkpoint
    assert finetune_fit[3] == unfinished / "finetune"
    after = json.loads((unfinished / "result.json").read_text())
    assert after["metrics"] == pytest.approx(before["metrics"]) and after["ckpt"] == before["ckpt"]
    assert (out_dir / "table3.csv").read_text() == table


def test_missing_rl_generator_is_reported_and_the_rest_runs(base, tmp_path: Path, capsys) -> None:
    publish(base, "norl", "diffusion")
    noise = tmp_path / "noise"
    noise.mkdir()
    gen = torch.Generator().manual_seed(0)
    for c in CLASSES:  # a Table 4-style baseline given as volumes; 4 per class, the first 3 are used
        np.save(noise / f"{c}.npy", (torch.rand(4, 1, 16, 16, 16, generator=gen) * 2 - 1).numpy())
    cfg = cfg_for(
        base, "norl", "stage.seeds=[0]", *SAMPLING, f"+stage.extra_generators.noise={noise}", "logger=wandb"
    )
    out_dir = run_dir(base, "norl")
    outputs = classify_stage.run(cfg, out_dir)
    # W&B: pre-training is a run of its own (phase=pretrain, no test scores); fine-tuning holds them.
    seed_dir = out_dir / "runs" / "noise" / "seed0"
    (pre,) = wandb_runs(seed_dir / "pretrain")  # no validation there: train curves only
    assert pre.name == "norl/classify/runs/noise/seed0/pretrain" and "train/loss" in pre.keys
    assert pre.config["phase"] == "pretrain" and pre.config["protocol"] == "noise"
    assert not any(k.startswith("test/") for k in pre.summary)
    fine = check_wandb_run(
        seed_dir / "finetune", "classify", "norl/classify/runs/noise/seed0/finetune", CLASSES
    )
    assert fine.config["phase"] == "finetune" and "test/auc" in fine.summary
    assert len(wandb_runs(out_dir)) == 5  # real: 1 run; standard, noise: pretrain + finetune

    assert "missing protocol — RL synthetic (ours): no ppo manifest" in capsys.readouterr().out
    table = read_csv(out_dir / "table3.csv")
    assert [r["protocol"] for r in table] == ["real", "standard", "noise"]
    assert all(math.isfinite(float(r["accuracy_mean"])) and r["accuracy_std"] == "" for r in table)  # 1 seed
    markdown = (out_dir / "table3.md").read_text()
    assert "## Missing protocols" in markdown and "`mrrl stage=ppo`" in markdown
    assert list(outputs["missing"]) == ["rl"]
    done = json.loads((out_dir / "runs" / "noise" / "seed0" / "pretrain" / "done.json").read_text())
    assert done["n_volumes"] == 6
    metrics = json.loads((out_dir / "metrics.json").read_text())
    noise_row = next(r for r in metrics["protocols"] if r["key"] == "noise")
    assert noise_row["synthetic"]["n_per_class"] == {"HGG": 3, "LGG": 3}


def test_changed_settings_retrain_and_bad_settings_are_clear_errors(base, monkeypatch) -> None:
    out_dir = run_dir(base, "cfgs")
    first = classify_stage.run(cfg_for(base, "cfgs", "stage.seeds=[0]"), out_dir)
    executed = count_calls(monkeypatch, classify_stage, "execute")
    # The decision threshold only re-scores the stored probabilities; the learning rate retrains.
    rescored = classify_stage.run(cfg_for(base, "cfgs", "stage.seeds=[0]", "stage.threshold=0.99"), out_dir)
    assert (
        executed == []
        and rescored["protocols"]["real"]["metrics"]["auc"] == first["protocols"]["real"]["metrics"]["auc"]
    )
    classify_stage.run(cfg_for(base, "cfgs", "stage.seeds=[0]", "stage.finetune.lr=2e-3"), out_dir)
    assert len(executed) == 1
    assert (
        json.loads((out_dir / "runs" / "real" / "seed0" / "run.json").read_text())["finetune"]["lr"] == 2e-3
    )

    with pytest.raises(ConfigError, match="stage.protocols names"):
        classify_stage.run(cfg_for(base, "cfgs", "stage.protocols=[real,bogus]"), out_dir)
    with pytest.raises(ConfigError, match="positive_class"):
        classify_stage.run(cfg_for(base, "cfgs", "stage.positive_class=GBM"), out_dir)
    with pytest.raises(ConfigError, match="stage.arch"):
        classify_stage.run(cfg_for(base, "cfgs", "stage.arch=vgg16"), out_dir)
    with pytest.raises(ConfigError, match="taken by a default protocol"):
        classify_stage.run(cfg_for(base, "cfgs", f"+stage.extra_generators.real={base['data']}"), out_dir)
    with pytest.raises(ConfigError, match="extra_generators.x: .* does not exist"):
        classify_stage.run(cfg_for(base, "cfgs", "+stage.extra_generators.x=/nonexistent"), out_dir)
    with pytest.raises(ConfigError, match="seeds"):
        classify_stage.run(cfg_for(base, "cfgs", "stage.seeds=[]"), out_dir)


def test_two_ranks_share_the_sampling_then_train_together(base, tmp_path: Path) -> None:
    """``trainer=ddp_cpu`` through the real CLI: Fabric starts the 2 gloo ranks before sampling, they share
    each class's volumes (deterministic DDIM: the ones a single process makes), and the classifier Trainers
    run on the same two ranks; one table, written by rank 0."""
    publish(base, "ddp1", "diffusion")
    publish(base, "ddp2", "diffusion")
    args = ["stage.seeds=[0]", "stage.protocols=[standard]", *SAMPLING, "stage.eta=0.0", "logger=none"]
    classify_stage.run(cfg_for(base, "ddp1", *args), run_dir(base, "ddp1"))

    cli_args = [
        *TINY,
        *DATA,
        f"data.root={base['data']}",
        "experiment_name=ddp2",
        f"paths.run_root={base['runs']}",
    ]
    result = run_mrrl(*cli_args, *args, "trainer=ddp_cpu", env={"OMP_NUM_THREADS": "1"}, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out_dir = run_dir(base, "ddp2")
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (out_dir / "train_ddp_process_1.log").read_text()
    for c in CLASSES:
        ddp = np.load(out_dir / "synthetic" / "standard" / f"{c}.npy")
        one = np.load(run_dir(base, "ddp1") / "synthetic" / "standard" / f"{c}.npy")
        assert ddp.shape == (3, 1, 16, 16, 16) and np.allclose(ddp, one, atol=1e-5), c
    done = json.loads((out_dir / "runs" / "standard" / "seed0" / "pretrain" / "done.json").read_text())
    assert done["n_volumes"] == 6
    assert [r["protocol"] for r in read_csv(out_dir / "table3.csv")] == ["standard"]
    assert result.stdout.count("Table 3") <= 1 and len(list(out_dir.rglob("manifest.json"))) == 1


def test_paired_difference_interval_and_verdict() -> None:
    """The fast bootstrap metrics equal ``binary_metrics``; a clearly better protocol is called better,
    an identical one is not, and different test subjects are refused."""
    from mrrl.classify.metrics import _fast_metrics, difference_verdict, paired_difference

    rng = np.random.default_rng(0)
    targets = np.array([0, 1] * 30)
    for _ in range(5):
        probs = rng.uniform(0, 1, targets.size)
        probs[:4] = 0.5  # ties
        expected = binary_metrics(probs.tolist(), targets.tolist(), 0.5)
        assert _fast_metrics(probs, targets, 0.5) == pytest.approx(
            tuple(expected[m] for m in ("accuracy", "f1", "auc")), abs=1e-6
        )

    def runs(signal: float) -> dict:
        return {
            s: (np.clip(0.5 + signal * (targets - 0.5) + rng.normal(0, 0.25, targets.size), 0, 1), targets)
            for s in range(3)
        }

    good, weak = runs(0.6), runs(0.05)
    diff = paired_difference(good, weak, n_boot=200, seed=0)
    assert diff["accuracy"]["n_seeds"] == 3 and diff["auc"]["low"] > 0
    assert difference_verdict(diff["auc"], "rl better", "rl worse") == "rl better"
    same = paired_difference(weak, weak, n_boot=50)
    assert (
        same["accuracy"]["value"] == 0
        and difference_verdict(same["accuracy"], "b", "w") == "no detectable difference"
    )
    with pytest.raises(ValueError, match="different subjects"):
        paired_difference(good, {s: (p, 1 - t) for s, (p, t) in weak.items()}, n_boot=5)


def test_table3_shows_paired_differences_between_protocols(base, synthetic_experiment) -> None:
    markdown = (run_dir(base, "syn") / "table3.md").read_text()
    assert "## Paired differences (row − column protocol)" in markdown
    assert "RL synthetic (ours) − Standard synthetic | 2 |" in markdown
    metrics = json.loads((run_dir(base, "syn") / "metrics.json").read_text())
    (pair,) = metrics["paired"]
    assert (pair["a"], pair["b"]) == ("rl", "standard")
    est = pair["difference"]["accuracy"]
    assert est["low"] <= est["value"] <= est["high"]

"""The experiment report: fake stage manifests and logs shaped like the real ones, no training."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from mrrl.manifest import write_manifest
from mrrl.report.build import write_report
from mrrl.report.cli import main
from mrrl.report.experiment import discover_ablations
from mrrl.report.ppo import ppo_series

CLASSES = ["HGG", "LGG"]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16  # enough to be a file the report links to


def config(name: str, dataset: str = "brats2019", base: str | None = None, **stage) -> dict:
    cfg = {"experiment_name": name, "data": {"name": dataset}, "stage": stage}
    if base:
        cfg["ablation"] = {"base_experiment": base, "label": f"{name} row"}
        cfg["pipeline"] = {"stages": ["reward_data", "reward", "ppo", "evaluate", "classify"]}
    return cfg


def data_summary(dataset: str = "brats2019") -> dict:
    counts = {
        "train": {"HGG": 199, "LGG": 41, "All": 240},
        "val": {"HGG": 30, "LGG": 5, "All": 35},
        "test": {"HGG": 30, "LGG": 30, "All": 60},
        "total": {"HGG": 259, "LGG": 76, "All": 335},
    }
    return {
        "dataset": dataset,
        "root": "/data/brats",
        "classes": CLASSES,
        "modalities": ["flair"],
        "image_shape": [1, 64, 64, 64],
        "counts": counts,
        "split_file": "/runs/x/splits-brats2019.json",
    }


def write_check_data_and_vqgan(exp: Path, cfg: dict) -> None:
    write_manifest(exp / "check_data", "check_data", data_summary(), cfg)
    vqgan = {
        "best_ckpt": str(exp / "vqgan" / "checkpoints" / "best.ckpt"),
        "val": {"val/l1": 0.04123, "val/psnr": 27.314, "val/ssim": 0.81234, "val/codebook_usage": 0.4219},
        "latent_shape": [8, 16, 16, 16],
        "codebook_size": 512,
        "data": data_summary(),
    }
    (exp / "vqgan" / "figures").mkdir(parents=True)
    (exp / "vqgan" / "figures" / "val_reconstruction_0000400.png").write_bytes(PNG)
    write_manifest(exp / "vqgan", "vqgan", vqgan, cfg)


def write_reward_data(exp: Path, cfg: dict, steps=(10, 100), seconds: float = 600.0) -> None:
    run_dir = exp / "reward_data"
    run_dir.mkdir(parents=True)
    (run_dir / "fid_vs_steps.png").write_bytes(PNG)
    groups = []
    for c in CLASSES:
        for trajectory in ("synthetic", "reconstruction"):
            for s in steps:
                fid = 100.0 / s + (5 if trajectory == "synthetic" else 0)
                groups.append(
                    {
                        "group": f"{trajectory}-{s:03d}-{c}",
                        "trajectory": trajectory,
                        "steps": s,
                        "class": c,
                        "count": 16,
                        "fid": fid,
                        "reward": 0.25 if s == steps[0] else 0.875,
                        "seconds": 12.5,
                    }
                )
    outputs = {
        "groups": groups,
        "vqgan_limit_fid": {"HGG": 1.234, "LGG": 2.345},
        "extractor": "random3d(arch=resnet10,in_channels=1,seed=0)#4b21dd423c6d",
        "fid_plot": str((run_dir / "fid_vs_steps.png").resolve()),
        "num_volumes": 16 * len(groups),
        "seconds": seconds,
    }
    write_manifest(run_dir, "reward_data", outputs, cfg)


def write_reward(exp: Path, cfg: dict, rank_acc: float = 0.8125) -> None:
    run_dir = exp / "reward"
    models = {}
    for kind, spearman in (("r3d", 0.9123), ("r2d", 0.7456)):
        (run_dir / kind).mkdir(parents=True)
        (run_dir / kind / "group_scores.png").write_bytes(PNG)
        models[kind] = {
            "arch": "resnet18",
            "best_ckpt": str(run_dir / kind / "checkpoints" / "best.ckpt"),
            "val": {"mse": 0.01234, "spearman": spearman, "rank_acc": rank_acc if kind == "r3d" else 0.7},
            "train": {"mse": 0.005, "spearman": 0.99, "rank_acc": 0.97},
            "group_plot": str((run_dir / kind / "group_scores.png").resolve()),
        }
    split = {"mode": "within_group", "num_train": 100, "num_val": 28}
    write_manifest(run_dir, "reward", {"models": models, "split": split}, cfg)


def write_ppo_log(log_dir: Path, iterations: int = 4) -> None:
    """A Lightning CSV log: metric rows plus learning-rate-only rows with blank PPO cells."""
    log_dir.mkdir(parents=True, exist_ok=True)
    columns = ["epoch", "step", "lr-AdamW", "ppo/iteration", "ppo/reward_mean", "ppo/kl"]
    columns += [f"reward/total_{c}" for c in CLASSES] + [f"fid/{c}" for c in CLASSES] + ["fid/mean"]
    with (log_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for i in range(1, iterations + 1):
            writer.writerow({"epoch": i - 1, "step": 2 * i, "lr-AdamW": 1e-5})
            row = {
                "epoch": i - 1,
                "step": 2 * i,
                "ppo/iteration": i,
                "ppo/reward_mean": 0.1 * i,
                "ppo/kl": 0.001 * i,
                "reward/total_HGG": 0.1 * i + 0.05,
                "reward/total_LGG": 0.1 * i - 0.05,
            }
            if i % 2 == 0:
                row.update({"fid/HGG": 50.0 - i, "fid/LGG": 60.0 - i, "fid/mean": 55.0 - i})
            writer.writerow(row)


def write_ppo(exp: Path, cfg: dict) -> None:
    run_dir = exp / "ppo"
    write_ppo_log(run_dir / "logs")
    outputs = {
        "final_ckpt": str(run_dir / "ppo_final.ckpt"),
        "iterations": 4,
        "skipped_updates": 0,
        "metrics_csv": str((run_dir / "logs" / "metrics.csv").resolve()),
    }
    write_manifest(run_dir, "ppo", outputs, cfg)


def fid_table(rl_all: float) -> dict:
    return {
        "random3d": {
            "vqgan": {"HGG": 25.82, "LGG": 35.14, "All": 24.64},
            "standard": {"HGG": 53.98, "LGG": 62.28, "All": 50.38},
            "rl": {"HGG": 40.11, "LGG": 51.86, "All": rl_all},
        },
        "random2d": {
            "vqgan": {"HGG": 1.5, "LGG": 1.25, "All": 1.0},
            "standard": {"HGG": 3.5, "LGG": 3.25, "All": 3.0},
            "rl": {"HGG": 2.5, "LGG": 2.25, "All": 2.0},
        },
    }


def write_evaluate(exp: Path, cfg: dict, rl_all: float = 38.05) -> None:
    run_dir = exp / "evaluate"
    (run_dir / "figures").mkdir(parents=True)
    figures = []
    for c in CLASSES:
        (run_dir / "figures" / f"samples_{c}.png").write_bytes(PNG)
        figures.append(str((run_dir / "figures" / f"samples_{c}.png").resolve()))
    fid = fid_table(rl_all)
    # The evaluate stage's own numbers, deliberately not what a re-computation from `fid` would give.
    gap = {
        "random3d": {"HGG": 49.1, "LGG": 40.5, "All": 47.9},
        "random2d": {"HGG": 50.0, "LGG": 50.0, "All": 50.0},
    }
    labels = {"vqgan": "3D-VQGAN reconstruction", "standard": "Standard diffusion", "rl": "RL fine-tuned"}
    metrics = {
        "classes": CLASSES,
        "models": [{"key": k, "label": v} for k, v in labels.items()],
        "fid": fid,
        "gap_closed": gap,
        "missing": {},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "table2.md").write_text("# Table 2\n")
    outputs = {
        "table_md": str((run_dir / "table2.md").resolve()),
        "metrics_json": str((run_dir / "metrics.json").resolve()),
        "figures": figures,
        "fid": fid,
        "gap_closed": gap,
        "missing": {},
    }
    write_manifest(run_dir, "evaluate", outputs, cfg)


def protocol(label: str, accuracy: float, std: float) -> dict:
    metrics = {
        "accuracy": {"mean": accuracy, "std": std},
        "f1": {"mean": accuracy - 0.01, "std": std},
        "auc": {"mean": accuracy + 0.03, "std": None},
    }
    return {"label": label, "metrics": metrics, "per_seed": {str(s): {} for s in range(5)}}


def write_classify(exp: Path, cfg: dict, rl_accuracy: float = 0.71, only_rl: bool = False) -> None:
    protocols = {"rl": protocol("RL synthetic (ours)", rl_accuracy, 0.02)}
    if not only_rl:
        protocols = {
            "real": protocol("Real data only", 0.59, 0.07),
            "standard": protocol("Standard synthetic", 0.62, 0.05),
            **protocols,
        }
    write_manifest(exp / "classify", "classify", {"protocols": protocols, "missing": {}}, cfg)


def write_diffusion(exp: Path, cfg: dict) -> None:
    outputs = {
        "global_step": 100000,
        "val_loss": 0.0312,
        "latent_shape": [8, 16, 16, 16],
        "scale_factor": 0.9,
    }
    write_manifest(exp / "diffusion", "diffusion", outputs, cfg)


def full_experiment(root: Path, name: str = "brats2019") -> Path:
    exp = root / name
    cfg = config(name, w3d=0.5, w2d=0.5, kl_coef=0.01, num_steps=50)
    write_check_data_and_vqgan(exp, cfg)
    write_diffusion(exp, cfg)
    write_reward_data(exp, cfg)
    write_reward(exp, cfg)
    write_ppo(exp, cfg)
    write_evaluate(exp, cfg)
    write_classify(exp, cfg)
    return exp


def section(text: str, title: str) -> str:
    """The report's text from the heading starting with ``title`` to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(title)}.*?(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no section {title!r} in the report"
    return match.group(0)


def table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{text}")


def linked_files(text: str, report_dir: Path) -> list[Path]:
    return [report_dir / rel for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    exp = full_experiment(tmp_path_factory.mktemp("runs"))
    path = write_report(exp)
    assert path == exp / "report.md"
    return exp, path.read_text()


def test_table1_and_vqgan(full_report) -> None:
    _, text = full_report
    table1 = section(text, "Table 1")
    assert table_row(table1, "Split") == ["Split", "HGG", "LGG", "All"]
    assert table_row(table1, "Training") == ["Training", "199", "41", "240"]
    assert table_row(table1, "Testing") == ["Testing", "30", "30", "60"]
    assert table_row(table1, "Total") == ["Total", "259", "76", "335"]
    vqgan = section(text, "VQGAN")
    assert table_row(vqgan, "PSNR (dB)")[1] == "27.31"
    assert table_row(vqgan, "SSIM")[1] == "0.8123"
    assert table_row(vqgan, "L1")[1] == "0.0412"
    assert "vqgan/figures/val_reconstruction_0000400.png" in vqgan
    assert "Missing" not in text


def test_table2_per_extractor_with_gap_from_evaluate(full_report) -> None:
    _, text = full_report
    table2 = section(text, "Table 2")
    ours = table2.split("### Extractor `random2d`")[0]
    assert table_row(ours, "Method") == ["Method", "HGG", "LGG", "All"]
    assert table_row(ours, "3D-VQGAN reconstruction (limit)")[1:] == ["25.82", "35.14", "24.64"]
    assert table_row(ours, "Standard diffusion")[1:] == ["53.98", "62.28", "50.38"]
    assert table_row(ours, "RL (ours)")[1:] == ["40.11", "51.86", "38.05"]
    copied = ["49.1 %", "40.5 %", "47.9 %"]  # evaluate's numbers, not recomputed from the FIDs
    assert table_row(ours, "**Gap closed by RL**")[1:] == copied
    second = table2.split("### Extractor `random2d`")[1]
    assert table_row(second, "RL (ours)")[1:] == ["2.5", "2.25", "2"]
    assert table_row(second, "**Gap closed by RL**")[1:] == ["50.0 %"] * 3
    assert "Paper (Table 2)" in table2  # BraTS 2019: the published numbers beside ours
    assert "(evaluate/table2.md)" in table2


def test_table3_mean_and_std(full_report) -> None:
    _, text = full_report
    table3 = section(text, "Table 3").split("Paper (Table 3)")[0]
    assert table_row(table3, "Real data only") == [
        "Real data only",
        "5",
        "0.590 ± 0.070",
        "0.580 ± 0.070",
        "0.620",
    ]
    assert table_row(table3, "RL synthetic (ours)")[2] == "0.710 ± 0.020"
    assert table_row(table3, "Standard synthetic")[2] == "0.620 ± 0.050"


def test_reward_data_and_reward_models(full_report) -> None:
    exp, text = full_report
    data = section(text, "Reward dataset")
    rows = [
        line
        for line in data.splitlines()
        if line.startswith("| synthetic") or line.startswith("| reconstruction")
    ]
    assert len(rows) == 8  # 2 trajectories × 2 steps × 2 classes
    assert table_row(data, "synthetic")[:7] == ["synthetic", "10", "HGG", "16", "15", "0.250", "12.5"]
    assert "HGG 1.234, LGG 2.345" in data
    assert "`random3d(arch=resnet10,in_channels=1,seed=0)#4b21dd423c6d`" in data
    assert "reward_data/fid_vs_steps.png" in data
    models = section(text, "Reward models")
    r3d = [line for line in models.splitlines() if line.startswith("| R3D") and "| val |" in line]
    assert r3d and r3d[0].split("|")[4:7] == [" 0.0123 ", " 0.912 ", " 0.812 "]
    r2d = [line for line in models.splitlines() if line.startswith("| R2D") and "| val |" in line]
    assert r2d and " 0.746 " in r2d[0]
    assert all(p.is_file() for p in linked_files(models, exp))


def test_ppo_curves_are_plotted(full_report) -> None:
    exp, text = full_report
    ppo = section(text, "PPO")
    figure = exp / "report_figures" / "ppo_curves.png"
    assert figure.is_file() and figure.read_bytes()[:8] == PNG[:8] and figure.stat().st_size > 5000
    assert "report_figures/ppo_curves.png" in ppo
    assert table_row(ppo, "`ppo/reward_mean`")[1:] == ["0.1", "0.4"]
    assert table_row(ppo, "`ppo/kl`")[1:] == ["0.001", "0.004"]
    assert table_row(ppo, "`fid/HGG`")[1:] == ["48", "46"]  # probe points at iterations 2 and 4
    assert "Reward = 0.5·R3D + 0.5·R2D" in ppo


def test_figures_are_linked_relative(full_report) -> None:
    exp, text = full_report
    figures = section(text, "Mid-slice figures")
    linked = linked_files(figures, exp)
    assert [p.name for p in linked] == ["samples_HGG.png", "samples_LGG.png"]
    assert all(p.is_file() for p in linked)
    assert not any(Path(rel).is_absolute() for rel in re.findall(r"\]\(([^)]+)\)", text))


def test_ppo_series_skips_blank_cells_and_uses_iterations(tmp_path: Path) -> None:
    write_ppo_log(tmp_path, iterations=3)
    from mrrl.utils.io import read_metrics_csv

    series = ppo_series(read_metrics_csv(tmp_path))
    iterations, rewards = zip(*series["ppo/reward_mean"])
    assert iterations == (1.0, 2.0, 3.0) and rewards == pytest.approx((0.1, 0.2, 0.3))
    assert series["fid/LGG"] == [(2.0, 58.0)]
    assert "lr-AdamW" in series and "ppo/iteration" not in series


def test_partial_experiment_names_the_missing_stages(tmp_path: Path) -> None:
    exp = tmp_path / "demo"
    write_check_data_and_vqgan(exp, config("demo", dataset="phantom_tumor"))
    text = write_report(exp).read_text()
    assert table_row(section(text, "Table 1"), "Training")[1:] == ["199", "41", "240"]
    assert table_row(section(text, "VQGAN"), "PSNR (dB)")[1] == "27.31"
    for stage in ("diffusion", "reward_data", "reward", "ppo", "evaluate", "classify"):
        assert f"`mrrl stage={stage} experiment=demo`" in text, stage
    assert "Missing stages: `diffusion`, `reward_data`, `reward`, `ppo`, `evaluate`, `classify`" in text
    assert "## Table 5" not in text and not (exp / "report_figures" / "ppo_curves.png").exists()


def test_unfinished_manifest_and_ppo_in_progress(tmp_path: Path) -> None:
    exp = tmp_path / "demo"
    write_check_data_and_vqgan(exp, config("demo"))
    (exp / "diffusion").mkdir()
    (exp / "diffusion" / "manifest.json").write_text(json.dumps({"stage": "diffusion", "status": "running"}))
    write_ppo_log(exp / "ppo" / "logs", iterations=2)  # PPO still training: no manifest yet
    write_manifest(exp / "classify", "classify", {"protocols": ["not", "a", "mapping"]})
    text = write_report(exp).read_text()
    assert "Could not render this section: AttributeError" in section(text, "Table 3")
    assert "the `diffusion` stage did not finish" in section(text, "Latent diffusion")
    ppo = section(text, "PPO")
    assert "`mrrl stage=ppo experiment=demo`" in ppo and "unfinished run" in ppo
    assert (exp / "report_figures" / "ppo_curves.png").is_file()


@pytest.mark.parametrize("how", ["move", "copy"])
def test_moved_or_copied_experiment_links_its_own_figures(tmp_path: Path, how: str) -> None:
    exp = full_experiment(tmp_path / "cluster")
    other = tmp_path / "laptop" / "brats2019"
    (shutil.move if how == "move" else shutil.copytree)(str(exp), str(other))
    text = write_report(other).read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) >= 6 and all((other / rel).is_file() for rel in links)
    assert not any(rel.startswith("..") for rel in links)  # the copy's files, not the original's


def ablation(
    root: Path, name: str, base: str = "brats2019", fid_all: float = 47.05, acc: float = 0.67
) -> Path:
    exp = root / name
    cfg = config(name, base=base, w3d=1.0, w2d=0.0)
    if name == "ablation_3d_only":
        cfg["pipeline"] = {"stages": ["ppo", "evaluate", "classify"]}
    else:
        write_reward_data(exp, cfg, steps=(1, 99), seconds=240.0)
        write_reward(exp, cfg, rank_acc=0.79)
    write_ppo(exp, cfg)
    write_evaluate(exp, cfg, rl_all=fid_all)
    write_classify(exp, cfg, rl_accuracy=acc, only_rl=True)
    return exp


def test_table5_from_sibling_ablations(tmp_path: Path) -> None:
    main_dir = full_experiment(tmp_path)
    ablation(tmp_path, "ablation_3d_only", fid_all=43.92, acc=0.69)
    ablation(tmp_path, "ablation_sparse_steps")
    ablation(tmp_path, "ablation_other_dataset", base="oasis1")  # made from another experiment: left out
    assert list(discover_ablations(main_dir)) == ["ablation_sparse_steps", "ablation_3d_only"]
    text = write_report(main_dir).read_text()
    table5 = section(text, "Table 5").split("Paper (Table 5")[0]
    assert table_row(table5, "Configuration")[:4] == [
        "Configuration",
        "FID All (random3d)",
        "FID All (random2d)",
        "Accuracy",
    ]
    assert table_row(table5, "Full framework") == [
        "Full framework",
        "38.05",
        "2",
        "0.710 ± 0.020",
        "0.812",
        "600 s",
    ]
    sparse = table_row(table5, "ablation_sparse_steps row")
    assert sparse == ["ablation_sparse_steps row", "47.05", "2", "0.670 ± 0.020", "0.790", "240 s (-60 %)"]
    only_3d = table_row(table5, "ablation_3d_only row")
    assert only_3d == ["ablation_3d_only row", "43.92", "2", "0.690 ± 0.020", "shared", "shared"]
    assert "ablation_other_dataset" not in text
    assert "[report](../ablation_sparse_steps/report.md)" in table5
    assert "## Table 5" not in write_report(main_dir, ablations={}).read_text()
    chosen = write_report(main_dir, ablations={"3d": tmp_path / "ablation_3d_only"}).read_text()
    assert "ablation_3d_only row" in chosen and "ablation_sparse_steps row" not in chosen
    # The ablation's own report: shared stages point at the base run instead of asking to run them.
    own = write_report(tmp_path / "ablation_3d_only").read_text()
    assert "## Table 5" not in own and "[its report](../brats2019/report.md)" in own
    assert "mrrl stage=vqgan" not in own and "mrrl stage=reward " not in own


def test_cli(tmp_path: Path, capsys) -> None:
    exp = tmp_path / "demo"
    write_check_data_and_vqgan(exp, config("demo"))
    assert main([str(exp), "--no-ablations"]) == 0
    assert capsys.readouterr().out.strip() == str(exp / "report.md")
    assert main([str(tmp_path / "nope")]) == 1
    assert "no experiment folder" in capsys.readouterr().err
    # A run named on the command line (no conf/experiment/<name>.yaml): the hint names experiment_name.
    custom = tmp_path / "my_run"
    write_check_data_and_vqgan(custom, config("my_run"))
    assert main([str(custom)]) == 0
    assert "`mrrl stage=diffusion experiment_name=my_run" in (custom / "report.md").read_text()


def test_ablation_configs_reuse_the_brats_run(tmp_path: Path) -> None:
    from mrrl.pipeline import compose_config

    root = f"paths.run_root={tmp_path}"
    sparse = compose_config(["experiment=ablation_sparse_steps", "stage=reward_data", root])
    assert list(sparse.stage.synthetic_steps) == list(sparse.stage.reconstruction_steps) == [1, 50, 99]
    assert sparse.stage.diffusion_ckpt == f"{tmp_path}/brats2019/diffusion/checkpoints/ema.pt"
    assert sparse.data.split_file == f"{tmp_path}/brats2019/splits-brats2019.json"
    assert (
        sparse.data.name == "brats2019" and sparse.paths.experiment_dir == f"{tmp_path}/ablation_sparse_steps"
    )
    assert list(sparse.pipeline.stages) == ["reward_data", "reward", "ppo", "evaluate", "classify"]
    only_3d = compose_config(["experiment=ablation_3d_only", "stage=ppo", root])
    assert (only_3d.stage.reward.w3d, only_3d.stage.reward.w2d) == (1.0, 0.0)
    assert only_3d.stage.reward.r3d_ckpt == f"{tmp_path}/brats2019/reward/r3d/checkpoints/best.ckpt"
    assert only_3d.stage.diffusion_ckpt == f"{tmp_path}/brats2019/diffusion/checkpoints/best.ckpt"
    assert list(only_3d.pipeline.stages) == ["ppo", "evaluate", "classify"]
    evaluate = compose_config(["experiment=ablation_3d_only", "stage=evaluate", root])
    assert evaluate.stage.vqgan_ckpt == f"{tmp_path}/brats2019/vqgan/checkpoints/best.ckpt"
    classify = compose_config(["experiment=ablation_sparse_steps", "stage=classify", root])
    assert list(classify.stage.protocols) == ["rl"]


def test_table2_shows_intervals_floor_premises_and_verdicts(tmp_path: Path) -> None:
    """evaluate's intervals reach report.md: headline FID/KID with intervals, gap closed with its verdict,
    the noise floor and the premises with pass/fail marks."""
    import torch

    from mrrl.evaluation.calibration import premise_checks
    from mrrl.metrics.intervals import bootstrap_scores, split_half_floor
    from mrrl.report.build import build_report

    exp = tmp_path / "brats2019"
    cfg = config("brats2019")
    write_evaluate(exp, cfg)
    gen = torch.Generator().manual_seed(0)

    def rows(n, shift):
        return {c: torch.randn(n, 6, generator=gen) + shift for c in CLASSES}

    real = rows(30, 0.0)
    fake = {"vqgan": rows(40, 0.2), "standard": rows(40, 1.5), "rl": rows(40, 0.6)}
    fake |= {f"ladder_t{t:03d}": rows(30, t / 50) for t in (0, 50, 99)}
    calibration = {f"ladder_t{t:03d}": {"kind": "ladder", "t": t, "num_steps": 100} for t in (0, 50, 99)}
    iv = bootstrap_scores(real, fake, 30, 0)
    floor = split_half_floor(real, 5)
    metrics_path = exp / "evaluate" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["models"] = [{**m, "n_per_class": {c: 40 for c in CLASSES}} for m in metrics["models"]]
    metrics |= {
        "intervals": {"random2d": iv},
        "floor": {"random2d": floor},
        "calibration": calibration,
        "premises": {c: premise_checks(iv, calibration, floor, c) for c in [*CLASSES, "All"]},
        "headline": {
            "extractor": "random2d",
            "identity": "random2d(seed=0)#x",
            "held_out": True,
            "coincides_with": [],
            "checked": ["reward_data (reward labels)"],
        },
    }
    metrics_path.write_text(json.dumps(metrics))
    table2 = section(build_report(exp), "Table 2")
    assert "### Headline: random2d (held out ✓)" in table2
    assert "— RL better" in table2 and "Noise floor" in table2
    assert "| reconstruction FID rises with t | All |" in table2 and "pass ✓" in table2
    assert "**random2d**" in table2  # the ladder table


def test_stage_rows_come_from_the_stage_registry(tmp_path: Path) -> None:
    """The report lists the registry's pipeline stages, in pipeline order, and keeps no list of its own."""
    import mrrl.report.experiment as experiment
    from mrrl.manifest import PIPELINE_STAGES

    assert experiment.PIPELINE_STAGES is PIPELINE_STAGES
    exp = tmp_path / "empty"
    exp.mkdir()
    text = write_report(exp, ablations={}).read_text()
    rows = re.findall(r"^\| `(\w+)` \| has not run \|", text, flags=re.M)
    assert rows == list(PIPELINE_STAGES)
    assert "Missing stages: " + ", ".join(f"`{s}`" for s in PIPELINE_STAGES) + " —" in text


def test_manifests_are_read_through_manifest_py(tmp_path: Path) -> None:
    from mrrl.manifest import try_read_manifest

    exp = tmp_path / "exp"
    write_manifest(exp / "vqgan", "vqgan", {"val": {}})
    assert try_read_manifest(exp, "vqgan")[0]["outputs"] == {"val": {}}
    assert try_read_manifest(exp, "vqgan")[1] == ""
    assert try_read_manifest(exp, "diffusion") == (None, "has not run")
    (exp / "ppo").mkdir()
    (exp / "ppo" / "manifest.json").write_text('{"status": "running"}')
    assert try_read_manifest(exp, "ppo") == (None, "did not finish")
    (exp / "reward").mkdir()
    (exp / "reward" / "manifest.json").write_text("[1, 2]")
    manifest, why = try_read_manifest(exp, "reward")
    assert manifest is None and why.startswith("has an unreadable manifest (a JSON list")
    (exp / "evaluate").mkdir()
    (exp / "evaluate" / "manifest.json").write_text("{oops")
    assert try_read_manifest(exp, "evaluate")[1].startswith("has an unreadable manifest (")
    text = write_report(exp, ablations={}).read_text()
    assert "the `reward` stage has an unreadable manifest (a JSON list" in text
    assert "the `ppo` stage did not finish" in text


def test_paper_gap_uses_the_evaluate_stage_formula(full_report) -> None:
    """The paper's gap closed is computed by the same gap_share as the evaluate stage's intervals."""
    import mrrl.report.paper as paper
    from mrrl.metrics.intervals import gap_share
    from mrrl.utils.markdown import percent

    _, text = full_report
    published = paper.TABLE2["brats2019"]
    expected = [
        percent(gap_share(*v)) for v in zip(published["standard"], published["rl"], published["vqgan"])
    ]
    assert table_row(section(text, "Table 2").split("Paper (Table 2)")[1], "Gap closed by RL")[1:] == expected
    assert expected[-1] == "47.9 %"  # the paper's headline: RL closes 47.9 % of the standard → limit gap


def test_ppo_settings_line_reads_the_grouped_and_the_flat_ppo_config():
    from mrrl.report.ppo import _ppo_settings

    grouped = {
        "stage": {
            "reward": {"w3d": 0.7, "w2d": 0.3},
            "train": {"kl": {"coef": 0.05}},
            "sample": {"num_steps": 16},
        }
    }
    flat = {"stage": {"w3d": 0.7, "w2d": 0.3, "kl_coef": 0.05, "num_steps": 16}}
    expected = "Reward = 0.7·R3D + 0.3·R2D, KL coefficient 0.05, 16 sampler steps per rollout."
    assert _ppo_settings(grouped) == expected == _ppo_settings(flat)
    assert _ppo_settings({"stage": {}}) == ""

"""benchmarks/gpu_check.py: the CPU smoke run of the prepared GPU check (same code paths, tiny), so the check
cannot rot while no GPU is at hand; its budget, its NaN detection and its target verdicts."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# monai_bench.py is not part of the repository: the check finds it in the git-ignored .bench/ (copied there
# by benchmarks/gpu_check.sh) or beside the checkout in ../shared/bench/.
BASELINES = [REPO / ".bench" / "monai_bench.py", REPO.parent / "shared" / "bench" / "monai_bench.py"]
BASELINE = next((p for p in BASELINES if p.is_file()), None)
needs_baseline = pytest.mark.skipif(
    BASELINE is None,
    reason="the stock-MONAI baseline monai_bench.py is not in .bench/ or ../shared/bench/ "
    "(benchmarks/gpu_check.sh --prepare copies it there)",
)


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """One smoke run: every stage end to end at 16³, every benchmark case and (when found) the baselines."""
    out = tmp_path_factory.mktemp("gpu_check")
    argv = ["--device", "cpu", "--smoke", "--out", str(out)]
    argv += ["--baseline", str(BASELINE if BASELINE else out / "missing" / "monai_bench.py")]
    status = gpu_check.main(argv)
    return {"status": status, "out": out, "report": json.loads((out / "gpu_check.json").read_text())}


def test_smoke_runs_every_stage_end_to_end(smoke) -> None:
    assert smoke["status"] == 0
    report = smoke["report"]
    e2e = {r["name"]: r for r in report["records"] if r["part"] == "e2e"}
    assert list(e2e) == list(gpu_check.STAGES)
    assert all(r["status"] == "ok" for r in e2e.values()), {k: r.get("error") for k, r in e2e.items()}
    for stage in gpu_check.STAGES:  # through the real entry: each stage wrote its manifest
        manifest = smoke["out"] / "runs" / "gpu_check" / stage / "manifest.json"
        assert json.loads(manifest.read_text())["stage"] == stage
    assert report["e2e_ok"] is True


def test_smoke_times_every_case_and_writes_the_table(smoke) -> None:
    records = [r for r in smoke["report"]["records"] if r["part"] == "bench"]
    names = {r["name"] for r in records}
    for wanted in ("vqgan 64 b2 fp32", "diffusion train b16 bf16", "ppo K50 bf16", "classifier step b8 bf16"):
        assert wanted in names
    assert any("+grad-ckpt" in n for n in names) and any("+channels-last" in n for n in names)
    for r in records:
        assert r["status"] == "ok", (r["name"], r.get("error"))
        assert r["throughput"] > 0 and math.isfinite(r["throughput"]) and r["peak_mib"] > 0
    rows = {r["name"]: r for r in smoke["report"]["comparisons"]}
    assert rows["PPO iteration K=50"]["peak_k50_over_k10"] > 0
    markdown = (smoke["out"] / "gpu_check.md").read_text()
    assert "| case | unit | mrrl | baseline | ratio |" in markdown and "## End to end" in markdown
    if BASELINE is None:  # a missing baseline script is reported, not silently left out
        skipped = smoke["report"]["skipped"]
        assert any(s["part"] == "baseline" and "gpu_check.sh" in s["why"] for s in skipped)


@needs_baseline
def test_smoke_compares_every_case_with_its_monai_baseline(smoke) -> None:
    rows = {r["name"]: r for r in smoke["report"]["comparisons"]}
    baselines = [r for r in smoke["report"]["records"] if r["part"] == "baseline"]
    assert {r["name"] for r in baselines} >= {"vqgan 64 b2 fp32", "diffusion train b16 bf16", "ppo K50 bf16"}
    assert all(r["status"] == "ok" and r["throughput"] > 0 for r in baselines), baselines
    vq = rows["VQGAN G+D 64³ b2 fp32"]
    assert vq["speed_ratio"] == pytest.approx(vq["mrrl_throughput"] / vq["baseline_throughput"])


def test_a_spent_budget_skips_and_names_every_case(tmp_path: Path, capsys) -> None:
    status = gpu_check.main(
        ["--device", "cpu", "--smoke", "--out", str(tmp_path), "--parts", "bench", "--budget-s", "0"]
    )
    assert status == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    planned = [name for part, name, _, _ in gpu_check.plan(gpu_check.SMOKE, torch.device("cpu"), None)[0]]
    assert report["records"] == [] and [s["name"] for s in report["skipped"]] == planned
    assert "SKIPPED bench/vqgan 64 b2 fp32" in capsys.readouterr().out
    assert "## Skipped" in (tmp_path / "gpu_check.md").read_text()


def test_a_case_running_past_the_budget_is_stopped_and_the_rest_skipped() -> None:
    results, budget, device = gpu_check.Results(), gpu_check.Budget(0.2), torch.device("cpu")

    def forever() -> dict:
        while True:
            time.sleep(0.01)

    record = gpu_check.measured(results, budget, "bench", "endless", 0.0, device, forever)
    assert record is not None and record["status"] == "stopped" and "budget" in record["error"]
    assert gpu_check.measured(results, budget, "bench", "next", 0.0, device, lambda: {}) is None
    assert results.skipped == [{"part": "bench", "name": "next", "why": results.skipped[0]["why"]}]


def test_non_finite_values_in_stage_outputs_are_found(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    good = {"state_dict": {"w": torch.ones(2)}, "callbacks": {"best_model_score": float("inf")}}
    torch.save(good, tmp_path / "ckpt" / "last.ckpt")
    assert gpu_check.non_finite(tmp_path) == []  # a callback's inf bookkeeping is not a weight
    torch.save({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "ckpt" / "best.ckpt")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("step,train/loss\n0,0.5\n1,nan\n")
    (tmp_path / "manifest.json").write_text('{"outputs": {"fid": NaN}}')
    problems = gpu_check.non_finite(tmp_path)
    assert "ckpt/best.ckpt.w" in problems and "logs/metrics.csv:3:train/loss" in problems
    assert "manifest.outputs.fid" in problems and len(problems) == 3


def test_verdicts_say_by_how_much_a_target_is_missed() -> None:
    results = gpu_check.Results()
    results.add(part="bench", name="m", status="ok", throughput=750.0, unit="latents/s", peak_mib=2048.0)
    results.add(part="baseline", name="b", status="ok", throughput=500.0, unit="latents/s", peak_mib=4096.0)
    results.add(part="bench", name="v", status="ok", throughput=40.0, unit="volumes/s", peak_mib=100.0)
    results.add(part="baseline", name="vb", status="ok", throughput=2.0, unit="volumes/s", peak_mib=2000.0)
    rows = gpu_check.compare(
        results,
        [
            gpu_check.Comparison("train", "m", "b", "≥ 1500 latents/s", min_throughput=1500.0),
            gpu_check.Comparison("vq", "v", "vb", "≥10× at ≤1/10 memory", 10.0, 0.1),
            gpu_check.Comparison("absent", "nothing", None, "≥ 1", min_throughput=1.0),
        ],
    )
    assert rows[0]["speed_ratio"] == pytest.approx(1.5) and rows[0]["memory_ratio"] == pytest.approx(0.5)
    assert rows[0]["verdict"].startswith("MISSED") and "short by 2.0×" in rows[0]["verdict"]
    assert rows[1]["verdict"] == "met"
    assert rows[2]["verdict"] == "not measured"
    # a larger batch of the same case tells launch-bound from compute-bound; a full device: memory-bound
    results.add(part="bench", name="m64", status="ok", throughput=1200.0, unit="latents/s", peak_mib=4096.0)
    launch = gpu_check.Comparison("b16", "m", None, "≥ 1500", min_throughput=1500.0, larger="m64")
    assert "launch-bound: ×1.6 throughput" in gpu_check.compare(results, [launch])[0]["verdict"]
    assert (
        "memory-bound (peak 2 of 2 GiB)" in gpu_check.compare(results, [launch], device_gib=2.2)[0]["verdict"]
    )


def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


def run_the_gpu_plan_on_fakes(monkeypatch):
    """The paper-scale plan with every benchmark and baseline call replaced by a recorder: (parsed benchmark
    arguments, baseline calls, comparisons, results)."""
    parsed: list[tuple[str, object]] = []
    fake = {"volumes_per_s": 1.0, "peak_mib": 1.0}
    for name in ("vqgan_throughput", "ppo_iteration", "reward_throughput", "classify_throughput"):
        module = gpu_check.bench_module(name)
        monkeypatch.setattr(module, "run_case", lambda args, name=name: parsed.append((name, args)) or fake)
    diffusion = gpu_check.bench_module("diffusion_throughput")
    timing = {"s_per_step": 0.1, "s_per_volume": 0.1, "peak_mib": 1.0}
    fake_diffusion = {"training": {"cached latents": timing}, "sampling": {"ddim": timing}}
    monkeypatch.setattr(
        diffusion, "measure", lambda args: parsed.append(("diffusion", args)) or fake_diffusion
    )

    class FakeBench:  # records the calls; checked against the real signatures when monai_bench.py is here
        calls: list[tuple[str, dict]] = []

        def __getattr__(self, attr):
            return lambda device, **kw: self.calls.append((attr, kw)) or {"volumes_per_s": 1.0}

    bench = FakeBench()
    items, comparisons = gpu_check.plan(gpu_check.PAPER, torch.device("cpu"), bench)
    results = gpu_check.Results()
    for part, name, estimate, fn in items:
        assert estimate > 0, name  # the GPU budget skips by these
        results.add(part=part, name=name, status="ok", **fn())
    return parsed, bench.calls, comparisons, results


def test_the_gpu_plan_parses_and_every_comparison_has_its_cases(monkeypatch) -> None:
    """The paper-scale plan (what runs on the GPU) without running it: every benchmark's argument list parses,
    every table row names planned cases."""
    parsed, _, comparisons, results = run_the_gpu_plan_on_fakes(monkeypatch)
    assert all(args.preset == "paper" and args.device == "cpu" for _, args in parsed)
    assert {a.image_size for n, a in parsed if n == "vqgan_throughput"} == {64, 128}
    assert any(n == "diffusion" and a.sample_batch == 256 and a.ddim_steps == 100 for n, a in parsed)
    assert any(n == "ppo_iteration" and a.case == "K=50" for n, a in parsed)
    planned = {(r["part"], r["name"]) for r in results.records}
    for c in comparisons:
        assert ("bench", c.mrrl) in planned, c.name
        assert c.baseline is None or ("baseline", c.baseline) in planned, c.name
    rows = gpu_check.compare(results, comparisons)
    assert all(r["verdict"] != "not measured" for r in rows)


@needs_baseline
def test_every_baseline_call_of_the_plan_fits_monai_bench(monkeypatch) -> None:
    import inspect

    _, calls, _, _ = run_the_gpu_plan_on_fakes(monkeypatch)
    assert calls
    real = gpu_check.load_baseline(BASELINE)
    for attr, kw in calls:
        inspect.signature(getattr(real, attr)).bind(torch.device("cpu"), **kw)


def test_a_failing_stage_fails_the_check_and_skips_the_stages_after_it(tmp_path: Path, capsys) -> None:
    argv = ["--device", "cpu", "--smoke", "--out", str(tmp_path), "--parts", "e2e", "--precision", "bf17"]
    assert gpu_check.main(argv) == 1  # the up-front config check refuses the precision in the first stage
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    e2e = {r["name"]: r for r in report["records"]}
    assert e2e["check_data"]["status"] == "error" and report["e2e_ok"] is False
    assert [s["name"] for s in report["skipped"]] == list(gpu_check.STAGES[1:])
    assert all(s["why"] == "stage check_data did not finish" for s in report["skipped"])
    captured = capsys.readouterr()
    assert "trainer.precision=bf17" in captured.out + captured.err
    assert "Traceback" in captured.err and "FAILED: an end-to-end stage failed" in captured.err

"""One prepared GPU check: every stage end to end on CUDA, each stage's step timed, the stock-MONAI baselines.

Made for short GPU windows (issue 19): one command, a few minutes, stops by itself inside ``--budget-s``.

1. **End to end** (``e2e``): a phantom cohort is generated, then check_data, vqgan, diffusion, reward_data,
   reward, ppo, evaluate and classify run for a few steps each at 64³ through the real entry
   (``mrrl.cli.run_stage`` on a config composed from ``conf/`` with command-line overrides, what
   ``python -m mrrl stage=...`` runs), with ``trainer=gpu`` and the precision ``conf/trainer/ddp.yaml`` gives
   the users' GPU runs (bf16-mixed). A stage fails loudly on any exception (device mismatch, dtype error),
   on a non-finite value in what it wrote (checkpoints, metrics.csv, manifest) and, on CUDA, when it
   allocated nothing on the GPU.
2. **Benchmarks** (``bench``): each stage's step timed with its peak memory, plain and with the
   ``stage.speed`` options, through the ``benchmarks/*_throughput.py`` / ``ppo_iteration.py`` cases (called in
   this process; CUDA peak memory is ``torch.cuda.max_memory_allocated`` after a reset).
3. **Baselines** (``baseline``): the cases of ``monai_bench.py`` (DESIGN's stock-MONAI anchors) at the same
   shapes, in this process on the same GPU. The GPU machine cannot see ``../shared``: copy the script into the
   git-ignored ``.bench/`` of the checkout first (``benchmarks/gpu_check.sh`` says how) or pass ``--baseline``.

Writes ``gpu_check.json`` (every measurement, every skip, the environment) and ``gpu_check.md`` (the
mrrl / baseline ratios against the issue's targets, and by how much a missed target misses) into ``--out``.
Exit status 1 when an end-to-end stage failed; measurements that fail or run out of memory are recorded.

    python benchmarks/gpu_check.py --out gpu_check_out                     # CUDA, 480 s budget
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/smoke   # the same code paths, tiny (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import math
import platform
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(BENCH_DIR), str(REPO)]

import torch  # noqa: E402
from _common import PeakMemory, device_name  # noqa: E402

DEFAULT_BASELINE = REPO / ".bench" / "monai_bench.py"
STAGES = ("check_data", "vqgan", "diffusion", "reward_data", "reward", "ppo", "evaluate", "classify")
GIB = 1024.0


class BudgetExceeded(Exception):
    """Raised by the alarm when the budget is spent in the middle of a measurement."""


# ------------------------------------------------------------------------------------------------ budget


class Budget:
    """Wall-clock budget. ``fits(estimate)`` decides before a piece of work; a SIGALRM at the deadline stops
    one that runs over (main thread only; a kernel in flight finishes first)."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.monotonic()
        self._armed = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def fits(self, estimate: float) -> bool:
        return self.remaining() >= estimate

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Raise :class:`BudgetExceeded` inside the block once the budget is spent."""
        if not hasattr(signal, "setitimer") or self._armed:
            yield
            return

        def _alarm(signum, frame):
            raise BudgetExceeded(f"budget of {self.seconds:.0f} s spent")

        previous = signal.signal(signal.SIGALRM, _alarm)
        outer, outer_interval = signal.getitimer(signal.ITIMER_REAL)  # e.g. pytest-timeout's alarm
        entered = time.monotonic()
        delay = max(self.remaining(), 0.01)
        signal.setitimer(signal.ITIMER_REAL, min(delay, outer) if outer > 0 else delay)
        self._armed = True
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer > 0:  # give the outer alarm back what is left of it
                left = max(outer - (time.monotonic() - entered), 0.01)
                signal.setitimer(signal.ITIMER_REAL, left, outer_interval)
            self._armed = False


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Results:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, **record: Any) -> dict[str, Any]:
        self.records.append(record)
        return record

    def skip(self, part: str, name: str, why: str) -> None:
        self.skipped.append({"part": part, "name": name, "why": why})
        print(f"[gpu_check] SKIPPED {part}/{name}: {why}", flush=True)

    def get(self, part: str, name: str) -> dict[str, Any] | None:
        return next((r for r in self.records if r["part"] == part and r["name"] == name), None)


def free_memory(device: torch.device) -> None:
    """Between CUDA measurements: drop the last case's tensors (the CPU peak is reset per case anyway)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measured(
    results: Results,
    budget: Budget,
    part: str,
    name: str,
    estimate: float,
    device: torch.device,
    fn: Callable[[], dict[str, Any]],
) -> dict[str, Any] | None:
    """Run one measurement if it fits the budget; record its result, its error or its OOM."""
    if not budget.fits(estimate):
        results.skip(part, name, f"needs ~{estimate:.0f} s, {budget.remaining():.0f} s left")
        return None
    print(f"[gpu_check] {budget.elapsed():6.1f} s  {part}/{name} ...", flush=True)
    free_memory(device)
    t0, cpu0 = time.monotonic(), time.process_time()
    try:
        with budget.guard():
            out = fn()
        record = results.add(part=part, name=name, status="ok", wall_s=time.monotonic() - t0, **out)
    except BudgetExceeded as exc:
        record = results.add(
            part=part, name=name, status="stopped", wall_s=time.monotonic() - t0, error=str(exc)
        )
    except torch.OutOfMemoryError as exc:
        record = results.add(
            part=part, name=name, status="oom", wall_s=time.monotonic() - t0, error=str(exc).splitlines()[0]
        )
    except Exception as exc:  # recorded, the check goes on with the next measurement
        record = results.add(
            part=part,
            name=name,
            status="error",
            wall_s=time.monotonic() - t0,
            error=f"{type(exc).__name__}: {exc}"[:2000],
            traceback=traceback.format_exc()[-4000:],
        )
    record["cpu_s"] = time.process_time() - cpu0
    free_memory(device)
    summary = {k: v for k, v in record.items() if k not in ("traceback", "part", "name")}
    print(f"[gpu_check] {part}/{name}: {json.dumps(summary, default=str)[:600]}", flush=True)
    return record


# ------------------------------------------------------------------------------------------ 1. end to end


@dataclass(frozen=True)
class Scale:
    """Sizes of one check: the GPU run (``paper``) or the CPU smoke run (``smoke``)."""

    size: int  # volume side of the end-to-end run
    n_per_class: int  # phantom volumes per class
    resolution_mm: float  # phantom voxel size before resizing to ``size``
    stage_overrides: dict[str, list[str]]
    bench_preset: str  # preset of the benchmark scripts
    warmup: int
    steps: int


_E2E_COMMON = {
    "vqgan": [
        "stage.trainer.max_epochs=1",
        "+stage.trainer.limit_train_batches=3",
        "+stage.trainer.limit_val_batches=1",
        "stage.trainer.check_val_every_n_epoch=1",
        "stage.loss.adv_start_step=1",
        "stage.num_figure_volumes=1",
        "stage.progress_bar=false",
    ],
    "diffusion": [
        "stage.trainer.max_steps=3",
        "+stage.trainer.limit_val_batches=1",
        "stage.trainer.check_val_every_n_epoch=1",
        "stage.checkpoint_every_n_steps=null",
        "stage.optim.warmup_steps=0",
        "stage.sample_every_n_epochs=1",
        "stage.val_sampling_steps=2",
        "stage.val_samples_per_class=1",
        "stage.inference_steps=4",
        "stage.sample_batch_size=4",
        "stage.progress_bar=false",
    ],
    "reward_data": [
        "stage.n_per_group=2",
        "stage.synthetic_steps=[2,4]",
        "stage.reconstruction_steps=[1,2]",
        "stage.reconstruction_num_steps=4",
        "stage.sample_batch_size=4",
        "stage.metrics.batch_size=4",
        "stage.progress_bar=false",
    ],
    "reward": [
        "stage.trainer.max_epochs=1",
        "stage.num_workers=0",
        "stage.val_fraction=0.34",
        "stage.progress_bar=false",
    ],
    "ppo": [
        "stage.sample.num_steps=4",
        "stage.sample.batch_size=4",
        "stage.train.batch_size=2",
        "stage.probe.every=1",
        "stage.probe.n=2",
        "stage.figures.every=1",
        "stage.figures.volumes=1",
        "stage.trainer.max_epochs=2",
        "stage.progress_bar=false",
    ],
    "evaluate": [
        "stage.n_per_class=2",
        "stage.num_steps=4",
        "stage.sample_batch_size=4",
        "stage.metrics.batch_size=4",
        "stage.metrics.diversity_pairs=2",
        "stage.figure_volumes=1",
    ],
    "classify": [
        "stage.seeds=[0]",
        "stage.pretrain.max_epochs=1",
        "stage.finetune.max_epochs=1",
        "stage.n_synthetic_per_class=2",
        "stage.num_steps=4",
        "stage.sample_batch_size=4",
        "stage.batch_size=2",
        "stage.eval_batch_size=4",
        "stage.num_workers=0",
        "stage.progress_bar=false",
    ],
}

# The CPU smoke run: the tests' tiny networks (tests/helpers.py) at 16³.
_SMOKE_NETS = {
    "vqgan": [
        "stage.net.channels=[8,16]",
        "stage.net.num_res_blocks=1",
        "stage.net.codebook_size=32",
        "stage.net.codebook_dim=4",
        "stage.discriminator.channels=8",
        "stage.discriminator.num_layers=2",
        "stage.discriminator.slices_per_volume=2",
    ],
    "diffusion": [
        "stage.unet.channels=[8,8]",
        "stage.unet.attention_levels=[false,false]",
        "stage.unet.num_res_blocks=1",
        "stage.unet.num_head_channels=8",
        "stage.unet.norm_num_groups=8",
    ],
    "reward": [
        "stage.r3d.arch=resnet10",
        "stage.r3d.width=8",
        "stage.r3d.batch_size=2",
        "stage.r2d.arch=resnet10",
        "stage.r2d.width=8",
        "stage.r2d.batch_size=2",
        "stage.r2d.slices_per_volume=2",
    ],
    "ppo": ["stage.sample.batch_size=2", "stage.probe.every=0"],
    "evaluate": [
        "stage.num_steps=2",
        "stage.metrics.extractor_options.random2d.slice_size=16",
        # The instrument's checks at test size (tests/test_evaluate_stage.py TINY_CALIBRATION): the same code
        # paths, not 2 × 500 bootstrap resamples and a 100-step ladder (13 of the smoke run's 20 s of evaluate).
        "stage.calibration.ladder_steps=[0,2]",
        "stage.calibration.ladder_num_steps=4",
        "stage.calibration.synthetic_steps=[2,4]",
        "stage.intervals.n_boot=20",
        "stage.intervals.floor_splits=4",
    ],
    "classify": ["stage.arch=resnet10", "stage.net.widen_factor=0.25", "stage.num_steps=2"],
}


def _merge(*blocks: dict[str, list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for block in blocks:
        for key, values in block.items():
            out.setdefault(key, []).extend(values)
    return out


PAPER = Scale(64, 8, 3.0, _merge(_E2E_COMMON), "paper", warmup=3, steps=5)
SMOKE = Scale(16, 6, 6.0, _merge(_E2E_COMMON, _SMOKE_NETS), "tiny", warmup=0, steps=1)


def trainer_precision(device: torch.device, override: str | None) -> str:
    """The users' GPU precision (``conf/trainer/ddp.yaml``) on CUDA, ``32-true`` on the CPU."""
    if override:
        return override
    if device.type != "cuda":
        return "32-true"
    from omegaconf import OmegaConf

    return str(OmegaConf.load(REPO / "conf" / "trainer" / "ddp.yaml").precision)


def e2e_overrides(stage: str, scale: Scale, device: torch.device, precision: str, out: Path) -> list[str]:
    """The command line of one stage: ``python -m mrrl <these>``."""
    trainer = ["trainer=gpu", "trainer.devices=1"] if device.type == "cuda" else ["trainer=cpu"]
    return [
        f"stage={stage}",
        f"paths.run_root={out / 'runs'}",
        f"paths.data_root={out / 'data'}",  # the phantom cohort, kept between checks (built once)
        "experiment_name=gpu_check",
        "data=phantom_tumor",
        f"data.image_size={scale.size}",
        f"data.phantom.n_per_class={scale.n_per_class}",
        f"data.phantom.resolution_mm={scale.resolution_mm}",
        "data.test_per_class=2",
        "data.val_fraction=0.25",
        "data.batch_size=2",
        "data.progress=false",
        "logger=csv",
        *trainer,
        f"trainer.precision={precision}",
        "trainer.log_every_n_steps=1",
        *scale.stage_overrides.get(stage, []),
    ]


def compose(overrides: Sequence[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mrrl.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def non_finite(stage_dir: Path) -> list[str]:
    """Where the files a stage wrote hold NaN/Inf: checkpoint tensors, metrics.csv cells, manifest numbers."""
    from mrrl.utils.checkpoints import safe_load

    problems: list[str] = []

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
                problems.append(where)
        elif isinstance(obj, float):
            if not math.isfinite(obj):
                problems.append(where)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{where}.{key}")
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{where}[{i}]")

    def tensors(obj: Any) -> Any:  # a checkpoint's weights and buffers, not its callbacks' bookkeeping
        if isinstance(obj, dict) and "state_dict" in obj:
            return obj["state_dict"]
        if isinstance(obj, dict):
            return {k: tensors(v) for k, v in obj.items() if isinstance(v, (dict, list, tuple, torch.Tensor))}
        if isinstance(obj, (list, tuple)):
            return [tensors(v) for v in obj if isinstance(v, (dict, list, tuple, torch.Tensor))]
        return obj

    for path in sorted([*stage_dir.rglob("*.ckpt"), *stage_dir.rglob("*.pt")]):
        loaded = safe_load(path)
        walk(tensors(loaded), str(path.relative_to(stage_dir)))
    for path in sorted(stage_dir.rglob("metrics.csv")):
        import csv

        for row_number, row in enumerate(csv.DictReader(path.open()), start=2):
            for column, cell in row.items():
                if cell and cell.strip().lower() in ("nan", "inf", "-inf"):
                    problems.append(f"{path.relative_to(stage_dir)}:{row_number}:{column}")
    manifest = stage_dir / "manifest.json"
    if manifest.is_file():
        # json.loads gives NaN/Infinity as floats
        walk(json.loads(manifest.read_text()).get("outputs", {}), "manifest.outputs")
    return problems


def run_e2e_stage(stage: str, overrides: Sequence[str], device: torch.device) -> dict[str, Any]:
    """One stage through ``mrrl.cli.run_stage`` (what ``python -m mrrl`` runs); raises on any failure."""
    from mrrl.cli import run_stage
    from mrrl.training.runtime import run_dir_from_hydra

    cfg = compose(overrides)
    memory = PeakMemory(device).start()
    t0 = time.monotonic()
    try:
        run_stage(cfg)
    except SystemExit as exc:  # run_stage turns user errors into a message on stderr and exit status 1
        raise RuntimeError(f"stage {stage} exited with status {exc.code} (its message is above)") from exc
    seconds = time.monotonic() - t0
    peak = memory.stop()
    stage_dir = run_dir_from_hydra(cfg)
    problems = non_finite(stage_dir)
    if problems:
        raise FloatingPointError(f"stage {stage} wrote non-finite values: {', '.join(problems[:10])}")
    if not (stage_dir / "manifest.json").is_file():
        raise RuntimeError(f"stage {stage} finished without writing {stage_dir / 'manifest.json'}")
    if device.type == "cuda" and stage != "check_data" and peak["peak_mib"] <= peak["start_mib"]:
        raise RuntimeError(f"stage {stage} allocated nothing on {device}: it did not run on the GPU")
    return {"stage_s": seconds, "peak_mib": peak["peak_mib"], "memory_method": memory.method}


def run_e2e(args, scale: Scale, device: torch.device, results: Results, budget: Budget) -> bool:
    """Every stage in pipeline order; a failed stage fails the check and skips the ones that need it."""
    precision = trainer_precision(device, args.precision)
    out = Path(args.out).resolve()
    if (out / "runs").exists():  # finished stages would be skipped: every check runs them afresh
        shutil.rmtree(out / "runs")
    print(f"[gpu_check] end to end at {scale.size}³, trainer precision {precision}, runs in {out / 'runs'}")
    share = args.budget_s * (
        0.9 if args.smoke else 0.5
    )  # no new stage after this: the rest is for benchmarks
    for i, stage in enumerate(STAGES):
        if budget.elapsed() > share:
            for later in STAGES[i:]:
                results.skip("e2e", later, f"the end-to-end share of the budget ({share:.0f} s) is spent")
            return False
        record = measured(
            results,
            budget,
            "e2e",
            stage,
            estimate=0.0,
            device=device,
            fn=lambda stage=stage: run_e2e_stage(
                stage, e2e_overrides(stage, scale, device, precision, out), device
            ),
        )
        if record is None or record["status"] != "ok":
            for later in STAGES[i + 1 :]:
                results.skip("e2e", later, f"stage {stage} did not finish")
            if record is not None:
                print(record.get("traceback", ""), file=sys.stderr)
            return False
    return True


# ------------------------------------------------------------------------------------------ 2. benchmarks


def bench_module(name: str):
    return importlib.import_module(name)


def vqgan_bench(scale: Scale, device, size: int, batch: int, precision: str, *flags: str) -> Callable:
    def run() -> dict[str, Any]:
        vq = bench_module("vqgan_throughput")
        argv = [
            f"--preset={scale.bench_preset}",
            f"--device={device}",
            f"--image-size={size}",
            f"--batch={batch}",
            f"--precision={precision}",
            f"--steps={scale.steps}",
            f"--warmup={scale.warmup}",
            "--case=adversarial",
            *flags,
        ]
        out = vq.run_case(vq.parse_args(argv))
        return {**out, "throughput": out["volumes_per_s"], "unit": "volumes/s"}

    return run


def diffusion_bench(
    scale: Scale, device, batch: int, precision: str, *flags: str, sample_batch: int = 0
) -> Callable:
    """Training from cached latents (``sample_batch`` 0) or DDIM sampling with decoding of ``sample_batch``."""

    def run() -> dict[str, Any]:
        diff = bench_module("diffusion_throughput")
        argv = [
            f"--preset={scale.bench_preset}",
            f"--device={device}",
            f"--batch={batch}",
            f"--precision={'bf16' if 'bf16' in precision else 'fp32'}",
            f"--train-steps={scale.steps}",
            f"--warmup={scale.warmup}",
            "--skip-on-the-fly",
            "--ddpm-steps=0",
            *flags,
        ]
        if scale.bench_preset == "tiny":
            argv.append("--image-size=16")
        if sample_batch:
            argv += [
                f"--sample-batch={sample_batch}",
                f"--ddim-steps={100 if scale.bench_preset == 'paper' else 2}",
            ]
            argv += ["--skip-training"]
        else:
            argv += ["--skip-sampling"]
        out = diff.measure(diff.parse_args(argv))
        if sample_batch:
            case = out["sampling"]["ddim"]
            return {**case, "throughput": 1.0 / case["s_per_volume"], "unit": "volumes/s (with decode)"}
        case = out["training"]["cached latents"]
        return {**case, "throughput": batch / case["s_per_step"], "unit": "latents/s"}

    return run


def ppo_bench(scale: Scale, device, k: int, precision: str, *flags: str) -> Callable:
    def run() -> dict[str, Any]:
        ppo = bench_module("ppo_iteration")
        argv = [
            f"--preset={scale.bench_preset}",
            f"--device={device}",
            f"--precision={precision}",
            f"--iterations={max(1, scale.steps // 3)}",
            f"--warmup={min(scale.warmup, 1)}",
            f"--case=K={k}",
            *flags,
        ]
        if scale.bench_preset == "tiny":
            argv += ["--image-size=16", "--rollout-batch=2", "--train-batch=2"]
        out = ppo.run_case(ppo.parse_args(argv))
        return {**out, "throughput": out["volumes_per_s"], "unit": "volumes/s per iteration"}

    return run


def reward_bench(scale: Scale, device, case: str, batch: int) -> Callable:
    def run() -> dict[str, Any]:
        rw = bench_module("reward_throughput")
        argv = [
            f"--preset={scale.bench_preset}",
            f"--device={device}",
            f"--score-batch={batch}",
            f"--steps={scale.steps}",
            f"--warmup={scale.warmup}",
            f"--case={case}",
        ]
        if scale.bench_preset == "tiny":
            argv.append("--image-size=16")
        out = rw.run_case(rw.parse_args(argv))
        return {**out, "throughput": out["volumes_per_s"], "unit": "volumes/s"}

    return run


def classify_bench(scale: Scale, device, size: int, batch: int, precision: str) -> Callable:
    def run() -> dict[str, Any]:
        cl = bench_module("classify_throughput")
        argv = [
            f"--preset={scale.bench_preset}",
            f"--device={device}",
            f"--image-size={size}",
            f"--batch={batch}",
            f"--precision={precision}",
            f"--steps={scale.steps}",
            f"--warmup={scale.warmup}",
            "--case=train",
        ]
        out = cl.run_case(cl.parse_args(argv))
        return {**out, "throughput": out["volumes_per_s"], "unit": "volumes/s"}

    return run


# ------------------------------------------------------------------------------------------- 3. baselines


def load_baseline(path: Path):
    """``monai_bench.py`` as a module (it needs torch and monai only)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"no baseline script at {path}: copy ../shared/bench/monai_bench.py there (benchmarks/gpu_check.sh) "
            "or pass --baseline PATH"
        )
    spec = importlib.util.spec_from_file_location("monai_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["monai_bench"] = module
    spec.loader.exec_module(module)
    return module


def baseline_case(
    bench, case: str, scale: Scale, device, repeats: tuple[int, int] | None = None, **kwargs: Any
) -> Callable:
    """One ``monai_bench`` case function at the given shapes; throughput and peak memory (MiB).
    ``repeats``: (warm-up, timed) calls on the GPU for the long cases (default: the scale's)."""
    warmup, iters = repeats if repeats and scale.bench_preset == "paper" else (scale.warmup, scale.steps)

    def run() -> dict[str, Any]:
        fn = getattr(bench, f"{case}_case")
        memory = PeakMemory(device).start()
        out = fn(device, warmup=warmup, iters=max(iters, 1), **kwargs)
        key = next(k for k in ("volumes_per_s", "latents_per_s", "samples_per_s") if k in out)
        unit = {"volumes_per_s": "volumes/s", "latents_per_s": "latents/s", "samples_per_s": "volumes/s"}[key]
        return {**out, **kwargs, **memory.stop(), "throughput": out[key], "unit": unit}

    return run


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Comparison:
    """One row of the table: an mrrl measurement, its baseline (if any) and the issue's target."""

    name: str
    mrrl: str  # bench record name
    baseline: str | None  # baseline record name
    target: str  # human-readable target
    speed_ratio: float | None = None  # required mrrl/baseline throughput ratio
    memory_ratio: float | None = None  # required mrrl/baseline peak-memory ratio (upper bound)
    min_throughput: float | None = None  # absolute, in the row's unit
    max_memory_gib: float | None = None  # absolute
    larger: str | None = None  # the same mrrl case at a larger batch: tells launch-bound from compute-bound


def plan(scale: Scale, device, bench) -> tuple[list[tuple[str, str, float, Callable]], list[Comparison]]:
    """(part, name, estimated seconds, fn) in priority order, and the comparisons of the table.

    Order: each target's mrrl plain measurement next to its baseline, then the speed-option variants
    (channels-last, activation checkpointing, torch.compile), compile last (slow to build)."""
    paper = scale.bench_preset == "paper"
    s = lambda full, tiny: full if paper else tiny  # noqa: E731
    # the smallest volume the 3-layer patch discriminators take is 32³
    v64, v128, lat = s(64, 32), s(128, 32), s(16, 4)
    bf16 = "bf16-mixed"
    items: list[tuple[str, str, float, Callable]] = []

    def mrrl(name: str, est: float, fn: Callable, smoke: bool = True) -> None:
        """An mrrl case; ``smoke=False``: left out of the smoke run (the same code path at another size)."""
        if paper or smoke:
            items.append(("bench", name, est if paper else 0.0, fn))

    smoke_cases: set[str] = set()

    def base(name: str, est: float, case: str, **kw: Any) -> None:
        """A baseline case; the smoke run times each case function once (the stock networks are not tiny)."""
        if not paper and case in smoke_cases:
            return
        smoke_cases.add(case)
        if bench is not None:
            items.append(
                ("baseline", name, est if paper else 0.0, baseline_case(bench, case, scale, device, **kw))
            )

    # VQGAN G+D at 64³ (b2 fp32, b8 bf16) and 128³ (b1, b2 bf16)
    mrrl("vqgan 64 b2 fp32", 15, vqgan_bench(scale, device, v64, 2, "32-true"))
    base("vqgan 64 b2 fp32", 10, "vqgan", size=v64, batch=2, prec="fp32", cl=False)
    mrrl("vqgan 64 b8 bf16", 20, vqgan_bench(scale, device, v64, s(8, 2), bf16))
    base("vqgan 64 b8 bf16", 15, "vqgan", size=v64, batch=s(8, 2), prec="bf16", cl=False)
    mrrl("vqgan 128 b2 bf16", 30, vqgan_bench(scale, device, v128, 2, bf16), smoke=False)
    mrrl("vqgan 128 b1 bf16", 20, vqgan_bench(scale, device, v128, 1, bf16), smoke=False)
    base("vqgan 128 b1 fp32", 20, "vqgan", size=v128, batch=1, prec="fp32", cl=False)
    base("vqgan 128 b2 bf16", 25, "vqgan", size=v128, batch=2, prec="bf16", cl=False)
    # diffusion training on 8×16³ latents, batch 16 / 64 (bf16)
    mrrl("diffusion train b16 bf16", 15, diffusion_bench(scale, device, s(16, 2), bf16))
    base("diffusion train b16 bf16", 10, "diffusion", lat=lat, batch=s(16, 2), prec="bf16")
    mrrl("diffusion train b64 bf16", 20, diffusion_bench(scale, device, s(64, 4), bf16), smoke=False)
    base("diffusion train b64 bf16", 12, "diffusion", lat=lat, batch=s(64, 4), prec="bf16")
    # DDIM sampling, 100 steps, batch 16 / 256; mrrl decodes to volumes, the baseline stops at latents
    for b in (s(16, 2), s(256, 4)):
        mrrl(
            f"sampling b{b} bf16",
            25 if b > 16 else 12,
            diffusion_bench(scale, device, 2, bf16, sample_batch=b),
        )
        base(
            f"sampling b{b} bf16",
            20 if b > 16 else 8,
            "sample",
            lat=lat,
            batch=b,
            prec="bf16",
            steps=s(100, 2),
            repeats=(1, 2),  # a whole 100-step sampling run per call
        )
    # PPO iteration at K = 50 (and K = 10: memory flat in K)
    mrrl("ppo K50 bf16", 45, ppo_bench(scale, device, s(50, 5), bf16))
    mrrl("ppo K10 bf16", 20, ppo_bench(scale, device, s(10, 3), bf16))
    base(
        "ppo K50 bf16",
        20,
        "ppo",
        lat=lat,
        batch=8 if paper else 1,
        prec="bf16",
        steps=s(50, 2),
        repeats=(1, 2),  # a whole 50-step inner epoch per call
    )
    # reward scoring (no stock counterpart in monai_bench) and a classifier step (ResNet-50)
    mrrl("reward r3d score b64", 10, reward_bench(scale, device, "r3d-score", s(64, 2)))
    mrrl("reward r2d score b64", 10, reward_bench(scale, device, "r2d-score", s(64, 2)))
    mrrl("classifier step b8 bf16", 12, classify_bench(scale, device, s(64, 16), s(8, 2), bf16))
    base(
        "classifier step b8 bf16",
        10,
        "classifier",
        size=s(64, 16),
        batch=s(8, 2),
        prec="bf16",
        depth=s(50, 10),
    )
    # speed options (stage.speed)
    mrrl("vqgan 64 b2 bf16 +channels-last", 15, vqgan_bench(scale, device, v64, 2, bf16, "--channels-last"))
    base("vqgan 64 b2 bf16 +channels-last", 10, "vqgan", size=v64, batch=2, prec="bf16", cl=True)
    mrrl(
        "vqgan 128 b2 bf16 +channels-last +grad-ckpt",
        30,
        vqgan_bench(scale, device, v128, 2, bf16, "--channels-last", "--grad-ckpt"),
    )
    mrrl(
        "diffusion train b16 bf16 +channels-last",
        15,
        diffusion_bench(scale, device, s(16, 2), bf16, "--channels-last"),
    )
    mrrl("ppo K50 bf16 +grad-ckpt", 45, ppo_bench(scale, device, s(50, 5), bf16, "--grad-ckpt"))
    mrrl(
        f"sampling b{s(256, 4)} bf16 +channels-last",
        25,
        diffusion_bench(scale, device, 2, bf16, "--channels-last", sample_batch=s(256, 4)),
    )
    if (
        paper
    ):  # torch.compile takes minutes to build: the GPU run only (tests/test_speed_options.py covers the flag)
        mrrl(
            "diffusion train b64 bf16 +compile",
            90,
            diffusion_bench(scale, device, s(64, 4), bf16, "--compile"),
        )
        mrrl("vqgan 64 b2 bf16 +compile", 90, vqgan_bench(scale, device, v64, 2, bf16, "--compile"))

    comparisons = [
        Comparison(
            "VQGAN G+D 64³ b2 fp32",
            "vqgan 64 b2 fp32",
            "vqgan 64 b2 fp32",
            "≥10× volumes/s at ≤1/10 memory",
            10.0,
            0.1,
        ),
        Comparison(
            "VQGAN G+D 64³ b8 bf16",
            "vqgan 64 b8 bf16",
            "vqgan 64 b8 bf16",
            "≥10× volumes/s at ≤1/10 memory",
            10.0,
            0.1,
        ),
        Comparison(
            "VQGAN G+D 64³ b2 bf16 channels-last",
            "vqgan 64 b2 bf16 +channels-last",
            "vqgan 64 b2 bf16 +channels-last",
            "≥10× volumes/s at ≤1/10 memory",
            10.0,
            0.1,
        ),
        Comparison(
            "VQGAN G+D 128³ b1 bf16",
            "vqgan 128 b1 bf16",
            "vqgan 128 b1 fp32",
            "inside 40 GB",
            max_memory_gib=40.0,
        ),
        Comparison(
            "VQGAN G+D 128³ b2 bf16",
            "vqgan 128 b2 bf16",
            "vqgan 128 b2 bf16",
            "batch ≥ 2 inside 40 GB",
            max_memory_gib=40.0,
        ),
        Comparison(
            "VQGAN G+D 128³ b2 bf16 channels-last grad-ckpt",
            "vqgan 128 b2 bf16 +channels-last +grad-ckpt",
            "vqgan 128 b2 bf16",
            "batch ≥ 2 inside 40 GB",
            max_memory_gib=40.0,
        ),
        Comparison(
            "diffusion training b16 (8×16³)",
            "diffusion train b16 bf16",
            "diffusion train b16 bf16",
            "≥ 1500 latents/s",
            min_throughput=1500.0,
            larger="diffusion train b64 bf16",
        ),
        Comparison(
            "diffusion training b64 (8×16³)",
            "diffusion train b64 bf16",
            "diffusion train b64 bf16",
            "≥ 1500 latents/s",
            min_throughput=1500.0,
        ),
        Comparison(
            "diffusion training b16 channels-last",
            "diffusion train b16 bf16 +channels-last",
            "diffusion train b16 bf16",
            "≥ 1500 latents/s",
            min_throughput=1500.0,
        ),
        Comparison(
            "diffusion training b64 compile",
            "diffusion train b64 bf16 +compile",
            "diffusion train b64 bf16",
            "≥ 1500 latents/s",
            min_throughput=1500.0,
        ),
        Comparison(
            f"DDIM 100 steps + decode b{s(16, 2)}",
            f"sampling b{s(16, 2)} bf16",
            f"sampling b{s(16, 2)} bf16",
            "≥ 50 volumes/s",
            min_throughput=50.0,
            larger=f"sampling b{s(256, 4)} bf16",
        ),
        Comparison(
            f"DDIM 100 steps + decode b{s(256, 4)}",
            f"sampling b{s(256, 4)} bf16",
            f"sampling b{s(256, 4)} bf16",
            "≥ 50 volumes/s",
            min_throughput=50.0,
        ),
        Comparison(
            f"DDIM + decode b{s(256, 4)} channels-last",
            f"sampling b{s(256, 4)} bf16 +channels-last",
            f"sampling b{s(256, 4)} bf16",
            "≥ 50 volumes/s",
            min_throughput=50.0,
        ),
        Comparison(
            "PPO iteration K=50",
            "ppo K50 bf16",
            "ppo K50 bf16",
            "≥ 10 volumes/s; peak K=50/K=10 ≤ 1.3",
            min_throughput=10.0,
        ),
        Comparison(
            "PPO iteration K=50 grad-ckpt",
            "ppo K50 bf16 +grad-ckpt",
            "ppo K50 bf16",
            "≥ 10 volumes/s",
            min_throughput=10.0,
        ),
        Comparison("reward scoring R3D", "reward r3d score b64", None, "(no target)"),
        Comparison("reward scoring R2D", "reward r2d score b64", None, "(no target)"),
        Comparison(
            "classifier step ResNet-50 b8",
            "classifier step b8 bf16",
            "classifier step b8 bf16",
            "(no target)",
        ),
    ]
    return items, comparisons


# ----------------------------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else format(value, spec)
    )


def compare(
    results: Results, comparisons: Sequence[Comparison], device_gib: float | None = None
) -> list[dict[str, Any]]:
    """The rows of the ratio table, each with ``verdict`` (met / MISSED by … / not measured)."""
    rows = []
    k10 = results.get("bench", "ppo K10 bf16")
    for c in comparisons:
        m = results.get("bench", c.mrrl)
        b = results.get("baseline", c.baseline) if c.baseline else None
        row: dict[str, Any] = {"name": c.name, "target": c.target, "mrrl": c.mrrl, "baseline": c.baseline}
        if m is None or m["status"] != "ok":
            row["verdict"] = "not measured" if m is None else f"mrrl {m['status']}: {m.get('error', '')[:80]}"
            rows.append(row)
            continue
        row.update(unit=m["unit"], mrrl_throughput=m["throughput"], mrrl_peak_gib=m["peak_mib"] / GIB)
        if b is not None and b["status"] == "ok":
            row.update(baseline_throughput=b["throughput"], baseline_peak_gib=b["peak_mib"] / GIB)
            row["speed_ratio"] = m["throughput"] / b["throughput"]
            row["memory_ratio"] = m["peak_mib"] / b["peak_mib"] if b["peak_mib"] > 0 else None
        elif b is not None:
            row["baseline_status"] = b["status"]  # e.g. the stock VQGAN running out of memory at 128³
        misses = []
        if c.speed_ratio is not None:
            if "speed_ratio" not in row:
                misses.append(
                    "speed ratio: baseline not measured" if b is None or b["status"] != "oom" else ""
                )
            elif row["speed_ratio"] < c.speed_ratio:
                misses.append(
                    f"speed {row['speed_ratio']:.2f}× < {c.speed_ratio:g}× (short by {c.speed_ratio / row['speed_ratio']:.1f}×)"
                )
        if (
            c.memory_ratio is not None
            and row.get("memory_ratio") is not None
            and row["memory_ratio"] > c.memory_ratio
        ):
            misses.append(
                f"memory {row['memory_ratio']:.2f} of baseline > {c.memory_ratio:g} ({row['memory_ratio'] / c.memory_ratio:.1f}× over)"
            )
        if c.min_throughput is not None and m["throughput"] < c.min_throughput:
            misses.append(
                f"{m['throughput']:.1f} < {c.min_throughput:g} {m['unit']} (short by {c.min_throughput / m['throughput']:.1f}×)"
            )
        if c.max_memory_gib is not None and row["mrrl_peak_gib"] > c.max_memory_gib:
            misses.append(f"peak {row['mrrl_peak_gib']:.1f} GiB > {c.max_memory_gib:g} GB")
        if c.mrrl == "ppo K50 bf16" and k10 is not None and k10["status"] == "ok":
            flat = m["peak_mib"] / k10["peak_mib"]
            row["peak_k50_over_k10"] = flat
            if flat > 1.3:
                misses.append(f"peak K=50/K=10 {flat:.2f} > 1.3")
        misses = [x for x in misses if x]
        row["verdict"] = (
            "met" if not misses and c.target != "(no target)" else ("; ".join(misses) if misses else "-")
        )
        if misses:
            larger = results.get("bench", c.larger) if c.larger else None
            row["verdict"] = "MISSED: " + row["verdict"] + " — " + why_missed(m, larger, device_gib)
        rows.append(row)
    return rows


def why_missed(record: dict[str, Any], larger: dict[str, Any] | None, device_gib: float | None) -> str:
    """A first diagnosis of a missed target: memory-bound (peak near the device's memory), launch-bound
    (throughput still grows with the batch) or compute-bound (it does not); PPO: where the time goes."""
    peak_gib = record.get("peak_mib", 0.0) / GIB
    if device_gib and peak_gib > 0.8 * device_gib:
        return f"memory-bound (peak {peak_gib:.0f} of {device_gib:.0f} GiB)"
    why = []
    if larger is not None and larger.get("status") == "ok" and larger.get("throughput"):
        gain = larger["throughput"] / record["throughput"]
        why.append(
            f"launch-bound: ×{gain:.1f} throughput at the larger batch"
            if gain >= 1.5
            else f"compute-bound: the larger batch gains only ×{gain:.2f}"
        )
    if "rollout_s" in record and "update_s" in record:
        why.append(f"rollout {record['rollout_s']:.2f} s + update {record['update_s']:.2f} s per iteration")
    if not why:
        why.append(
            f"not memory-bound (peak {peak_gib:.1f} GiB); no larger-batch case to tell launch from compute"
        )
    return "; ".join(why)


def environment(device: torch.device) -> dict[str, Any]:
    import lightning

    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    with contextlib.suppress(ImportError):
        import monai

        env["monai"] = monai.__version__
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return env


def write_report(
    out: Path, env: dict, results: Results, rows: list[dict], budget: Budget, e2e_ok: bool
) -> None:
    data = {
        "environment": env,
        "budget_s": budget.seconds,
        "wall_s": budget.elapsed(),
        "e2e_ok": e2e_ok,
        "records": results.records,
        "skipped": results.skipped,
        "comparisons": rows,
    }
    (out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str))
    lines = [
        f"# gpu_check: {env['device']}, {env['date_utc']} UTC",
        "",
        f"torch {env['torch']}, lightning {env['lightning']}, monai {env.get('monai', '-')}; "
        f"{budget.elapsed():.0f} s of a {budget.seconds:.0f} s budget.",
        "",
        "## End to end",
        "",
        "| stage | status | s | peak GiB |",
        "|---|---|---|---|",
    ]
    for r in (r for r in results.records if r["part"] == "e2e"):
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {r.get('error', '')[:200]}"
        lines.append(
            f"| {r['name']} | {status} | {_fmt(r.get('stage_s'), '.1f')} | {_fmt(r.get('peak_mib', 0) / GIB, '.2f')} |"
        )
    lines += [
        "",
        "## mrrl / stock MONAI (monai_bench.py), same process, same device",
        "",
        "| case | unit | mrrl | baseline | ratio | mrrl peak GiB | baseline peak GiB | memory ratio | target | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = _fmt(r.get("baseline_throughput")) if "baseline_status" not in r else r["baseline_status"]
        lines.append(
            f"| {r['name']} | {r.get('unit', '-')} | {_fmt(r.get('mrrl_throughput'))} | {base} | "
            f"{_fmt(r.get('speed_ratio'), '.2f')} | {_fmt(r.get('mrrl_peak_gib'), '.2f')} | "
            f"{_fmt(r.get('baseline_peak_gib'), '.2f')} | {_fmt(r.get('memory_ratio'), '.2f')} | {r['target']} | {r['verdict']} |"
        )
    lines += [
        "",
        "## Every measurement",
        "",
        "| part | case | status | throughput | unit | peak GiB | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in results.records if r["part"] != "e2e"):
        lines.append(
            f"| {r['part']} | {r['name']} | {r['status']} | {_fmt(r.get('throughput'))} | {r.get('unit', '-')} | "
            f"{_fmt(r.get('peak_mib', 0) / GIB, '.2f')} | {r['wall_s']:.1f} |"
        )
    if results.skipped:
        lines += ["", "## Skipped", ""] + [f"- {s['part']}/{s['name']}: {s['why']}" for s in results.skipped]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop inside this many seconds")
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the runs")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and networks, one step each")
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE, help="path of monai_bench.py")
    parser.add_argument(
        "--parts", default="e2e,bench,baseline", help="comma-separated subset of e2e, bench, baseline"
    )
    parser.add_argument(
        "--precision", default=None, help="end-to-end trainer precision (default: trainer=ddp's)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - {"e2e", "bench", "baseline"}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from e2e, bench, baseline")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: --device cuda but torch sees no CUDA device (use --device cpu --smoke)",
            file=sys.stderr,
        )
        return 2
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as monai_bench.py: both sides tuned alike
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = SMOKE if args.smoke else PAPER
    parts = set(args.parts.split(","))
    results = Results()
    env = environment(device)
    print(f"[gpu_check] {env}; budget {args.budget_s:.0f} s; parts {sorted(parts)}", flush=True)

    e2e_ok = True
    if "e2e" in parts:
        e2e_ok = run_e2e(args, scale, device, results, budget)
    bench = None
    if "baseline" in parts:
        try:
            bench = load_baseline(args.baseline)
        except (FileNotFoundError, ImportError) as exc:
            results.skip("baseline", "monai_bench.py", str(exc))
    items, comparisons = plan(scale, device, bench)
    for part, name, estimate, fn in items:
        if part in parts:
            measured(results, budget, part, name, estimate, device, fn)
    rows = compare(results, comparisons, env.get("gpu_memory_gib"))
    write_report(out, env, results, rows, budget, e2e_ok)
    print((out / "gpu_check.md").read_text())
    print(
        f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {budget.elapsed():.1f} s"
    )
    if not e2e_ok:
        print("[gpu_check] FAILED: an end-to-end stage failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the stage benchmarks: peak memory, per-step timing, one case per child process, table output.

Peak memory of a measured section:
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, not the caching
  allocator's reserve), and the allocation at the start of the section (weights, inputs).
* CPU: the process's resident-set high-water mark (``VmHWM``), reset at the start of the section through
  ``/proc/self/clear_refs`` where Linux allows it, else ``getrusage``'s lifetime ``ru_maxrss``. PyTorch's
  CPU allocations are invisible to ``tracemalloc``, so RSS is the honest number; it includes the Python
  interpreter and the imported libraries, which is why every case runs in a fresh child process and the
  table also shows the growth over the RSS at the start of the section.
  glibc keeps freed heap memory, so the CPU peak also depends on what ran before the section; for peaks
  that follow the live tensors (reproducible to ~1 MiB, what the speed-option comparisons need), run with
  ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment: every allocation of 64 KiB or more is then mapped
  and unmapped on its own. Steps get slower that way, so take times from runs without it.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

MIB = 1024 * 1024
JSON_PREFIX = "BENCHMARK_RESULT "


def stage_settings(cls: type, stage: str, overrides: dict[str, Any]) -> Any:
    """Settings ``cls`` (e.g. ``VQGANSettings``) of ``mrrl stage=<stage>`` as Hydra composes them, with the
    benchmark's sizes merged over the YAML (the only source of the other defaults)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mrrl.cli import CONFIG_DIR
    from mrrl.settings import from_config

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"stage={stage}"])
    node = OmegaConf.merge(OmegaConf.to_container(cfg.stage, resolve=True), overrides)
    return from_config(cls, node, "stage")


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--channels-last``, ``--grad-ckpt``, ``--compile [BACKEND]``, ``--compile-mode``: the ``stage.speed``
    options (``mrrl/training/speed.py``), applied through the stage's own module."""
    group = parser.add_argument_group("speed options (stage.speed)")
    group.add_argument(
        "--channels-last",
        action="store_true",
        help="channels_last_3d weights and inputs (speed.channels_last)",
    )
    group.add_argument(
        "--grad-ckpt",
        action="store_true",
        help="activation checkpointing of the trained network (speed.gradient_checkpointing)",
    )
    group.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the trained network (speed.compile); BACKEND default inductor, or aot_eager, eager",
    )
    group.add_argument(
        "--compile-mode", default="default", help="torch.compile mode (inductor only), e.g. max-autotune"
    )


def speed_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``stage.speed`` block the flags of :func:`add_speed_arguments` ask for."""
    return {
        "channels_last": bool(args.channels_last),
        "gradient_checkpointing": bool(args.grad_ckpt),
        "compile": {
            "enabled": args.compile is not None,
            "backend": args.compile or "inductor",
            "mode": args.compile_mode,
        },
    }


def speed_label(args: argparse.Namespace) -> str:
    """A short description of the speed flags for a table title ("baseline" when none is set)."""
    parts = (["channels-last"] if args.channels_last else []) + (["grad-ckpt"] if args.grad_ckpt else [])
    if args.compile is not None:
        mode = "" if args.compile_mode == "default" else f" {args.compile_mode}"
        parts.append(f"compile {args.compile}{mode}")
    return ", ".join(parts) or "baseline"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} torch threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory of the code between ``start()`` and ``stop()`` on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self.start_mib = 0.0

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / MIB
            self.method = "cuda max_memory_allocated"
            return self
        self.start_mib = (_rss_kib("VmRSS") or 0) / 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.method = "peak RSS (VmHWM, reset at start)"
        except OSError:
            self.method = "peak RSS (ru_maxrss, process lifetime)"
        return self

    def stop(self) -> dict[str, float | str]:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / MIB
        else:
            hwm = _rss_kib("VmHWM") if self.method.startswith("peak RSS (VmHWM") else None
            peak = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
        return {"peak_mib": peak, "start_mib": self.start_mib, "growth_mib": peak - self.start_mib}


class StepTimer:
    """A Lightning callback: wall time of every training batch (``on_train_batch_start`` → ``_end``)."""

    def __init__(self, device: torch.device):
        import lightning as L

        timer = self

        class _Callback(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                sync(timer.device)
                timer._t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                sync(timer.device)
                timer.seconds.append(time.perf_counter() - timer._t0)

        self.device = device
        self.seconds: list[float] = []
        self._t0 = 0.0
        self.callback = _Callback()

    def mean(self, skip: int) -> float:
        timed = self.seconds[skip:] or self.seconds
        return sum(timed) / max(len(timed), 1)


def lightning_trainer(device: torch.device, precision: str, callbacks: Sequence[Any], **kwargs: Any):
    """A bare single-device Trainer: no logger, no checkpoints, no validation, no progress bar."""
    import lightning as L

    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
        **kwargs,
    )


def emit(result: dict[str, Any]) -> None:
    """A child process's result, one JSON line on stdout."""
    print(JSON_PREFIX + json.dumps(result), flush=True)


def run_case_in_child(script: str, argv: Sequence[str], case: str) -> dict[str, Any]:
    """Run ``script --case <case>`` with the same arguments in a fresh Python process; its JSON result."""
    command = [sys.executable, script, *argv, "--case", case]
    done = subprocess.run(command, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(JSON_PREFIX):
            return json.loads(line[len(JSON_PREFIX) :])
    raise RuntimeError(
        f"case {case!r} failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
    )


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """``columns``: (key, header, format spec) per column."""
    widths = [max(len(header), 10) for _, header, _ in columns]
    cells = [[format(row[key], spec) if key in row else "-" for key, _, spec in columns] for row in rows]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    print(
        "  ".join(
            header.rjust(w) if i else header.ljust(w)
            for i, ((_, header, _), w) in enumerate(zip(columns, widths))
        )
    )
    for row in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


STEP_COLUMNS = (
    ("case", "case", "s"),
    ("s_per_step", "s/step", ".4f"),
    ("volumes_per_s", "volumes/s", ".2f"),
    ("peak_mib", "peak MiB", ".0f"),
    ("growth_mib", "growth MiB", ".0f"),
)


def step_result(case: str, seconds: float, batch: int, module, size: int, device, memory) -> dict[str, Any]:
    """The row a training-step benchmark case returns: time per step, volumes/s, parameters and memory."""
    return {
        "case": case,
        "s_per_step": seconds,
        "volumes_per_s": batch / seconds,
        "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
        "size": size,
        "batch": batch,
        "device": device_name(device),
        **memory.stop(),
        "memory_method": memory.method,
    }


def run_benchmark(
    script: str,
    args: argparse.Namespace,
    run_case: Callable[[argparse.Namespace], dict[str, Any]],
    cases: Sequence[str],
    header: Callable[[dict[str, Any]], str],
    columns: Sequence[tuple[str, str, str]] = STEP_COLUMNS,
    decorate: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """A benchmark script's ``main``: one case in this process (``--case``), or every case in a fresh child
    process each, then ``header(first row)`` and the table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        emit(run_case(args))
        return
    rows = [run_case_in_child(script, sys.argv[1:], case) for case in cases]
    for row in rows if decorate else []:
        decorate(row)
    print(header(rows[0]))
    print_table(rows, columns)

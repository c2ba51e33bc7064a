"""``mrrl-pipeline experiment=<name> [overrides]``: run the experiment's stages in order.

``--cfg job|hydra|all [--resolve]`` prints the composed config and exits, as a Hydra app does; a typo in
an override gets Hydra's message (exit status 1, no traceback), a bad value the config checks' one line.

Each stage runs as its own ``python -m mrrl stage=<name>`` process (a clean process per stage, and
Lightning's DDP can re-execute it), finds its inputs in the previous stages' manifests, is skipped when
its manifest says it finished (unless ``pipeline.force=true``) and resumes from its last checkpoint when
it was interrupted. Stop signals sent to the pipeline (SIGTERM from ``kill`` or ``docker stop``, SIGHUP,
SLURM's SIGUSR1 warning) are passed on to the running stage, which saves its checkpoint and exits; the
pipeline then exits with the stage's status.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mrrl.cli import CONFIG_DIR
from mrrl.manifest import is_complete


def compose_config(overrides: Sequence[str], return_hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config
        )


class UsageError(Exception):
    """A command-line or config mistake: printed as one message, exit status 1, no traceback."""


def _compose_or_explain(overrides: Sequence[str], return_hydra_config: bool = False) -> DictConfig:
    """Hydra's composition with Hydra's own message (and its cause) instead of a traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose_config(overrides, return_hydra_config)
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [str(exc)]
        cause = exc.__cause__
        while cause is not None:
            lines.append(str(cause))
            cause = cause.__cause__
        raise UsageError("\n".join(lines)) from exc


def show_config(overrides: Sequence[str], which: str, resolve: bool = False) -> str:
    """``--cfg job|hydra|all``, as a Hydra app prints it."""
    if which not in CFG_CHOICES:
        raise UsageError(f"--cfg takes one of {', '.join(CFG_CHOICES)}, got {which!r}")
    cfg = _compose_or_explain(overrides, return_hydra_config=which != "job")
    if which == "hydra":
        cfg = cfg.hydra
    elif which == "job" and "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_yaml(cfg, resolve=resolve)


def _format_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def run_pipeline(overrides: Sequence[str]) -> int:
    from mrrl.config_checks import check_config
    from mrrl.errors import ConfigError

    cfg = _compose_or_explain(overrides)
    try:
        check_config(cfg)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    stages = list(cfg.pipeline.stages)
    force = bool(cfg.pipeline.force)
    stage_overrides = [o for o in overrides if not o.lstrip("+~").startswith(("pipeline.", "stage="))]
    experiment_dir = Path(cfg.paths.run_root) / cfg.experiment_name
    print(
        f"mrrl-pipeline: experiment '{cfg.experiment_name}' → {experiment_dir} ({len(stages)} stages)",
        flush=True,
    )
    start = time.monotonic()
    for index, stage in enumerate(stages, 1):
        prefix = f"[{index}/{len(stages)}] {stage:<12}"
        if not force and is_complete(experiment_dir / stage):
            print(f"{prefix} skipped (finished earlier; pipeline.force=true reruns it)", flush=True)
            continue
        t0 = time.monotonic()
        print(f"{prefix} running ...", flush=True)
        status = run_child([sys.executable, "-m", "mrrl", f"stage={stage}", *stage_overrides])
        elapsed = _format_elapsed(time.monotonic() - t0)
        if status != 0:
            print(f"{prefix} FAILED after {elapsed} (exit {status}); rerun to resume", flush=True)
            return status
        print(f"{prefix} done in {elapsed}", flush=True)
    print(f"mrrl-pipeline: all stages done in {_format_elapsed(time.monotonic() - start)}", flush=True)
    from mrrl.report.build import write_report

    print(f"mrrl-pipeline: report {write_report(experiment_dir)}", flush=True)
    return 0


FORWARDED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGHUP") if hasattr(signal, n))


def run_child(command: Sequence[str]) -> int:
    """Run one stage process; stop signals that reach this process are passed on to it.

    Without this, ``kill <pipeline>`` would leave the stage running without its parent, and SLURM's
    ``--signal=USR1@…`` warning (whose default action is to terminate) would end the pipeline alone.
    SIGINT is not passed on but ignored here: Ctrl+C already reaches the stage (the terminal signals the
    whole foreground process group), and a second copy would interrupt its graceful shutdown.
    Returns the stage's exit status (128 + signal number when a signal ended it, as a shell reports it).
    """
    child = subprocess.Popen(list(command))

    def forward(signum: int, frame) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        status = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - status if status < 0 else status


CFG_CHOICES = ("job", "hydra", "all")


def _parse(args: list[str]) -> tuple[list[str], str | None, bool]:
    """Overrides, ``--cfg/-c`` choice, ``--resolve``; unknown options are usage errors."""
    overrides, which, resolve = [], None, False
    it = iter(args)
    for arg in it:
        if arg in ("--cfg", "-c"):
            which = next(it, None)
            if which is None:
                raise UsageError(f"--cfg takes one of {', '.join(CFG_CHOICES)}")
        elif arg.startswith("--cfg="):
            which = arg.split("=", 1)[1]
        elif arg == "--resolve":
            resolve = True
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg}; options: --cfg job|hydra|all [--resolve], --help")
        else:
            overrides.append(arg)
    return overrides, which, resolve


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    try:
        overrides, which, resolve = _parse(args)
        if which is not None:
            print(show_config(overrides, which, resolve), end="")
            return
        status = run_pipeline(overrides)
    except UsageError as exc:
        print(f"mrrl-pipeline: error: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(status)


if __name__ == "__main__":
    main()

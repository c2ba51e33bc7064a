"""``mrrl-pipeline experiment=<name> [overrides]``: run the experiment's stages in order.

``--cfg job|hydra|all [--resolve]`` prints the composed config and exits, as a Hydra app does; a typo in
an override gets Hydra's message (exit status 1, no traceback), a bad value the config checks' one line.

Overrides reach the stages three ways:
- ``data.image_size=64``, ``seed=1``, ...: every stage;
- ``<stage>.<key>=<value>`` (e.g. ``ppo.train.lr=1e-5``, ``vqgan.trainer.max_epochs=2``; also with ``+``/``~``):
  that stage only, as its ``stage.<key>``;
- ``stage.<key>=<value>`` (e.g. ``stage.trainer.max_epochs=1``): every stage of the pipeline whose config has
  the key.
A key that no stage (or not the named stage) has is an error before anything runs.

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
    # Without the stages' own overrides, as run_pipeline composes it.
    pipeline_overrides = [o for o in overrides if not _is_stage_override(o)]
    cfg = _compose_or_explain(pipeline_overrides, return_hydra_config=which != "job")
    if which == "hydra":
        cfg = cfg.hydra
    elif which == "job" and "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_yaml(cfg, resolve=resolve)


def _override_key(override: str) -> tuple[str, str]:
    """(prefix, dotted key) of a Hydra override: ``+a.b=1`` → ("+", "a.b"); ``~a.b`` → ("~", "a.b")."""
    body = override.split("=", 1)[0]
    stripped = body.lstrip("+~")
    return body[: len(body) - len(stripped)], stripped


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    missing = object()
    return OmegaConf.select(cfg, dotted, default=missing) is not missing


def _stage_target(override: str) -> str | None:
    """``"stage"`` for ``stage.<key>…``, the stage's name for ``<stage name>.<key>…``, else None (no stage is
    named like a top-level config key: tests/test_cli.py checks it)."""
    from mrrl.stages import STAGES

    head, dot, _ = _override_key(override)[1].partition(".")
    return head if dot and (head == "stage" or head in STAGES) else None


def _is_stage_override(override: str) -> bool:
    return _stage_target(override) is not None


def split_overrides(
    overrides: Sequence[str], stages: Sequence[str]
) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(shared, per-stage, for-every-stage-that-has-it) overrides of a pipeline command line.

    ``<stage>.<key>=v`` becomes ``stage.<key>=v`` of that stage; ``stage.<key>=v`` is returned apart, to be
    given to every stage whose config has the key; ``stage=`` and ``pipeline.*`` belong to the pipeline itself
    and are dropped.
    """
    shared: list[str] = []
    per_stage: dict[str, list[str]] = {name: [] for name in stages}
    every_stage: list[str] = []
    for override in overrides:
        prefix, key = _override_key(override)
        target = _stage_target(override)
        if key == "stage" or key.partition(".")[0] == "pipeline":
            continue
        if target == "stage":
            every_stage.append(override)
        elif target is not None:
            if target not in per_stage:
                raise UsageError(
                    f"{override}: '{target}' is not a stage of this pipeline (stages: {', '.join(stages)})"
                )
            per_stage[target].append(prefix + "stage." + override[len(prefix) + len(target) + 1 :])
        else:
            shared.append(override)
    return shared, per_stage, every_stage


def stage_overrides(cfg: DictConfig, overrides: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Shared overrides and each stage's own, checked against each stage's composed config before any stage
    runs: a key the named stage (or, for ``stage.<key>``, every stage) lacks is a :class:`UsageError`."""
    stages = list(cfg.pipeline.stages)
    shared, per_stage, every_stage = split_overrides(overrides, stages)
    if not every_stage and not any(per_stage.values()):
        return shared, per_stage
    for name in stages:
        base = _compose_or_explain([*shared, f"stage={name}"])
        generic = []
        for override in per_stage[name]:
            prefix, key = _override_key(override)
            if prefix != "+" and not _has_key(base, key):
                raise UsageError(
                    f"{name}.{key[len('stage.') :]}: stage {name} has no key {key} "
                    f"(see `mrrl stage={name} --cfg job`; add a new key with +{name}.…)"
                )
        for override in every_stage:
            prefix, key = _override_key(override)
            if prefix == "+":
                raise UsageError(
                    f"{override}: adding a key to every stage is ambiguous; write +<stage>.… instead"
                )
            if _has_key(base, key):
                generic.append(override)
        per_stage[name] = generic + per_stage[name]  # the stage's own override comes last: it wins
        if per_stage[name]:  # the stage's config as its process will compose it: grammar, keys, values
            _check(_compose_or_explain([*shared, f"stage={name}", *per_stage[name]]))
    for override in every_stage:
        key = _override_key(override)[1]
        if not any(override in per_stage[name] for name in stages):
            raise UsageError(
                f"{override}: no stage of this pipeline ({', '.join(stages)}) has the key {key}; "
                "a stage's own setting is written <stage>.<key>=<value>, e.g. ppo.train.lr=1e-5"
            )
    return shared, per_stage


def _format_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def _check(cfg: DictConfig) -> None:
    """The config checks' one line (types, ranges, writable paths) as a usage error."""
    from mrrl.config_checks import check_config
    from mrrl.errors import ConfigError

    try:
        check_config(cfg)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def run_pipeline(overrides: Sequence[str]) -> int:
    # The pipeline's own config: without the per-stage overrides, which only the named stage's config has.
    cfg = _compose_or_explain([o for o in overrides if not _is_stage_override(o)])
    _check(cfg)
    stages = list(cfg.pipeline.stages)
    force = bool(cfg.pipeline.force)
    shared, per_stage = stage_overrides(cfg, overrides)
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
        status = run_child([sys.executable, "-m", "mrrl", f"stage={stage}", *shared, *per_stage[stage]])
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

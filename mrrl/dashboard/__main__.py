"""``mrrl-dashboard`` / ``python -m mrrl.dashboard``: create (online) or print (offline, ``--dry-run``) the
W&B workspace of an experiment group."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mrrl.dashboard.build import build_workspace, describe, online


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mrrl-dashboard", description=__doc__)
    parser.add_argument("--project", default="mrrl", help="W&B project (logger.project; default: mrrl)")
    parser.add_argument(
        "--entity", default=os.environ.get("WANDB_ENTITY"), help="W&B entity (default: $WANDB_ENTITY)"
    )
    parser.add_argument(
        "--group", required=True, help="the experiment's W&B group (logger.group = experiment_name)"
    )
    parser.add_argument(
        "--classes",
        default="HGG,LGG",
        help="class names, comma-separated (HGG,LGG for BraTS; AD,CN for OASIS)",
    )
    parser.add_argument("--name", default=None, help="the view's name (default: mrrl <group>)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", dest="dry_run", action="store_true", default=None, help="print, create nothing"
    )
    mode.add_argument(
        "--save", dest="dry_run", action="store_false", help="create the view (needs a W&B login)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not classes:
        print("mrrl-dashboard: --classes names no class", file=sys.stderr)
        return 2
    dry_run = (not online()) if args.dry_run is None else args.dry_run  # offline: a dry run by default
    print(describe(args.project, args.group, classes))
    if dry_run:
        print("dry run: nothing created (log in with `wandb login` and pass --save to create the view)")
        return 0
    if not args.entity:
        print("mrrl-dashboard: --entity (or $WANDB_ENTITY) is needed to save a view", file=sys.stderr)
        return 2
    workspace = build_workspace(
        args.entity, args.project, args.group, classes, args.name or f"mrrl {args.group}"
    )
    workspace.save()
    print(f"saved {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m mrrl.report <experiment_dir>``: one Markdown report of everything an experiment produced.

Writes ``<experiment_dir>/report.md`` (see :mod:`mrrl.report`); ``--ablation NAME=DIR`` chooses the Table 5
rows, ``--no-ablations`` leaves Table 5 out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mrrl.report.build import write_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mrrl.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment_dir", help="e.g. runs/brats2019")
    parser.add_argument(
        "--ablation",
        action="append",
        metavar="NAME=DIR",
        help="a Table 5 row (repeatable); default: the ablation_* folders beside experiment_dir",
    )
    parser.add_argument("--no-ablations", action="store_true", help="leave Table 5 out")
    args = parser.parse_args(argv)
    ablations: dict[str, str] | None = None
    if args.no_ablations:
        ablations = {}
    elif args.ablation:
        bad = [a for a in args.ablation if "=" not in a]
        if bad:
            parser.error(f"--ablation takes NAME=DIR, got {bad[0]!r}")
        ablations = dict(a.split("=", 1) for a in args.ablation)
    if not Path(args.experiment_dir).is_dir():
        print(f"mrrl.report: no experiment folder at {args.experiment_dir}", file=sys.stderr)
        return 1
    print(write_report(args.experiment_dir, ablations))
    return 0

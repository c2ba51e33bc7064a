"""``mrrl stage=check_data``: validate and preprocess a dataset without training, print Table 1.

Besides the voxel checks every stage runs, this stage verifies the checksum of every cached volume
(damaged ones are rebuilt; the cache logs "rebuilt N corrupt cache file(s): …" and the manifest lists
them) and names the OASIS sessions the labelling rule leaves out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mrrl.data.datamodule import format_summary
from mrrl.manifest import write_manifest
from mrrl.training.runtime import build_datamodule

log = logging.getLogger(__name__)
MAX_LISTED = 10  # ids printed per reason; the manifest has them all


def format_left_out(left_out: Sequence[Mapping[str, str]]) -> list[str]:
    """One line per reason: how many sessions, and which (the first ``MAX_LISTED``)."""
    by_reason: dict[str, list[str]] = {}
    for entry in left_out:
        by_reason.setdefault(entry["reason"], []).append(entry["id"])
    lines = []
    for reason, ids in by_reason.items():
        more = f", … ({len(ids) - MAX_LISTED} more in manifest.json)" if len(ids) > MAX_LISTED else ""
        hint = " (data.missing_cdr_as_cn=true labels them CN)" if reason == "no CDR" else ""
        lines.append(f"left out {len(ids)} subject(s), {reason}{hint}: {', '.join(ids[:MAX_LISTED])}{more}")
    return lines


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    datamodule = build_datamodule(cfg, verify_checksums=True).prepare()
    summary = datamodule.summary()
    print(f"dataset {summary['dataset']} at {summary['root']}")
    print(format_summary(summary))
    for line in format_left_out(summary["left_out"]):
        print(line)
    print(f"split file: {summary['split_file']}")
    write_manifest(run_dir, "check_data", summary, cfg)
    return summary

"""The one Markdown-table writer and the number formats every mrrl table shares.

Used by the report (``mrrl/report/``), Table 2 (``evaluation/tables.py``), Table 3 (``classify/tables.py``)
and the reward-data summary. A missing or non-finite number shows as ``–`` everywhere.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

MISSING = "–"
_ALIGN = {"l": "---", "r": "---:", "c": ":---:"}


def is_finite(value: Any) -> bool:
    """A number (or numeric string, as CSV cells are) that is not None, empty, NaN or infinite."""
    try:
        return value is not None and value != "" and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def fmt(value: Any, digits: int = 3, *, signed: bool = False, sci_small: bool = False) -> str:
    """Fixed decimals (``+`` on positives when ``signed``). ``sci_small``: a non-zero value below the last
    shown decimal in scientific notation instead (a KID of 2e-5 is not ``0.000``)."""
    if not is_finite(value):
        return MISSING
    value, sign = float(value), "+" if signed else ""
    if sci_small and value != 0 and abs(value) < 10**-digits:
        return f"{value:{sign}.{digits - 1}e}"
    return f"{value:{sign}.{digits}f}"


def fmt_fid(value: Any) -> str:
    """Four significant digits (FIDs range from 0.01 with random features to hundreds)."""
    return f"{float(value):.4g}" if is_finite(value) else MISSING


def fmt_pm(stats: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.710 ± 0.020`` (the mean alone when there is no std, e.g. one seed)."""
    stats = stats or {}
    mean, std = stats.get("mean"), stats.get("std")
    return f"{fmt(mean, digits)} ± {fmt(std, digits)}" if is_finite(std) else fmt(mean, digits)


def fmt_interval(
    est: Mapping[str, Any] | None,
    digits: int = 3,
    *,
    scale: float = 1.0,
    unit: str = "",
    signed: bool = False,
    sci_small: bool = False,
) -> str:
    """``0.412 [0.380, 0.455]``: a point value (``value``) and its interval (``low``, ``high``), each times
    ``scale``; ``unit`` follows the point value."""
    if not est:
        return MISSING
    value, low, high = (None if est.get(k) is None else scale * est[k] for k in ("value", "low", "high"))
    text = [fmt(v, digits, signed=signed, sci_small=sci_small) for v in (value, low, high)]
    return f"{text[0]}{unit} [{text[1]}, {text[2]}]"


def fmt_difference(est: Mapping[str, Any] | None) -> str:
    """A signed difference and its interval: ``+0.050 [-0.010, +0.110]``."""
    return fmt_interval(est, signed=True)


def percent(value: Any) -> str:
    """``47.9 %``; ``n/a`` when there is no value (e.g. a gap that is not positive)."""
    return f"{float(value):.1f} %" if is_finite(value) else "n/a"


def _cell(value: Any) -> str:
    return str(value).replace("|", r"\|").replace("\n", " ")


def md_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """A Markdown table as lines. ``align``: one letter per column (``l``, ``r``, ``c``); by default the
    first column (labels) left and the others (numbers) right. ``|`` in a cell is escaped."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or set(align) - set(_ALIGN):
        raise ValueError(f"md_table: align {align!r} needs one of l/r/c per column ({len(header)} columns)")
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join(_ALIGN[a] for a in align) + "|",
    ]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def relative_link(path: Path | None, from_dir: Path) -> str | None:
    """``path`` relative to ``from_dir`` with ``/`` separators (a link that survives moving both)."""
    return None if path is None else Path(os.path.relpath(path, from_dir)).as_posix()


def image(path: Path | None, from_dir: Path, alt: str) -> list[str]:
    """An image line and a blank line; nothing when there is no file."""
    rel = relative_link(path, from_dir)
    return [] if rel is None else [f"![{alt}]({rel})", ""]

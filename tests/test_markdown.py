"""The one Markdown-table formatter (mrrl/utils/markdown.py) every table writer uses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import mrrl
from mrrl.utils.markdown import (
    fmt,
    fmt_difference,
    fmt_fid,
    fmt_interval,
    fmt_pm,
    image,
    md_table,
    percent,
    relative_link,
)


def test_md_table_aligns_labels_left_numbers_right_and_escapes_pipes() -> None:
    lines = md_table(["Model", "HGG", "All"], [["a|b", 1, 2.5], ["c", "–", None]])
    assert lines == [
        "| Model | HGG | All |",
        "|---|---:|---:|",
        r"| a\|b | 1 | 2.5 |",
        "| c | – | None |",
    ]
    assert md_table(["x", "y"], [], align="lc")[1] == "|---|:---:|"
    assert md_table(["x", "y"], [["one\ntwo", 3]], align="ll")[1:] == ["|---|---|", "| one two | 3 |"]
    with pytest.raises(ValueError, match="one of l/r/c per column"):
        md_table(["x", "y"], [], align="l")
    with pytest.raises(ValueError, match="one of l/r/c per column"):
        md_table(["x", "y"], [], align="lx")


def test_numbers_and_missing_values() -> None:
    assert fmt(0.71234) == "0.712" and fmt(27.314, 2) == "27.31" and fmt("0.5") == "0.500"
    assert [fmt(v) for v in (None, math.nan, math.inf, "", "abc")] == ["–"] * 5
    assert fmt(0.05, signed=True) == "+0.050" and fmt(-0.01, signed=True) == "-0.010"
    assert (
        fmt(2e-5) == "0.000"
        and fmt(2e-5, sci_small=True) == "2.00e-05"
        and fmt(0.0, sci_small=True) == "0.000"
    )
    assert fmt_fid(0.012341) == "0.01234" and fmt_fid(123.456) == "123.5" and fmt_fid(None) == "–"
    assert fmt_pm({"mean": 0.71, "std": 0.02}) == "0.710 ± 0.020"
    assert fmt_pm({"mean": 0.5, "std": math.nan}) == "0.500" and fmt_pm(None) == "–"
    assert percent(47.899) == "47.9 %" and percent(None) == "n/a" and percent(math.nan) == "n/a"


def test_intervals() -> None:
    est = {"value": 0.412, "low": 0.38, "high": 0.455}
    assert fmt_interval(est) == "0.412 [0.380, 0.455]"
    assert fmt_interval(est, 1, scale=100.0, unit=" %") == "41.2 % [38.0, 45.5]"
    assert fmt_interval({"value": 2e-5, "low": None, "high": 1.0}, sci_small=True) == "2.00e-05 [–, 1.000]"
    assert fmt_interval(None) == "–"
    assert fmt_difference({"value": 0.05, "low": -0.01, "high": 0.11}) == "+0.050 [-0.010, +0.110]"


def test_links_are_relative(tmp_path: Path) -> None:
    figure = tmp_path / "stage" / "figures" / "a.png"
    assert relative_link(figure, tmp_path) == "stage/figures/a.png"
    assert relative_link(tmp_path / "other" / "report.md", tmp_path / "exp") == "../other/report.md"
    assert (
        image(figure, tmp_path, "alt") == ["![alt](stage/figures/a.png)", ""]
        and image(None, tmp_path, "x") == []
    )


def test_no_other_markdown_table_writer() -> None:
    """Every Markdown table under mrrl/ comes from md_table: no module writes a separator row itself."""
    package = Path(mrrl.__file__).parent
    writers = [
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name != "markdown.py" and ('"|---' in p.read_text() or "'|---" in p.read_text())
    ]
    assert writers == []

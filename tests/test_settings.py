"""mrrl.settings: typed settings built from the YAML with every field required (no code-side defaults)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from mrrl.errors import ConfigError
from mrrl.settings import field_names, from_config


@dataclass(frozen=True)
class Inner:
    lr: float
    steps: int


@dataclass(frozen=True)
class Outer:
    name: str
    train: Inner
    extra: Inner | None


def test_builds_nested_settings_and_ignores_undeclared_keys():
    node = OmegaConf.create(
        {"name": "a", "train": {"lr": 0.1, "steps": 3, "other": 1}, "extra": None, "x": 2}
    )
    s = from_config(Outer, node, "stage")
    assert s == Outer("a", Inner(0.1, 3), None)


def test_a_missing_key_is_a_one_line_error_naming_its_path():
    with pytest.raises(ConfigError, match=r"stage\.train\.steps") as err:
        from_config(Outer, {"name": "a", "train": {"lr": 0.1}, "extra": None}, "stage")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="must be a mapping"):
        from_config(Outer, {"name": "a", "train": 3, "extra": None}, "stage")


def test_field_names_lists_nested_paths():
    assert field_names(Outer) == [
        "name",
        "train",
        "train.lr",
        "train.steps",
        "extra",
        "extra.lr",
        "extra.steps",
    ]


def test_given_settings_or_rebuilt_from_checkpoint_fields():
    from mrrl.settings import given_or_rebuilt

    given = Inner(0.1, 3)
    assert given_or_rebuilt(Inner, given, {}) is given
    assert given_or_rebuilt(Inner, None, {"lr": 0.1, "steps": 3}) == given
    with pytest.raises(TypeError, match="not both"):
        given_or_rebuilt(Inner, given, {"lr": 0.2})

"""Typed settings: one frozen dataclass per config group, built from the YAML with every field required.

The YAML under ``conf/`` is the only source of defaults. :func:`from_config` therefore refuses a node that
lacks a field (instead of falling back to a default written in code), builds nested dataclass fields
recursively, and names the missing key in a one-line :class:`~mrrl.errors.ConfigError`. Keys of the node
that the dataclass does not declare are left alone: a stage config is read by several settings classes and
by the stage script itself.

A settings class declares fields without defaults; ``Optional[Settings]`` fields accept ``null``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from mrrl.errors import ConfigError

T = TypeVar("T")


def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type names, directly or as ``X | None``."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def from_config(cls: type[T], node: Mapping[str, Any] | DictConfig, where: str) -> T:
    """Build ``cls`` from ``node`` (a config mapping); ``where`` names the node in errors (``stage.train``)."""
    data = _plain(node)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of settings, got {data!r}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
    if missing:
        keys = ", ".join(f"{where}.{name}" for name in missing)
        raise ConfigError(
            f"missing config key(s) {keys}: the defaults live in conf/ (is an override or preset stale?)"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = data[f.name]
        nested = _dataclass_in(hints[f.name])
        if nested is not None and value is not None:
            value = from_config(nested, value, f"{where}.{f.name}")
        values[f.name] = value
    return cls(**values)


def field_names(cls: type) -> list[str]:
    """Every key path ``cls`` reads (``train.lr`` for nested settings): what a config must provide."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        nested = _dataclass_in(hints[f.name])
        names.append(f.name)
        if nested is not None:
            names.extend(f"{f.name}.{sub}" for sub in field_names(nested))
    return names


def given_or_rebuilt(cls: type[T], settings: T | None, fields: Mapping[str, Any]) -> T:
    """A LightningModule's settings: ``settings`` as the stage passed them, or rebuilt from ``fields``, the
    checkpoint's hyper-parameters that ``load_from_checkpoint`` passes as keyword arguments instead."""
    if settings is None:
        return from_config(cls, fields, "hyper_parameters")
    if fields:
        raise TypeError(f"pass settings or its fields, not both (got {sorted(fields)})")
    return settings

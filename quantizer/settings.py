"""Typed settings from YAML: read a mapping, build a dataclass, reject unknown keys by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from quantizer.errors import ConfigError

T = TypeVar("T")


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file; `what` names the file in errors ("job file", "serve config")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of settings")
    return values


def build_settings(cls: type[T], values: Any, where: str) -> T:
    """cls(**values), with unknown keys and wrong arguments reported against `where`."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc

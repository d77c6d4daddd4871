"""Reading the YAML config files of the trainers and tools."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["read_yaml_mapping"]


def read_yaml_mapping(path: str | os.PathLike | None, what: str, examples: str) -> dict[str, Any]:
    """The mapping in YAML file ``path`` (``{}`` when ``path`` is None or the file is empty).

    ``what`` names the file in messages ("Config", "Pairs config"); ``examples`` says where to find good ones.
    Raises :class:`ConfigError` for a missing file, invalid YAML, or a document that is not a mapping."""
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: '{path}'. See {examples} for examples.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} '{path}' must be a mapping of keys, got {type(raw).__name__}.")
    return raw

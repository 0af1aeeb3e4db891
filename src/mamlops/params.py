"""Reading ``params.yaml``: the one place DVC stages and the CLI get their settings from.

Stages read the file themselves (rather than through ``${section}`` expansion in ``dvc.yaml``)
so that key names stay the same everywhere and DVC still tracks each key a stage depends on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """A params.yaml key is missing or has a value that cannot work; the message says which."""


def load(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The whole params file as a dict; a clear error when it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found; run from the repository root")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One top-level section, e.g. ``prepare``; names the key when it is missing."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise ParamsError(f"params.yaml: section {name!r} is missing or not a mapping")
    return value


def require(sec: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``sec[key]`` checked for type; ``where`` is the dotted path used in the message."""
    if key not in sec:
        raise ParamsError(f"params.yaml: {where}.{key} is missing")
    value = sec[key]
    if isinstance(value, bool) and kind in (int, float):
        raise ParamsError(f"params.yaml: {where}.{key} must be a number, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ParamsError(f"params.yaml: {where}.{key} must be {names}, got {value!r}")
    return value

"""How a ``params.yaml`` section becomes a checked config: the key types and the one-line errors.

The frozen configs (``config.py``, and each data set's ``prepare.<name>`` keys in
``datasets/``) are the schema of params.yaml: their annotations, with pydantic's constraints
below, say what each key takes, and ``checked`` builds a config from its YAML section through
pydantic, so a wrong type, an out-of-range value or an unknown key is refused in one line that
names the key (with a did-you-mean for unknown keys). Constructing a config in code
(``MAMLConfig(inner_lr=0.4)``) is plain dataclass construction: the checks are for what users
write.

Its own module, below ``config.py`` and ``datasets/``, so that a data set declares its keys
with the same types and messages as every other section without importing the configs (which
import the data sets).
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import fields
from typing import Annotated, Any, NamedTuple, TypeVar, get_args, get_origin, get_type_hints

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from mamlops.errors import ParamsError

_T = TypeVar("_T")

PosInt = Annotated[int, Field(strict=True, ge=1)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
PosFloat = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]
SCHEMA = ConfigDict(extra="forbid")  # every config's __pydantic_config__: unknown keys refused


class Setting(NamedTuple):
    """One N-way K-shot pair; ``{ways: 5, shots: 1}`` in params.yaml, ``(5, 1)`` in code."""

    ways: PosInt
    shots: PosInt


Settings = Annotated[tuple[Setting, ...], Field(min_length=1)]

_WHAT = {  # pydantic error type -> what the key must be, in a user's words
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dataclass_type": "a mapping",
    "dict_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
}


def checked(cls: type[_T], data: Any, where: str) -> _T:
    """``cls`` built from the YAML mapping ``data`` and checked against its annotations; the
    first problem becomes a one-line ``ParamsError`` naming ``where``'s key."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where} must be a mapping of keys, got {data!r}")
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise ParamsError(_explain(exc.errors()[0], cls, where)) from None


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The top-level section ``name`` of a params file, which must be a mapping."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise ParamsError(f"params.yaml: section {name!r} is missing or not a mapping")
    return value


def flat_fields(cls: type) -> dict[str, type]:
    """A config's nested fields that params.yaml writes flat (``TrainConfig.maml``): the
    config's ``__flat_fields__``, field name -> nested config class."""
    return dict(getattr(cls, "__flat_fields__", {}))


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _explain(error: dict[str, Any], cls: type, where: str) -> str:
    flat = flat_fields(cls)
    loc = [part for part in error["loc"] if part not in flat]  # nested keys that are flat
    key = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        known = _known_keys(cls, error["loc"][:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{key}: unknown key; {hint}known: {', '.join(known)}"
    if kind in ("missing", "missing_argument"):
        return f"{key} is missing"
    if kind == "literal_error":
        return f"{key} must be one of {ctx['expected']}, got {value!r}"
    if kind == "greater_than_equal":
        bound = ctx["ge"]
        what = {0: "an integer >= 0", 1: "a positive integer"}.get(bound, f">= {bound}")
        return f"{key} must be {what}, got {value!r}"
    if kind == "greater_than":
        return f"{key} must be a positive number, got {value!r}"
    if kind == "too_short":
        return f"{key} must not be empty"
    if kind in _WHAT:
        return f"{key} must be {_WHAT[kind]}, got {value!r}"
    return f"{key}: {error['msg'][0].lower()}{error['msg'][1:]}, got {value!r}"


def _known_keys(cls: type, loc: tuple) -> list[str]:
    """The keys the mapping at ``loc`` inside ``cls`` may have (for did-you-mean)."""
    for part in loc:
        if isinstance(part, int):
            continue
        hint = get_type_hints(cls, include_extras=True)[part]
        while get_origin(hint) is not None:  # Annotated[...], tuple[X, ...], X | None
            hint = next(a for a in get_args(hint) if a is not Ellipsis and a is not type(None))
        cls = hint
    names = list(cls._fields) if hasattr(cls, "_fields") else [f.name for f in fields(cls)]
    for name, nested in flat_fields(cls).items():  # flat in params.yaml
        names = [n for n in names if n != name] + [f.name for f in fields(nested)]
    return sorted(names)

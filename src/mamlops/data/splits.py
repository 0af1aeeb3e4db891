"""Class splits of a prepared folder: which classes are for meta-training, validation, testing.

A prepared folder holds one ``splits/<scheme>.json`` per split scheme its data set prepares
(``prepare.<dataset>.splits``; the first is the default, a preset picks one with ``split``),
written by the prepare stage from its data set module's ``make_splits``
(``datasets/omniglot.py`` explains Omniglot's schemes and class ids). Each file says whether
its episodes draw distinct characters (``distinct_characters``) and whether rotations are
classes (``rotations``); everything here reads them the same way for every data set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mamlops.datasets.common import N_ROTATIONS

SPLITS_DIR = "splits"  # splits/<scheme>.json in a prepared folder


def decode_class(cid: int | Any, rotations: bool) -> tuple[Any, Any]:
    """``(char_id, k)`` of a class id (works on arrays too)."""
    if rotations:
        return cid // N_ROTATIONS, cid % N_ROTATIONS
    return cid, cid * 0


def write_splits(path: str | Path, splits: dict[str, Any]) -> None:
    """Write ``splits.json`` with one key per line (id lists stay on one line, so it is short)."""
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in splits.items())
    Path(path).write_text("{\n" + body + "\n}\n")


def prepared_meta(prepared_dir: str | Path) -> dict[str, Any]:
    """A prepared folder's ``meta.json``: its data set, image shape and split schemes."""
    meta = Path(prepared_dir) / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found; run the prepare stage first")
    return json.loads(meta.read_text())


def prepared_dataset(prepared_dir: str | Path) -> str:
    """The data set a prepared folder holds (``meta.json``), which says how its images scale."""
    return prepared_meta(prepared_dir)["dataset"]


def prepared_schemes(prepared_dir: str | Path) -> list[str]:
    """The split schemes a prepared folder holds, the default first (``meta.json``)."""
    prepared_dir = Path(prepared_dir)
    schemes = prepared_meta(prepared_dir).get("splits")
    if not schemes:  # folders prepared before splits/<scheme>.json: one root splits.json
        raise FileNotFoundError(
            f"{prepared_dir} was prepared by an older mamlops (no {SPLITS_DIR}/); rerun the "
            "prepare stage (dvc repro prepare, or mamlops prepare)"
        )
    return list(schemes)


def resolve_scheme(prepared_dir: str | Path, scheme: str | None) -> str:
    """``scheme``, checked to be in the prepared folder, or its default when None."""
    schemes = prepared_schemes(prepared_dir)
    if scheme is None:
        return schemes[0]
    if scheme not in schemes:
        raise FileNotFoundError(
            f"{prepared_dir} holds the splits {schemes}, not {scheme!r}: add {scheme} to "
            "prepare.<dataset>.splits in params.yaml and rerun the prepare stage"
        )
    return scheme


def splits_path(prepared_dir: str | Path, scheme: str) -> Path:
    """Where one scheme's class ids live in a prepared folder."""
    return Path(prepared_dir) / SPLITS_DIR / f"{scheme}.json"


def read_splits(prepared_dir: str | Path, scheme: str | None = None) -> dict[str, Any]:
    """The class ids of ``scheme`` (the folder's default scheme when None)."""
    return json.loads(splits_path(prepared_dir, resolve_scheme(prepared_dir, scheme)).read_text())

"""What every data set module (``omniglot.py``, ``miniimagenet.py``) builds on: the split names,
rotated class ids, what a source folder lists, and the checks of episode settings.

Its own module so that the data set modules import it rather than the registry
(``datasets/__init__.py``), which imports them: no import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mamlops.errors import ParamsError

SPLITS = ("train", "val", "test")
N_ROTATIONS = 4  # with rotations, each character gives four classes: 0, 90, 180, 270 degrees


class Listing(NamedTuple):
    """The classes of a source folder, in the order of the rows of ``images.npy``."""

    header: tuple[str, ...]  # the columns of classes.csv (the first: the row id)
    rows: list[tuple[Any, ...]]  # one per class: the other columns of classes.csv
    files: list[list[Path]]  # each class's images, in their order in images.npy
    alphabets: list[str] | None = None  # each class's alphabet, for within-alphabet episodes


def class_id(char_id: int, k: int, rotations: bool = True) -> int:
    """The class id of character ``char_id`` rotated by ``k * 90`` degrees counter-clockwise."""
    return char_id * N_ROTATIONS + k if rotations else char_id


def expand(char_ids: np.ndarray, rotations: bool) -> list[int]:
    """The sorted class ids of characters ``char_ids``: all four rotations of each, or the
    characters themselves."""
    if not rotations:
        return sorted(int(c) for c in char_ids)
    return sorted(int(c) * N_ROTATIONS + k for c in char_ids for k in range(N_ROTATIONS))


def check_split_ids(parts: dict[str, list[int]], expected: dict[str, int]) -> None:
    """Splits disjoint and of the sizes promised in advance (the params were checked against
    those sizes before any work)."""
    seen: set[int] = set()
    for split in SPLITS:
        ids = set(parts[split])
        if len(ids) != expected[split]:
            raise ValueError(f"{split} split has {len(ids)} classes, expected {expected[split]}")
        if seen & ids:
            raise ValueError(f"{split} split overlaps an earlier split")
        seen |= ids


def check_unique(items: tuple, where: str, what: str = "a setting") -> None:
    """A params.yaml list must not name one thing twice."""
    if len(set(items)) < len(items):
        raise ParamsError(f"params.yaml: {where} lists {what} twice")


def check_fits(
    settings: tuple[tuple[int, int], ...],
    where: str,
    query: int,
    split_classes: list[int],
    images_per_class: int,
    why: str,
) -> None:
    """Every N-way K-shot setting of ``where`` has N classes in val and test, and K + query
    images per class: checked from the data set's facts before any work starts."""
    classes = dict(zip(SPLITS, split_classes, strict=True))
    for i, (ways, shots) in enumerate(settings):
        for split in ("val", "test"):
            if ways > classes[split]:
                raise ParamsError(
                    f"params.yaml: {where}[{i}].ways = {ways} is larger than the "
                    f"{classes[split]} classes of the {split} split ({why})"
                )
        if shots + query > images_per_class:
            raise ParamsError(
                f"params.yaml: {where}[{i}].shots + prepare.episodes.query = {shots} + {query} "
                f"is more than the {images_per_class} images per class ({why})"
            )

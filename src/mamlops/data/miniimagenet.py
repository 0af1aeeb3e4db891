"""miniImageNet: validate a user-supplied image folder against the Ravi & Larochelle split.

Nothing is downloaded: the images come from ImageNet, whose terms forbid redistribution, so users
bring their own ``images/`` folder of JPEGs named as in the split CSVs (``filename,label``). The
project ships only those CSVs (``resources/miniimagenet``, MIT, from jakesnell/prototypical-
networks). The tests check the error paths with a tiny fake folder; nothing here fabricates a
stand-in data set.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from mamlops import datasets
from mamlops.errors import DataError

SPLITS_DIR = Path(__file__).parents[1] / "resources" / "miniimagenet"
# Classes per split and images per class in the Ravi & Larochelle (2017) split.
EXPECTED_CLASSES = dict(
    zip(("train", "val", "test"), datasets.MINIIMAGENET.split_sizes["ravi"], strict=True)
)
IMAGES_PER_CLASS = datasets.MINIIMAGENET.images_per_class
_SHOWN = 5


def _listing(names: list[str]) -> str:
    """The first few names and how many more, so a message stays short but concrete."""
    shown = ", ".join(names[:_SHOWN])
    return f"{shown} (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else shown


def read_split(path: Path) -> list[tuple[str, str]]:
    """``(filename, label)`` rows of one split CSV; a clear error for a missing or odd file."""
    if not path.is_file():
        raise DataError(f"{path}: split CSV not found")
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != ["filename", "label"]:
            raise DataError(f"{path}: expected header 'filename,label', got {header!r}")
        rows = [(row[0], row[1]) for row in reader if row]
    return rows


def _check_counts(path: Path, split: str, rows: list[tuple[str, str]]) -> int:
    """Class and per-class image counts of one split; returns the number of classes."""
    per_class = Counter(label for _, label in rows)
    want = EXPECTED_CLASSES[split]
    if len(per_class) != want:
        raise DataError(f"{path}: {len(per_class)} classes in split {split!r}, expected {want}")
    wrong = sorted(f"{label} ({n})" for label, n in per_class.items() if n != IMAGES_PER_CLASS)
    if wrong:
        raise DataError(f"{path}: classes without {IMAGES_PER_CLASS} images: {_listing(wrong)}")
    return len(per_class)


def _images_folder(images_dir: Path) -> Path:
    """Accept either the ``images/`` folder itself or the folder that contains it."""
    nested = images_dir / "images"
    return nested if nested.is_dir() else images_dir


def validate(images_dir: Path, splits_dir: Path | None = None) -> dict[str, Any]:
    """Check that every image the split names is present and readable, and the class counts.

    ``splits_dir`` holds ``train.csv``, ``val.csv`` and ``test.csv`` (default: the shipped Ravi
    copy). Raises DataError naming the missing or unreadable files (first few and a count) or the
    wrong counts. Returns ``{"images_dir", "splits": {split: {"classes", "images"}}}``.
    """
    images_dir = Path(images_dir)
    splits_dir = Path(splits_dir) if splits_dir is not None else SPLITS_DIR
    folder = _images_folder(images_dir)
    if not folder.is_dir():
        raise DataError(
            f"{images_dir}: miniImageNet folder not found; set data.miniimagenet_dir to a folder "
            "holding images/<file>.jpg as named in the Ravi split CSVs (or leave it empty)"
        )
    splits: dict[str, dict[str, int]] = {}
    names: list[str] = []
    for split in EXPECTED_CLASSES:
        path = splits_dir / f"{split}.csv"
        rows = read_split(path)
        splits[split] = {"classes": _check_counts(path, split, rows), "images": len(rows)}
        names.extend(name for name, _ in rows)

    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{folder}: {len(missing)} of {len(names)} images missing: {_listing(missing)}; "
            "supply the full miniImageNet images/ folder"
        )
    unreadable = []
    for name in names:
        try:
            with Image.open(folder / name) as image:
                image.verify()
        except Exception:  # PIL raises many types for damaged images
            unreadable.append(name)
    if unreadable:
        raise DataError(
            f"{folder}: {len(unreadable)} image(s) cannot be read: {_listing(unreadable)}; "
            "replace them from your ImageNet copy"
        )
    return {"images_dir": str(folder), "splits": splits}

"""miniImageNet (Vinyals et al. 2016, Ravi & Larochelle 2017): facts, ``prepare.miniimagenet``
keys, the user's folder, and its check against the Ravi split.

Nothing is downloaded: the images come from ImageNet, whose terms forbid redistribution, so users
bring their own ``images/`` folder of JPEGs named as in the split CSVs (``filename,label``;
``data.miniimagenet_dir``). The project ships only those CSVs (``resources/miniimagenet``, MIT,
from jakesnell/prototypical-networks). The tests check the error paths with a tiny fake folder;
nothing here fabricates a stand-in data set.

Found through the registry (``datasets/__init__.py``): the prepare stage asks ``list_classes``
and ``make_splits`` what to decode and how it splits, the download stage asks
``describe_source`` to check the folder. ``data`` arguments are ``config.DataConfig`` and
``episodes`` ones ``config.EpisodeConfig`` (not imported: the configs import the data sets).
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mamlops.datasets.common import SPLITS, Listing, check_fits, check_unique
from mamlops.errors import DataError, ParamsError
from mamlops.schema import SCHEMA, Setting, Settings

SPLITS_DIR = Path(__file__).parents[1] / "resources" / "miniimagenet"  # the Ravi CSVs
RAVI = (64, 16, 20)  # classes per split, Ravi & Larochelle 2017; no rotations
FACTS: dict[str, Any] = dict(
    name="miniimagenet",
    image_size=84,
    channels=3,
    color_mode="RGB",
    invert=False,
    hidden=32,
    max_pool=True,
    images_per_class=600,
    split_sizes={"ravi": RAVI},
    # MAML paper (Finn et al. 2017, Table 2): accuracy, 95% CI, transductive BN, 600 tasks
    paper={(5, 1): (48.70, 1.84), (5, 5): (63.11, 0.92)},
    # MAML++ (Antoniou et al. 2019, Table 1): mean ± std over 3 seeds
    mamlpp={(5, 1): "52.15 ± 0.26", (5, 5): "68.32 ± 0.44"},
)
EXPECTED_CLASSES = dict(zip(SPLITS, RAVI, strict=True))
IMAGES_PER_CLASS = FACTS["images_per_class"]
_SHOWN = 5


@dataclass(frozen=True)
class Keys:
    """``prepare.miniimagenet``: the N-way K-shot settings that get fixed episode files (its
    val split has only 16 classes, so Omniglot's 20-way settings would not fit)."""

    __pydantic_config__ = SCHEMA
    settings: Settings = (Setting(5, 1), Setting(5, 5))


# ----------------------------------------------------------------------------- params


def check_section(prep: dict[str, Any]) -> None:
    """No keys of older params files to refuse."""


def check_keys(keys: Keys, episodes: Any) -> None:
    """Every episode setting fits the Ravi split, before any work starts."""
    check_unique(keys.settings, "prepare.miniimagenet.settings")
    check_fits(
        keys.settings,
        "prepare.miniimagenet.settings",
        episodes.query,
        list(RAVI),
        IMAGES_PER_CLASS,
        "miniImageNet, Ravi split",
    )


def schemes(keys: Keys) -> tuple[str, ...]:
    return ("ravi",)


def settings(keys: Keys, episodes: Any) -> tuple[tuple[int, int], ...]:
    """miniImageNet's own settings: ``prepare.miniimagenet.settings``."""
    return keys.settings


# ----------------------------------------------------------------------------- source


def source(data: Any, download_dir: Path) -> Path:
    """The user's folder, ``data.miniimagenet_dir``, which must then be configured."""
    if not data.miniimagenet_dir:
        raise ParamsError(
            "params.yaml: data.miniimagenet_dir is empty but miniimagenet is to be prepared; "
            "point it at the images or drop it from prepare.datasets"
        )
    return Path(data.miniimagenet_dir)


def describe_source(data: Any) -> str:
    """The download stage's line on the user's folder, checked when one is configured."""
    if not data.miniimagenet_dir:
        return "miniimagenet: not configured (no folder given); skipped"
    report = validate(Path(data.miniimagenet_dir))
    splits = ", ".join(
        f"{s} {v['classes']} classes/{v['images']} images" for s, v in report["splits"].items()
    )
    return f"miniimagenet: {report['images_dir']} valid ({splits})"


def list_classes(src_dir: str | Path, csv_dir: str | Path | None = None) -> Listing:
    """``(split, wnid)`` per class (splits train/val/test, wnids sorted) and sorted image paths.

    Images are looked up in ``src_dir/images`` if it exists, else in ``src_dir`` itself.
    """
    src_dir = Path(src_dir)
    csv_dir = Path(csv_dir) if csv_dir is not None else SPLITS_DIR
    image_dir = _images_folder(src_dir)
    classes: list[tuple[str, str]] = []
    files: list[list[Path]] = []
    for split in SPLITS:
        by_class: dict[str, list[str]] = {}
        with open(csv_dir / f"{split}.csv", newline="") as f:
            for row in csv.DictReader(f):
                by_class.setdefault(row["label"], []).append(row["filename"])
        for wnid in sorted(by_class):
            classes.append((split, wnid))
            files.append([image_dir / name for name in sorted(by_class[wnid])])
    sizes = {len(fs) for fs in files}
    if len(sizes) != 1:
        raise DataError(f"{csv_dir}: classes have different image counts {sorted(sizes)}")
    missing = [p for fs in files for p in fs if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{image_dir}: {len(missing)} images named in the Ravi CSVs are missing, "
            f"e.g. {missing[0].name}"
        )
    return Listing(("class_id", "set", "wnid"), classes, files)


def make_splits(listing: Listing, keys: Keys) -> list[dict[str, Any]]:
    """Ravi split: classes are stored train, val, test in order, so the ids are ranges."""
    counts = [sum(1 for s, _ in listing.rows if s == split) for split in SPLITS]
    bounds = np.cumsum((0, *counts))
    parts = {s: list(range(bounds[i], bounds[i + 1])) for i, s in enumerate(SPLITS)}
    return [
        {"scheme": "ravi", "rotations": False, "seed": None, "distinct_characters": False, **parts}
    ]


# ----------------------------------------------------------------------------- validation


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

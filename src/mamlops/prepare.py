"""The ``prepare`` stage: raw images to one ``uint8`` array, an index, splits and fixed episodes.

Decoding 32,460 small PNGs takes seconds, but every training run, test and evaluation needs the
images; so they are decoded once, here, into ``images.npy`` (``[classes, images, H, W]``, or
``[..., 3]`` for RGB) that later stages load in a fraction of a second.

Prepared folder::

    images.npy      uint8 [1623, 20, 28, 28]  (Omniglot) / [100, 600, 84, 84, 3] (miniImageNet)
    classes.csv     row index of images.npy -> names (char_id,set,alphabet,character / ...)
    splits.json     {scheme, rotations, seed, train, val, test}: class ids (see splits.py)
    meta.json       dataset, image size, array shape
    episodes/       {val,test}_<N>w<K>s.npz fixed evaluation episodes (see episodes.py)

Everything is written into a temporary sibling folder that is renamed into place at the end, so
an interrupted run never leaves a half-written folder that looks complete.

All params are checked (``validate_prepare_params``) before any work starts.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mamlops.episodes import IMAGES_FILE, write_episode_files
from mamlops.params import ParamsError, require, section
from mamlops.preprocess import load_image
from mamlops.splits import (
    MINIIMAGENET_COUNTS,
    SCHEMES,
    SPLITS,
    Character,
    expected_class_counts,
    make_miniimagenet_splits,
    make_omniglot_splits,
    write_splits,
)

DATASETS = ("omniglot", "miniimagenet")
OMNIGLOT_SETS = {"background": "images_background", "evaluation": "images_evaluation"}
OMNIGLOT_CHARACTERS = 1623
OMNIGLOT_IMAGES_PER_CLASS = 20
MINIIMAGENET_IMAGES_PER_CLASS = 600
DEFAULT_MINIIMAGENET_SETTINGS = ((5, 1), (5, 5))


# --------------------------------------------------------------------------- params


@dataclass(frozen=True)
class EpisodeConfig:
    """``prepare.episodes``: fixed evaluation episodes."""

    seed: int
    count: int
    val_count: int
    query: int
    settings: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class PrepareConfig:
    """The checked ``prepare`` section."""

    split: str
    split_seed: int
    rotations: bool
    omniglot_size: int
    miniimagenet_size: int
    miniimagenet_settings: tuple[tuple[int, int], ...]
    episodes: EpisodeConfig
    datasets: tuple[str, ...] = ("omniglot",)


def _positive(sec: dict[str, Any], key: str, where: str, minimum: int = 1) -> int:
    value = require(sec, key, int, where)
    if value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ParamsError(f"params.yaml: {where}.{key} must be {what}, got {value}")
    return value


def _settings(value: Any, where: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or not value:
        raise ParamsError(f"params.yaml: {where} must be a non-empty list of {{ways, shots}}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ParamsError(f"params.yaml: {where}[{i}] must be a mapping {{ways, shots}}")
        out.append(
            (_positive(item, "ways", f"{where}[{i}]"), _positive(item, "shots", f"{where}[{i}]"))
        )
    if len(set(out)) != len(out):
        raise ParamsError(f"params.yaml: {where} lists a setting twice")
    return tuple(out)


def _check_fits(
    settings: tuple[tuple[int, int], ...],
    where: str,
    query: int,
    classes: dict[str, int],
    images_per_class: int,
    why: str,
) -> None:
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


def prepare_config(params: dict[str, Any]) -> PrepareConfig:
    """The ``prepare`` section checked and typed; ``ParamsError`` names the bad key and why."""
    prep = section(params, "prepare")
    om = require(prep, "omniglot", dict, "prepare")
    mini = require(prep, "miniimagenet", dict, "prepare")
    ep = require(prep, "episodes", dict, "prepare")

    datasets = tuple(prep.get("datasets", ["omniglot"]) or ())
    if (
        not datasets
        or any(d not in DATASETS for d in datasets)
        or len(set(datasets)) < len(datasets)
    ):
        raise ParamsError(
            f"params.yaml: prepare.datasets must list some of {list(DATASETS)} once each, "
            f"got {prep.get('datasets')!r}"
        )
    split = require(om, "split", str, "prepare.omniglot")
    if split not in SCHEMES:
        raise ParamsError(
            f"params.yaml: prepare.omniglot.split is {split!r}; expected one of {list(SCHEMES)}"
        )
    split_seed = _positive(om, "split_seed", "prepare.omniglot", minimum=0)
    rotations = om.get("rotations", True)
    if not isinstance(rotations, bool):
        raise ParamsError(
            f"params.yaml: prepare.omniglot.rotations must be true or false, got {rotations!r}"
        )
    omniglot_size = _positive(om, "image_size", "prepare.omniglot")
    mini_size = _positive(mini, "image_size", "prepare.miniimagenet")
    mini_settings = DEFAULT_MINIIMAGENET_SETTINGS
    if "settings" in mini:
        mini_settings = _settings(mini["settings"], "prepare.miniimagenet.settings")

    episodes = EpisodeConfig(
        seed=_positive(ep, "seed", "prepare.episodes", minimum=0),
        count=_positive(ep, "count", "prepare.episodes"),
        val_count=_positive(ep, "val_count", "prepare.episodes"),
        query=_positive(ep, "query", "prepare.episodes"),
        settings=_settings(ep.get("settings"), "prepare.episodes.settings"),
    )
    _check_fits(
        episodes.settings,
        "prepare.episodes.settings",
        episodes.query,
        expected_class_counts(split, rotations),
        OMNIGLOT_IMAGES_PER_CLASS,
        f"Omniglot, split {split}, rotations {str(rotations).lower()}",
    )
    _check_fits(
        mini_settings,
        "prepare.miniimagenet.settings",
        episodes.query,
        dict(zip(SPLITS, MINIIMAGENET_COUNTS, strict=True)),
        MINIIMAGENET_IMAGES_PER_CLASS,
        "miniImageNet, Ravi split",
    )
    return PrepareConfig(
        split, split_seed, rotations, omniglot_size, mini_size, mini_settings, episodes, datasets
    )


def validate_prepare_params(params: dict[str, Any]) -> None:
    """Raise ``ParamsError`` (naming the key and why) if the prepare stage could not work."""
    prepare_config(params)


# --------------------------------------------------------------------------- helpers


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``out_dir``, renamed to ``out_dir`` on success."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _workers(workers: int | None) -> int:
    return max(1, min(os.cpu_count() or 1, 2) if workers is None else workers)


def _decode_class(job: tuple[list[str], str, int]) -> np.ndarray:
    files, dataset, size = job
    return np.stack([load_image(f, dataset, size) for f in files])


def _decode_all(
    jobs: list[tuple[list[str], str, int]], workers: int, out: np.ndarray
) -> np.ndarray:
    """Decode class by class into ``out`` (possibly a memmap), in order, on ``workers``."""
    if workers == 1:
        for i, job in enumerate(jobs):
            out[i] = _decode_class(job)
        return out
    # fork: the children only run Pillow, and start instantly (no re-import of the parent)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        for i, arr in enumerate(pool.imap(_decode_class, jobs, chunksize=8)):
            out[i] = arr
    return out


def _write_common(
    tmp: Path,
    splits: dict[str, Any],
    meta: dict[str, Any],
    settings: tuple[tuple[int, int], ...],
    episodes: EpisodeConfig,
) -> None:
    write_splits(tmp / "splits.json", splits)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    counts = {"val": episodes.val_count, "test": episodes.count}
    write_episode_files(
        tmp, splits, meta["images_per_class"], settings, episodes.query, counts, episodes.seed
    )


# --------------------------------------------------------------------------- Omniglot


def list_omniglot(raw_dir: str | Path) -> tuple[list[Character], list[list[Path]]]:
    """Characters (sorted by set, alphabet, character) and their drawings (sorted by name)."""
    raw_dir = Path(raw_dir)
    characters: list[Character] = []
    files: list[list[Path]] = []
    for set_name, folder in OMNIGLOT_SETS.items():
        root = raw_dir / folder
        if not root.is_dir():
            raise FileNotFoundError(f"{root} not found; run the download stage first")
        for alphabet in sorted(p for p in root.iterdir() if p.is_dir()):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                pngs = sorted(char.glob("*.png"))
                if len(pngs) != OMNIGLOT_IMAGES_PER_CLASS:
                    raise ValueError(
                        f"{char}: {len(pngs)} drawings, expected {OMNIGLOT_IMAGES_PER_CLASS}"
                    )
                characters.append(Character(set_name, alphabet.name, char.name))
                files.append(pngs)
    if len(characters) != OMNIGLOT_CHARACTERS:
        raise ValueError(f"{raw_dir}: {len(characters)} characters, expected {OMNIGLOT_CHARACTERS}")
    return characters, files


def read_classes(prepared_dir: str | Path) -> list[dict[str, str]]:
    """The rows of ``classes.csv`` (one per row of ``images.npy``)."""
    with open(Path(prepared_dir) / "classes.csv", newline="") as f:
        return list(csv.DictReader(f))


def prepare_omniglot(
    raw_dir: str | Path, out_dir: str | Path, cfg: PrepareConfig, workers: int | None = None
) -> dict[str, Any]:
    """Decode, split and write episodes for Omniglot; returns a summary for printing/logging."""
    characters, files = list_omniglot(raw_dir)
    size = cfg.omniglot_size
    splits = make_omniglot_splits(characters, cfg.split, cfg.split_seed, cfg.rotations)
    shape = (len(characters), OMNIGLOT_IMAGES_PER_CLASS, size, size)
    jobs = [([str(f) for f in fs], "omniglot", size) for fs in files]
    with staged_dir(out_dir) as tmp:
        images = _decode_all(jobs, _workers(workers), np.empty(shape, dtype=np.uint8))
        np.save(tmp / IMAGES_FILE, images)
        with open(tmp / "classes.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["char_id", "set", "alphabet", "character"])
            w.writerows((i, *c) for i, c in enumerate(characters))
        meta = {
            "dataset": "omniglot",
            "image_size": size,
            "images_per_class": OMNIGLOT_IMAGES_PER_CLASS,
            "shape": list(shape),
        }
        _write_common(tmp, splits, meta, cfg.episodes.settings, cfg.episodes)
    return _summary(out_dir, splits, meta)


def _summary(out_dir: str | Path, splits: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "out_dir": str(out_dir),
        "dataset": meta["dataset"],
        "shape": meta["shape"],
        "scheme": splits["scheme"],
        "rotations": splits["rotations"],
        "classes": {s: len(splits[s]) for s in SPLITS},
        "episode_files": sorted(p.name for p in (Path(out_dir) / "episodes").glob("*.npz")),
    }


# --------------------------------------------------------------------------- miniImageNet


def _ravi_csv_dir() -> Path:
    return Path(str(resources.files("mamlops") / "resources" / "miniimagenet"))


def list_miniimagenet(
    src_dir: str | Path, csv_dir: str | Path | None = None
) -> tuple[list[tuple[str, str]], list[list[Path]]]:
    """``(split, wnid)`` per class (splits train/val/test, wnids sorted) and sorted image paths.

    Images are looked up in ``src_dir/images`` if it exists, else in ``src_dir`` itself.
    """
    src_dir = Path(src_dir)
    csv_dir = Path(csv_dir) if csv_dir is not None else _ravi_csv_dir()
    image_dir = src_dir / "images" if (src_dir / "images").is_dir() else src_dir
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
        raise ValueError(f"{csv_dir}: classes have different image counts {sorted(sizes)}")
    missing = [p for fs in files for p in fs if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{image_dir}: {len(missing)} images named in the Ravi CSVs are missing, "
            f"e.g. {missing[0].name}"
        )
    return classes, files


def prepare_miniimagenet(
    src_dir: str | Path,
    out_dir: str | Path,
    cfg: PrepareConfig,
    csv_dir: str | Path | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Decode a user's miniImageNet into the prepared format (84x84 RGB, Ravi split)."""
    classes, files = list_miniimagenet(src_dir, csv_dir)
    size = cfg.miniimagenet_size
    counts = tuple(sum(1 for s, _ in classes if s == split) for split in SPLITS)
    splits = make_miniimagenet_splits(counts)  # type: ignore[arg-type]
    per_class = len(files[0])
    shape = (len(classes), per_class, size, size, 3)
    jobs = [([str(f) for f in fs], "miniimagenet", size) for fs in files]
    with staged_dir(out_dir) as tmp:
        # written straight into the .npy file: the full array is about 2 GB
        out = np.lib.format.open_memmap(tmp / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=shape)
        _decode_all(jobs, _workers(workers), out)
        out.flush()
        del out
        with open(tmp / "classes.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class_id", "set", "wnid"])
            w.writerows((i, s, wnid) for i, (s, wnid) in enumerate(classes))
        meta = {
            "dataset": "miniimagenet",
            "image_size": size,
            "images_per_class": per_class,
            "shape": list(shape),
        }
        _write_common(tmp, splits, meta, cfg.miniimagenet_settings, cfg.episodes)
    return _summary(out_dir, splits, meta)

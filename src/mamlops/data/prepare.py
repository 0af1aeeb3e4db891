"""The ``prepare`` stage: raw images to one ``uint8`` array, an index, splits and fixed episodes.

Decoding 32,460 small PNGs takes seconds, but every training run, test and evaluation needs the
images; so they are decoded once, here, into ``images.npy`` (``[classes, images, H, W]``, or
``[..., 3]`` for RGB) that later stages load in a fraction of a second.

Prepared folder::

    images.npy      uint8 [1623, 20, 28, 28]  (Omniglot) / [100, 600, 84, 84, 3] (miniImageNet)
    classes.csv     row index of images.npy -> names (char_id,set,alphabet,character / ...)
    splits/         <scheme>.json: {scheme, rotations, seed, train, val, test} class ids, one
                    file per split scheme (prepare.omniglot.splits; see splits.py)
    meta.json       dataset, image size, array shape, the split schemes (the default first)
    episodes/       <scheme>/{val,test}[_alphabet]_<N>w<K>s.npz fixed evaluation episodes
                    (see episodes.py)

Everything is written into a temporary sibling folder that is renamed into place at the end, so
an interrupted run never leaves a half-written folder that looks complete.

Params come checked (``config.PrepareConfig``) before any work starts; ``prepare_stage`` is
the DVC stage ``prepare@<dataset>`` (and ``mamlops prepare``).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mamlops import datasets
from mamlops.config import EpisodeConfig, PrepareConfig
from mamlops.data.episodes import IMAGES_FILE, write_episode_files
from mamlops.data.preprocess import load_image
from mamlops.data.splits import (
    SPLITS,
    SPLITS_DIR,
    Character,
    make_miniimagenet_splits,
    make_omniglot_splits,
    splits_path,
    write_splits,
)
from mamlops.errors import DataError
from mamlops.files import sweep_abandoned, work_dir

OMNIGLOT_SETS = {"background": "images_background", "evaluation": "images_evaluation"}
OMNIGLOT = datasets.OMNIGLOT


# --------------------------------------------------------------------------- helpers


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """A fresh work folder beside ``out_dir`` (``files.work_dir``), renamed to ``out_dir`` on
    success; folders that killed runs left beside it are swept first."""
    out_dir = Path(out_dir)
    sweep_abandoned(out_dir)
    tmp = work_dir(out_dir)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = work_dir(out_dir, "old")
        out_dir.rename(old / out_dir.name)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _workers(workers: int | None) -> int:
    return max(1, min(os.cpu_count() or 1, 2) if workers is None else workers)


def _decode_class(job: tuple[list[str], str]) -> np.ndarray:
    files, dataset = job
    return np.stack([load_image(f, dataset) for f in files])


def _decode_all(jobs: list[tuple[list[str], str]], workers: int, out: np.ndarray) -> np.ndarray:
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
    schemes: list[dict[str, Any]],
    meta: dict[str, Any],
    settings: tuple[tuple[int, int], ...],
    episodes: EpisodeConfig,
    alphabets: list[str] | None = None,
) -> None:
    """Every scheme's class ids and fixed episodes, and ``meta.json`` naming the schemes."""
    (tmp / SPLITS_DIR).mkdir()
    for splits in schemes:
        write_splits(splits_path(tmp, splits["scheme"]), splits)
    meta = {**meta, "splits": [splits["scheme"] for splits in schemes]}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    counts = {"val": episodes.val_count, "test": episodes.count}
    for splits in schemes:
        write_episode_files(
            tmp,
            splits,
            meta["images_per_class"],
            settings,
            episodes.query,
            counts,
            episodes.seed,
            alphabets,
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
                if len(pngs) != OMNIGLOT.images_per_class:
                    raise DataError(
                        f"{char}: {len(pngs)} drawings, expected {OMNIGLOT.images_per_class}"
                    )
                characters.append(Character(set_name, alphabet.name, char.name))
                files.append(pngs)
    if len(characters) != OMNIGLOT.classes:
        raise DataError(f"{raw_dir}: {len(characters)} characters, expected {OMNIGLOT.classes}")
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
    size = OMNIGLOT.image_size
    schemes = [
        make_omniglot_splits(characters, scheme, cfg.split_seed, cfg.rotations)
        for scheme in cfg.splits
    ]
    shape = (len(characters), OMNIGLOT.images_per_class, size, size)
    jobs = [([str(f) for f in fs], "omniglot") for fs in files]
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
            "images_per_class": OMNIGLOT.images_per_class,
            "shape": list(shape),
        }
        alphabets = [c.alphabet for c in characters]
        _write_common(tmp, schemes, meta, cfg.episodes.settings, cfg.episodes, alphabets)
    return _summary(out_dir, schemes, meta)


def _summary(
    out_dir: str | Path, schemes: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    episodes = Path(out_dir) / "episodes"
    return {
        "out_dir": str(out_dir),
        "dataset": meta["dataset"],
        "shape": meta["shape"],
        "rotations": schemes[0]["rotations"],
        "schemes": {
            splits["scheme"]: {
                "classes": {s: len(splits[s]) for s in SPLITS},
                "episode_files": sorted(
                    p.name for p in (episodes / splits["scheme"]).glob("*.npz")
                ),
            }
            for splits in schemes
        },
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
        raise DataError(f"{csv_dir}: classes have different image counts {sorted(sizes)}")
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
    size = datasets.MINIIMAGENET.image_size
    counts = tuple(sum(1 for s, _ in classes if s == split) for split in SPLITS)
    splits = make_miniimagenet_splits(counts)  # type: ignore[arg-type]
    per_class = len(files[0])
    shape = (len(classes), per_class, size, size, 3)
    jobs = [([str(f) for f in fs], "miniimagenet") for fs in files]
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
        _write_common(tmp, [splits], meta, cfg.miniimagenet_settings, cfg.episodes)
    return _summary(out_dir, [splits], meta)


def prepare_stage(
    cfg: PrepareConfig,
    dataset: str,
    source: str | Path | None,
    out_dir: str | Path,
) -> dict[str, Any]:
    """The stage ``prepare@<dataset>`` (and ``mamlops prepare``): ``source`` is the raw Omniglot
    folder or the user's miniImageNet folder (``data.miniimagenet_dir``). Prints a summary."""
    datasets.get(dataset)  # a clear error for unknown names
    start = time.perf_counter()
    if dataset == "omniglot":
        summary = prepare_omniglot(source, out_dir, cfg)
    else:
        summary = prepare_miniimagenet(source, out_dir, cfg)
    print(
        f"{summary['dataset']}: {summary['out_dir']} images {summary['shape']} in "
        f"{time.perf_counter() - start:.1f} s (rotations {str(summary['rotations']).lower()})"
    )
    for scheme, info in summary["schemes"].items():
        classes = ", ".join(f"{s} {n}" for s, n in info["classes"].items())
        print(f"  split {scheme}: {classes} classes; episodes: {', '.join(info['episode_files'])}")
    return summary

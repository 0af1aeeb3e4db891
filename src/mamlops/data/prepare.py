"""The ``prepare`` stage: raw images to one ``uint8`` array, an index, splits and fixed episodes.

Decoding 32,460 small PNGs takes seconds, but every training run, test and evaluation needs the
images; so they are decoded once, here, into ``images.npy`` (``[classes, images, H, W]``, or
``[..., 3]`` for RGB) that later stages load in a fraction of a second.

Prepared folder::

    images.npy      uint8 [1623, 20, 28, 28]  (Omniglot) / [100, 600, 84, 84, 3] (miniImageNet)
    classes.csv     row index of images.npy -> names (char_id,set,alphabet,character / ...)
    splits/         <scheme>.json: {scheme, rotations, seed, train, val, test} class ids, one
                    file per split scheme (prepare.<dataset>.splits; see splits.py)
    meta.json       dataset, image size, array shape, the split schemes (the default first)
    episodes/       <scheme>/{val,test}[_alphabet]_<N>w<K>s.npz fixed evaluation episodes
                    (see episodes.py)

Everything is written into a temporary sibling folder that is renamed into place at the end, so
an interrupted run never leaves a half-written folder that looks complete.

The work is the same for every data set; what differs (which classes a source folder holds,
in which order, and how they split) the data set's module says (``datasets/``), through its
``Dataset`` record: nothing here names a data set.

Params come checked (``config.PrepareConfig``) before any work starts; ``prepare_stage`` is
the DVC stage ``prepare@<dataset>`` (and ``mamlops prepare``).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mamlops import datasets
from mamlops.config import EpisodeConfig, PrepareConfig
from mamlops.data.episodes import IMAGES_FILE, write_episode_files
from mamlops.data.preprocess import load_image
from mamlops.data.splits import SPLITS_DIR, splits_path, write_splits
from mamlops.datasets.common import SPLITS
from mamlops.files import sweep_abandoned, work_dir

# --------------------------------------------------------------------------- helpers


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """A fresh work folder beside ``out_dir`` (``files.work_dir``), renamed to ``out_dir`` on
    success; folders that killed runs left beside it are swept first."""
    out_dir = Path(out_dir)
    sweep_abandoned(out_dir)
    with work_dir(out_dir) as tmp:
        yield tmp
        with work_dir(out_dir, "old") as old:
            if out_dir.exists():
                out_dir.rename(old / out_dir.name)
            tmp.rename(out_dir)


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


def read_classes(prepared_dir: str | Path) -> list[dict[str, str]]:
    """The rows of ``classes.csv`` (one per row of ``images.npy``)."""
    with open(Path(prepared_dir) / "classes.csv", newline="") as f:
        return list(csv.DictReader(f))


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


def prepare_dataset(
    dataset: str,
    source: str | Path,
    out_dir: str | Path,
    cfg: PrepareConfig,
    workers: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Decode, split and write episodes for ``dataset`` from its ``source`` folder (``options``
    go to its module's ``list_classes``); returns a summary for printing/logging."""
    data = datasets.get(dataset)
    listing = data.list_classes(source, **options)
    schemes = data.make_splits(listing, cfg.keys[dataset])
    size, per_class = data.image_size, len(listing.files[0])
    colour = (data.channels,) if data.channels > 1 else ()  # grayscale: no channel axis
    shape = (len(listing.files), per_class, size, size, *colour)
    jobs = [([str(f) for f in fs], dataset) for fs in listing.files]
    with staged_dir(out_dir) as tmp:
        # written straight into the .npy file: miniImageNet's array is about 2 GB
        out = np.lib.format.open_memmap(tmp / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=shape)
        _decode_all(jobs, _workers(workers), out)
        out.flush()
        del out
        with open(tmp / "classes.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(listing.header)
            w.writerows((i, *row) for i, row in enumerate(listing.rows))
        meta = {
            "dataset": dataset,
            "image_size": size,
            "images_per_class": per_class,
            "shape": list(shape),
        }
        settings = cfg.settings(dataset)
        _write_common(tmp, schemes, meta, settings, cfg.episodes, listing.alphabets)
    return _summary(out_dir, schemes, meta)


def prepare_stage(
    cfg: PrepareConfig,
    dataset: str,
    source: str | Path | None,
    out_dir: str | Path,
) -> dict[str, Any]:
    """The stage ``prepare@<dataset>`` (and ``mamlops prepare``): ``source`` is where the data
    set's module says it lies (``config.DataConfig.source``). Prints a summary."""
    datasets.get(dataset)  # a clear error for unknown names
    start = time.perf_counter()
    summary = prepare_dataset(dataset, source, out_dir, cfg)
    print(
        f"{summary['dataset']}: {summary['out_dir']} images {summary['shape']} in "
        f"{time.perf_counter() - start:.1f} s (rotations {str(summary['rotations']).lower()})"
    )
    for scheme, info in summary["schemes"].items():
        classes = ", ".join(f"{s} {n}" for s, n in info["classes"].items())
        print(f"  split {scheme}: {classes} classes; episodes: {', '.join(info['episode_files'])}")
    return summary

"""DVC stage ``prepare``: raw Omniglot (or a user's miniImageNet) into prepared arrays.

Thin on purpose: the logic lives in ``mamlops.prepare`` where it is tested. Run from the
repository root: ``python pipeline/prepare.py [omniglot|miniimagenet]`` (``dvc.yaml`` runs one
stage per entry of ``prepare.datasets``; without an argument every listed data set is prepared).
Params are checked before any work starts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from mamlops import params
from mamlops.prepare import DATASETS, prepare_config, prepare_miniimagenet, prepare_omniglot

RAW_OMNIGLOT = Path("data/raw/omniglot")
PREPARED = Path("data/prepared")


def _print(summary: dict[str, Any], seconds: float) -> None:
    classes = ", ".join(f"{s} {n}" for s, n in summary["classes"].items())
    print(
        f"{summary['dataset']}: {summary['out_dir']} images {summary['shape']} in {seconds:.1f} s; "
        f"split {summary['scheme']} (rotations {str(summary['rotations']).lower()}): {classes} "
        f"classes; episodes: {', '.join(summary['episode_files'])}"
    )


def main(argv: list[str] | None = None) -> int:
    """Validate ``prepare`` params, then prepare the named (or all listed) data sets."""
    argv = sys.argv[1:] if argv is None else argv
    all_params = params.load()
    try:
        cfg = prepare_config(all_params)
        data = params.section(all_params, "data")
        mini_dir = params.require(data, "miniimagenet_dir", (str, type(None)), "data")
        if len(argv) > 1 or (argv and argv[0] not in DATASETS):
            raise params.ParamsError(f"usage: prepare.py [{'|'.join(DATASETS)}], got {argv}")
        datasets = tuple(argv) or cfg.datasets
        if "miniimagenet" in datasets and not mini_dir:
            raise params.ParamsError(
                "params.yaml: data.miniimagenet_dir is empty but miniimagenet is to be prepared "
                "(prepare.datasets); point it at the images or drop miniimagenet"
            )
    except params.ParamsError as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 2
    try:
        for dataset in datasets:
            start = time.perf_counter()
            if dataset == "omniglot":
                summary = prepare_omniglot(RAW_OMNIGLOT, PREPARED / dataset, cfg)
            else:
                summary = prepare_miniimagenet(mini_dir, PREPARED / dataset, cfg)
            _print(summary, time.perf_counter() - start)
    except (FileNotFoundError, ValueError) as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

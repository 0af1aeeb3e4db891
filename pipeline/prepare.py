"""DVC stage ``prepare``: raw Omniglot (and a user's miniImageNet) into prepared arrays.

Thin on purpose: the logic lives in ``mamlops.prepare`` where it is tested. Run from the
repository root: ``python pipeline/prepare.py``. Params are checked before any work starts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from mamlops import params
from mamlops.prepare import prepare_config, prepare_miniimagenet, prepare_omniglot

RAW = Path("data/raw/omniglot")
OUT_OMNIGLOT = Path("data/prepared/omniglot")
OUT_MINIIMAGENET = Path("data/prepared/miniimagenet")


def _print(summary: dict[str, Any], seconds: float) -> None:
    classes = ", ".join(f"{s} {n}" for s, n in summary["classes"].items())
    print(
        f"{summary['dataset']}: {summary['out_dir']} images {summary['shape']} in {seconds:.1f} s; "
        f"split {summary['scheme']} (rotations {str(summary['rotations']).lower()}): {classes} "
        f"classes; episodes: {', '.join(summary['episode_files'])}"
    )


def main() -> int:
    """Validate ``prepare`` params, prepare Omniglot, then miniImageNet if configured."""
    all_params = params.load()
    try:
        cfg = prepare_config(all_params)
        data = params.section(all_params, "data")
        mini_dir = params.require(data, "miniimagenet_dir", (str, type(None)), "data")
    except params.ParamsError as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 2
    try:
        start = time.perf_counter()
        _print(prepare_omniglot(RAW, OUT_OMNIGLOT, cfg), time.perf_counter() - start)
        if mini_dir:
            start = time.perf_counter()
            summary = prepare_miniimagenet(mini_dir, OUT_MINIIMAGENET, cfg)
            _print(summary, time.perf_counter() - start)
        else:
            print("miniimagenet: not configured (data.miniimagenet_dir is empty); skipped")
    except (FileNotFoundError, ValueError) as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DVC stage ``download``: Omniglot into ``data/raw/omniglot``; check miniImageNet if supplied.

Thin on purpose: the logic lives in ``mamlops.download`` and ``mamlops.miniimagenet`` where it is
tested. Run from the repository root: ``python pipeline/download.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mamlops import miniimagenet, params
from mamlops.download import DataError, fetch_omniglot, resolve_mirror

DEST = Path("data/raw/omniglot")


def main() -> int:
    """Read ``data.mirror`` and ``data.miniimagenet_dir``, fetch, validate, print a summary."""
    data = params.section(params.load(), "data")
    mirror = resolve_mirror(params.require(data, "mirror", (str, type(None)), "data"))
    mini_dir = params.require(data, "miniimagenet_dir", (str, type(None)), "data")
    try:
        summary = fetch_omniglot(DEST, mirror)
        state = "kept (already verified)" if summary["skipped"] else "downloaded and verified"
        print(f"omniglot: {state} at {DEST} from {summary['source']}")
        for name, counts in summary["counts"].items():
            print(
                f"  {name}: {counts['characters']} characters, {counts['images']} images, "
                f"fingerprint {summary['fingerprints'][name][:16]}"
            )
        if mini_dir:
            report = miniimagenet.validate(Path(mini_dir))
            splits = ", ".join(
                f"{s} {v['classes']} classes/{v['images']} images"
                for s, v in report["splits"].items()
            )
            print(f"miniimagenet: {report['images_dir']} valid ({splits})")
        else:
            print("miniimagenet: not configured (data.miniimagenet_dir is empty); skipped")
    except DataError as exc:
        print(f"download: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

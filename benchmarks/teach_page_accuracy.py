"""Does drawing on the page lose accuracy against uploading the same images? Measured.

For each of ``--sets`` random 5-way tasks of characters the meta-model never saw (the test split
of the class split it was trained on, ``bench_teach.unseen_characters``), the teaching page
(in headless Chromium, ``scripts/webdriver.py``) is used twice on ``mamlops serve --meta``:
once uploading the scans (one support image per class, five held-out per class), once drawing
the same images with the pointer on the pads (``webdriver.image_strokes``) and pressing "Add
drawing", then drawing each held-out image on the test pad. The page's best labels are counted.

    .venv/bin/python benchmarks/teach_page_accuracy.py [--meta THETA] [--sets 2]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_teach import ROOT, unseen_characters

sys.path.insert(0, str(ROOT / "scripts"))
import webdriver  # noqa: E402
from teach_page import TeachPage  # noqa: E402

WAYS, HELD_OUT = 5, 5


def run_task(page: TeachPage, chars: list[list[bytes]], tmp: Path, draw: bool) -> int:
    """Teach one task on the page, by uploading or by drawing; held-out images right."""
    labels = [f"class {i}" for i in range(len(chars))]
    page.open()
    page.set_classes(labels)
    for i, pngs in enumerate(chars):
        if draw:
            pad = f".class-card:nth-child({i + 1}) canvas.draw"
            page.draw_shot(i, page.strokes(pngs[0], pad))
        else:
            (tmp / f"s{i}.png").write_bytes(pngs[0])
            page.upload(i, [tmp / f"s{i}.png"])
    page.teach()
    right = 0
    for i, pngs in enumerate(chars):
        for k, png in enumerate(pngs[1 : 1 + HELD_OUT]):
            if draw:
                got = page.draw_test(page.strokes(png, "#test-canvas"))
            else:
                path = tmp / f"q{i}-{k}.png"
                path.write_bytes(png)
                got = page.classify_files([path])[path.name]
            right += got == labels[i]
    return right


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--meta", type=Path, default=ROOT / "models/omniglot-5w1s/theta_best.safetensors"
    )
    ap.add_argument("--sets", type=int, default=2)
    args = ap.parse_args()
    if webdriver.missing():
        raise SystemExit(webdriver.missing())
    every = unseen_characters(args.meta)  # characters the meta-model never saw
    port = webdriver.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        serve = [sys.executable, "-m", "mamlops", "serve", "--meta", str(args.meta)]
        serve += ["--store", f"{tmp}/store", "--port", str(port)]
        url = f"http://127.0.0.1:{port}"
        with webdriver.process(serve, f"{url}/health", 60, stderr=subprocess.DEVNULL):
            with webdriver.browser(1280, 900) as web:
                page = TeachPage(web, f"{url}/")
                for s in range(args.sets):
                    chars = [every[c] for c in random.Random(s).sample(range(len(every)), WAYS)]
                    uploaded = run_task(page, chars, Path(tmp), draw=False)
                    drawn = run_task(page, chars, Path(tmp), draw=True)
                    n = WAYS * HELD_OUT
                    print(f"set {s}: uploaded {uploaded}/{n}, drawn on the pads {drawn}/{n}")


if __name__ == "__main__":
    main()

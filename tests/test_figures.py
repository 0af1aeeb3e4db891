"""The episode grid (torchvision): its layout, exact image pixels, red frames, same bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

from mamlops.data.episodes import Tasks
from mamlops.data.preprocess import to_float
from mamlops.meta import figures
from mamlops.meta.figures import (
    GRID_FRAME,
    GRID_HEADER_H,
    GRID_LABEL_H,
    GRID_LINE_H,
    GRID_PAD,
    episode_grid,
)

WAYS, SHOTS, PER_CLASS = 5, 1, 3
WHITE = (255, 255, 255)


def _tasks(
    dataset: str, side: int, n: int = 3, seed: int = 0
) -> tuple[Tasks, np.ndarray, np.ndarray]:
    """Random uint8 images (as prepared data stores them) turned into network input like the
    task sampler does; returns the tasks and the uint8 support/query images."""
    rng = np.random.default_rng(seed)
    shape = (side, side, 3) if dataset == "miniimagenet" else (side, side)
    us = rng.integers(0, 256, size=(n, WAYS * SHOTS, *shape), dtype=np.uint8)
    uq = rng.integers(0, 256, size=(n, WAYS * PER_CLASS, *shape), dtype=np.uint8)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).expand(n, -1)
    yq = torch.arange(WAYS).repeat_interleave(PER_CLASS).expand(n, -1)
    tasks = Tasks(to_float(us, dataset), ys.clone(), to_float(uq, dataset), yq.clone())
    return tasks, us, uq


def _rgb(u: np.ndarray, scale: int) -> np.ndarray:
    """What the grid must show for one uint8 image: itself (grey as RGB), upscaled by repeats."""
    rgb = u if u.ndim == 3 else np.repeat(u[..., None], 3, axis=-1)
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1)


@pytest.mark.parametrize(("dataset", "side"), [("omniglot", 28), ("miniimagenet", 20)])
def test_episode_grid_layout_pixels_and_frames(dataset: str, side: int, tmp_path) -> None:
    tasks, us, uq = _tasks(dataset, side)
    preds = tasks.yq.clone()
    preds[0, PER_CLASS] = 3  # episode 1: class 1's first query (2nd in the first query row)
    preds[2, 0] = 4  # episode 3 is not drawn
    out = episode_grid(tasks, preds, tmp_path / "grid.png", episodes=2, cols=10, title="t")

    scale = -(-96 // side)  # at least 96 pixels a side, integer factor
    s = side * scale
    cols, support_rows, query_rows = 5, 1, 2  # cols = min(10, max(WAYS, 5))
    cell_h, step_x, step_y = GRID_LABEL_H + s, s + GRID_PAD, GRID_LABEL_H + s + GRID_PAD
    title_h = 2 * GRID_LINE_H + GRID_PAD  # the title line and the "5-way 1-shot ..." line
    episode_h = GRID_HEADER_H + (support_rows + query_rows) * step_y + GRID_PAD
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (cols * step_x + GRID_PAD, title_h + 2 * episode_h)  # 2 of 3 drawn
        px = np.asarray(im)

    def cell(e: int, k: int) -> tuple[int, int]:  # top-left of cell k (row-major) in episode e
        y = title_h + e * episode_h + GRID_HEADER_H + GRID_PAD + (k // cols) * step_y
        return GRID_PAD + (k % cols) * step_x, y

    def image_at(e: int, k: int) -> np.ndarray:
        x, y = cell(e, k)
        return px[y + GRID_LABEL_H : y + cell_h, x : x + s]

    def label_at(e: int, k: int) -> np.ndarray:
        x, y = cell(e, k)
        return px[y : y + GRID_LABEL_H, x : x + s].reshape(-1, 3)

    picks = [c * PER_CLASS + r for r in range(query_rows) for c in range(WAYS)]
    for e in range(2):
        for c in range(WAYS):  # support row: one image per class, pixel for pixel
            np.testing.assert_array_equal(image_at(e, c), _rgb(us[e, c * SHOTS], scale))
            assert (label_at(e, c).max(axis=1) < 100).any()  # "class c" in black
        for i, q in enumerate(picks):  # query rows, class-major picks; frames never cover them
            np.testing.assert_array_equal(image_at(e, cols + i), _rgb(uq[e, q], scale))

    red, green = ImageColor.getrgb(figures.WRONG), ImageColor.getrgb(figures.RIGHT)
    ring = [-(GRID_FRAME + 1), -2, s + 1, s + GRID_FRAME]  # frame columns around a cell
    for e, k, wrong in ((0, cols + 1, True), (0, cols, False), (1, cols + 1, False)):
        x, y = cell(e, k)
        mid = y + cell_h // 2
        edge = [tuple(px[mid, x + dx]) for dx in ring]
        assert edge == ([red] * 4 if wrong else [WHITE] * 4), (e, k)
        assert tuple(px[mid, x - 1]) == WHITE and tuple(px[mid, x + s]) == WHITE  # 1-pixel gap
        label = label_at(e, k)
        hue = red if wrong else green
        assert (np.abs(label.astype(int) - hue).sum(axis=1) < 60).any(), (e, k, wrong)


def test_episode_grid_same_bytes_atomic_and_checks(tmp_path) -> None:
    tasks, _, _ = _tasks("omniglot", 28, n=2, seed=1)
    preds = tasks.yq.clone()
    preds[1, 4] = 0
    a = episode_grid(tasks, preds, tmp_path / "a.png", episodes=5).read_bytes()
    b = episode_grid(tasks, preds, tmp_path / "b.png", episodes=5).read_bytes()
    assert a == b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temp files left
    other = preds.clone()
    other[0, 0] = 2  # one more wrong prediction must show
    assert episode_grid(tasks, other, tmp_path / "c.png").read_bytes() != a
    with pytest.raises(ValueError, match="no episodes"):
        episode_grid(tasks, preds, tmp_path / "d.png", episodes=0)
    assert not (tmp_path / "d.png").exists()

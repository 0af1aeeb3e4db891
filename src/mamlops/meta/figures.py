"""Pictures and plot data of an evaluation: a grid of test episodes, accuracy vs inner steps.

The episode grid is for a human to check that the numbers mean what they seem to: which
characters the support set held, what the adapted model said for query images, and where it was
wrong (red). It is an image mosaic, so torchvision draws it: ``make_grid`` tiles the cells,
``draw_bounding_boxes`` writes the labels and frames the wrong cells (Pillow encodes the PNG);
every image pixel in the PNG is an input pixel (nearest upscaling, no resampling) and the
same inputs give the same bytes. The training curves are plots, drawn with matplotlib's object
API (``Figure``, not ``pyplot``), which renders straight to PNG: no backend, no display and no
process-wide state to set.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from mamlops.data.episodes import Tasks
from mamlops.files import atomic_write

WRONG = "#d62728"
RIGHT = "#2ca02c"
TEXT = "black"
STEPS_COLUMNS = ("step", "acc_transductive", "acc_support")

# Episode grid layout, in pixels. A cell is a label strip over the image, upscaled by an integer
# factor to at least GRID_MIN_SIDE; cells are GRID_PAD apart, and the frame of a wrong cell
# (GRID_FRAME wide) lies in that gap, one pixel off the cell, so it never covers the image.
GRID_MIN_SIDE = 96
GRID_PAD = 8
GRID_FRAME = 2
GRID_LABEL_H = 14  # torchvision labels use Pillow's default font, 10 px
GRID_HEADER_H = 24  # "Episode e: k/n query images correct"
GRID_LINE_H = 14  # per line of the figure title
_WHITE = 255


def grid_scale(side: int) -> int:
    """The integer upscaling of a ``side``-pixel image in the episode grid (28 -> 4, 84 -> 2)."""
    return max(1, -(-GRID_MIN_SIDE // side))


def _display(x: Tensor, scale: int) -> Tensor:
    """A [C, H, W] float network input as a [3, H*scale, W*scale] uint8 picture: one channel is
    Omniglot's ``1 - x/255`` (ink = 1, drawn dark again), three channels are RGB in [0, 1]."""
    x = x.detach().cpu().float()
    if x.shape[0] == 1:
        x = (1 - x).expand(3, -1, -1)
    img = x.clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def _query_picks(ways: int, per_class: int, count: int) -> list[int]:
    """Indices of ``count`` query images spread over classes (queries are class-major)."""
    picks = [c * per_class + r for r in range(per_class) for c in range(ways)]
    return picks[:count]


def episode_grid(
    tasks: Tasks,
    preds: Tensor,
    path: str | Path,
    *,
    episodes: int = 3,
    cols: int = 10,
    query_rows: int = 2,
    title: str = "",
) -> Path:
    """Save a PNG: per episode a header line, one support image per class ("class c"), then
    query images labelled "pred p / true t", wrong ones framed and labelled in red.

    ``preds`` [T, Q] are predicted query labels (``evaluate.predict_tasks``). Returns ``path``.
    The layout, for tests and readers: ``cols`` cells per row (at most ``max(ways, 5)``); a cell
    is ``GRID_LABEL_H`` + s pixels high and s wide, s = side * ``grid_scale(side)``; the PNG is
    ``cols * (s + GRID_PAD) + GRID_PAD`` wide, and a title strip (``GRID_LINE_H`` per line +
    ``GRID_PAD``) sits above the episodes, each a ``GRID_HEADER_H`` header over
    ``support_rows + query_rows`` rows of cells, ``s + GRID_LABEL_H + GRID_PAD`` apart.
    """
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, make_grid  # lazy: train imports figures

    n_eps = min(episodes, len(tasks))
    if n_eps < 1:
        raise ValueError("no episodes to draw")
    ways = int(tasks.yq[0].max()) + 1
    shots = tasks.xs.shape[1] // ways
    per_class = tasks.xq.shape[1] // ways
    cols = max(1, min(cols, max(ways, 5)))
    support_rows = -(-ways // cols)
    side = tasks.xs.shape[-1]
    scale = grid_scale(side)
    s = side * scale
    cell_h, step_x, step_y = GRID_LABEL_H + s, s + GRID_PAD, GRID_LABEL_H + s + GRID_PAD
    width = cols * step_x + GRID_PAD
    preds = preds.detach().cpu()
    labels = tasks.yq.detach().cpu()
    blank = torch.full((3, cell_h, s), _WHITE, dtype=torch.uint8)

    def cell(x: Tensor) -> Tensor:  # the image under a white label strip
        out = blank.clone()
        out[:, GRID_LABEL_H:] = _display(x, scale)
        return out

    heading = f"{ways}-way {shots}-shot; class rows: one support image each; red: wrong"
    head = f"{title}\n{heading}" if title else heading
    title_h = GRID_LINE_H * (head.count("\n") + 1) + GRID_PAD
    parts = [torch.full((3, title_h, width), _WHITE, dtype=torch.uint8)]
    # (box, label, colour): text-only boxes, and framed boxes of wrong cells
    texts: list[tuple[list[int], str, str]] = [([GRID_PAD - 1, 3, width, title_h], head, TEXT)]
    frames: list[tuple[list[int], str, str]] = []
    top = title_h
    picks = _query_picks(ways, per_class, cols * query_rows)
    for e in range(n_eps):
        wrong = int((preds[e] != labels[e]).sum())
        total = labels.shape[1]
        header = f"Episode {e + 1}: {total - wrong}/{total} query images correct"
        texts.append(([GRID_PAD - 1, top + 8, width, top + GRID_HEADER_H], header, TEXT))
        parts.append(torch.full((3, GRID_HEADER_H, width), _WHITE, dtype=torch.uint8))
        top += GRID_HEADER_H
        cells = [cell(tasks.xs[e, c * shots]) for c in range(ways)]
        cells += [blank] * (support_rows * cols - ways)
        cells += [cell(tasks.xq[e, q]) for q in picks]
        cells += [blank] * (query_rows * cols - len(picks))
        parts.append(make_grid(torch.stack(cells), nrow=cols, padding=GRID_PAD, pad_value=_WHITE))

        boxes = []  # each cell's box, one pixel around it: a label lands at the cell's corner
        for k in range(len(cells)):
            x, y = GRID_PAD + (k % cols) * step_x, top + GRID_PAD + (k // cols) * step_y
            boxes.append([x - 1, y - 1, x + s, y + cell_h])
        texts += [(boxes[c], f"class {c}", TEXT) for c in range(ways)]
        d = GRID_FRAME  # a frame box GRID_FRAME wider on each side: its label lands at (x0, y0)
        for i, q in enumerate(picks):
            box = boxes[support_rows * cols + i]
            p, t = int(preds[e, q]), int(labels[e, q])
            text = f"pred {p} / true {t}"
            if p == t:
                texts.append((box, text, RIGHT))
            else:
                frames.append(([box[0] - d, box[1] - d, box[2] + d, box[3] + d], text, WRONG))
        top += parts[-1].shape[1]
    canvas = torch.cat(parts, dim=1)
    for items, frame_width in ((texts, 0), (frames, GRID_FRAME)):
        if items:  # width 0: PIL draws no outline, only the label
            where, words, colors = zip(*items, strict=True)
            canvas = draw_bounding_boxes(
                canvas,
                torch.tensor(where),
                labels=list(words),
                colors=list(colors),
                width=frame_width,
            )
    # Pillow writes the PNG: torchvision.io's encoder is deprecated since 0.29 (for TorchCodec)
    # and save_image wants floats; Pillow's PNG has no timestamp, so same pixels, same bytes.
    picture = Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy())
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def steps_rows(result: dict[str, Any]) -> list[dict[str, float]]:
    """Accuracy after 0..steps inner steps for both BN protocols (from ``evaluate_setting``)."""
    trans = result["transductive"]["curve"]
    supp = result["support"]["curve"]
    return [
        {"step": s, "acc_transductive": float(a), "acc_support": float(b)}
        for s, (a, b) in enumerate(zip(trans, supp, strict=True))
    ]


def write_steps_csv(rows: list[dict[str, float]], path: str | Path) -> Path:
    """CSV ``step,acc_transductive,acc_support`` for ``dvc plots`` (written atomically)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=STEPS_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow(
                    {k: (int(v) if k == "step" else f"{v:.6f}") for k, v in row.items()}
                )

    return atomic_write(path, write)


def training_curves(history: list[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """PNG of meta-training: query loss, and train/val accuracy per iteration (for MLflow, where
    DVC's own plots of the TSV are not at hand)."""
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, ax, label in (
        ("loss", ax_loss, "meta-train query loss"),
        ("train_acc", ax_acc, "meta-train query accuracy"),
        ("val_acc", ax_acc, "validation accuracy"),
    ):
        pts = [(r["step"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if key == "val_acc" else None, ms=3, label=label)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    ax_acc.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))

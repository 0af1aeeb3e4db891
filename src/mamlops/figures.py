"""Pictures and plot data of an evaluation: a grid of test episodes, accuracy vs inner steps.

The episode grid is for a human to check that the numbers mean what they seem to: which
characters the support set held, what the adapted model said for query images, and where it was
wrong (red). Figures are built with matplotlib's object API (``Figure``, not ``pyplot``), which
renders straight to PNG: no backend, no display and no process-wide state to set.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from torch import Tensor

from mamlops.episodes import Tasks
from mamlops.files import atomic_write

WRONG = "#d62728"
RIGHT = "#2ca02c"
STEPS_COLUMNS = ("step", "acc_transductive", "acc_support")


def _image(x: Tensor) -> tuple[Any, str | None]:
    """A [C, H, W] float image as something ``imshow`` draws, with its colour map."""
    x = x.detach().cpu().float()
    if x.shape[0] == 1:
        return x[0].numpy(), "gray_r"  # Omniglot input is 1 - x/255: ink = 1, drawn dark
    return x.permute(1, 2, 0).clamp(0, 1).numpy(), None


def _query_picks(ways: int, per_class: int, count: int) -> list[int]:
    """Indices of ``count`` query images spread over classes (queries are class-major)."""
    picks = [c * per_class + r for r in range(per_class) for c in range(ways)]
    return picks[:count]


def _frame(ax: Any, color: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(color is not None)
        if color is not None:
            spine.set_color(color)
            spine.set_linewidth(2.5)


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
    """Save a PNG: per episode one support image per class, then query images with predicted /
    true label, wrong ones framed and labelled in red.

    ``preds`` [T, Q] are predicted query labels (``evaluate.predict_tasks``). Returns ``path``.
    """
    n_eps = min(episodes, len(tasks))
    if n_eps < 1:
        raise ValueError("no episodes to draw")
    ways = int(tasks.yq[0].max()) + 1
    shots = tasks.xs.shape[1] // ways
    per_class = tasks.xq.shape[1] // ways
    cols = max(1, min(cols, max(ways, 5)))
    support_rows = -(-ways // cols)
    rows_per_ep = 1 + support_rows + query_rows  # header row, support rows, query rows
    fig = Figure(figsize=(1.15 * cols, 1.25 * n_eps * rows_per_ep))
    axes = fig.subplots(
        n_eps * rows_per_ep,
        cols,
        squeeze=False,
        gridspec_kw={"height_ratios": ([0.25] + [1.0] * (rows_per_ep - 1)) * n_eps},
    )
    for ax in axes.flat:
        ax.axis("off")
    for e in range(n_eps):
        top = e * rows_per_ep
        picks = _query_picks(ways, per_class, cols * query_rows)
        wrong = int((preds[e] != tasks.yq[e]).sum())
        total = tasks.yq.shape[1]
        header = axes[top, 0]
        header.text(
            0.0,
            0.2,
            f"Episode {e + 1}: {total - wrong}/{total} query images correct",
            fontsize=9,
            fontweight="bold",
            transform=header.transAxes,
        )
        for c in range(ways):
            ax = axes[top + 1 + c // cols, c % cols]
            ax.axis("on")
            img, cmap = _image(tasks.xs[e, c * shots])
            ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
            _frame(ax, None)
            ax.set_title(f"class {c}", fontsize=8)
        for i, q in enumerate(picks):
            ax = axes[top + 1 + support_rows + i // cols, i % cols]
            ax.axis("on")
            img, cmap = _image(tasks.xq[e, q])
            ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
            p, t = int(preds[e, q]), int(tasks.yq[e, q])
            color = RIGHT if p == t else WRONG
            _frame(ax, color if p != t else None)
            ax.set_title(f"pred {p} / true {t}", fontsize=7, color=color)
    heading = f"{ways}-way {shots}-shot; class rows: one support image each; red: wrong"
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=9)
    fig.subplots_adjust(
        left=0.02,
        right=0.98,
        bottom=0.01,
        top=1 - 0.75 / fig.get_figheight(),
        hspace=0.45,
        wspace=0.1,
    )
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


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

"""Tasks for meta-learning: fixed evaluation episodes on disk and a fast in-memory sampler.

Evaluation uses fixed, seeded episode files so that every model, run and machine is scored on the
same 600 test tasks; comparing numbers from different random tasks would add noise to every
comparison. Each (split, setting) has its own seed stream, so adding a setting leaves the others'
files unchanged.

Training draws fresh tasks every iteration. MAML spends little compute per task, so the sampler
must not become the bottleneck: it keeps one split as a ``uint8`` tensor (rotations materialised)
and builds a whole meta-batch with a few tensor ops; no per-image Python, no DataLoader.

Episode file ``episodes/<split>_<N>w<K>s.npz``: int64 arrays ``classes`` [E, N] (class ids as in
``splits.json``), ``support`` [E, N, K] and ``query`` [E, N, Q] (image indices within the class,
disjoint). In a task, label ``j`` is the ``j``-th class of its row; rows are drawn in random
order, so labels are a random assignment. Examples are grouped by class (class-major).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mamlops import datasets
from mamlops.errors import DataError
from mamlops.preprocess import to_float
from mamlops.splits import decode_class, read_splits

EPISODE_DIR = "episodes"
IMAGES_FILE = "images.npy"


def setting_name(ways: int, shots: int) -> str:
    """``5w1s`` for 5-way 1-shot: the suffix of the episode files."""
    return f"{ways}w{shots}s"


def episode_path(prepared_dir: str | Path, split: str, ways: int, shots: int) -> Path:
    """Where the fixed episodes of one split and setting live."""
    return Path(prepared_dir) / EPISODE_DIR / f"{split}_{setting_name(ways, shots)}.npz"


def episode_rng(seed: int, split: str, ways: int, shots: int) -> np.random.Generator:
    """A generator for one (split, setting) only: a stable hash of the names joins the seed."""
    key = zlib.crc32(f"{split}:{setting_name(ways, shots)}".encode())
    return np.random.default_rng([seed, key])


def make_episodes(
    class_ids: Sequence[int],
    images_per_class: int,
    ways: int,
    shots: int,
    query: int,
    count: int,
    seed: int,
    split: str,
) -> dict[str, np.ndarray]:
    """``count`` episodes over ``class_ids``: N distinct classes, disjoint support and query."""
    check_task_shape(len(class_ids), images_per_class, ways, shots, query)
    rng = episode_rng(seed, split, ways, shots)
    ids = np.asarray(class_ids, dtype=np.int64)
    picks = np.stack([rng.choice(len(ids), size=ways, replace=False) for _ in range(count)])
    order = rng.random((count, ways, images_per_class)).argsort(axis=-1)
    return {
        "classes": ids[picks],
        "support": order[..., :shots].astype(np.int64),
        "query": order[..., shots : shots + query].astype(np.int64),
    }


def write_episode_files(
    prepared_dir: str | Path,
    splits: dict,
    images_per_class: int,
    settings: Sequence[tuple[int, int]],
    query: int,
    counts: dict[str, int],
    seed: int,
) -> list[Path]:
    """Write one ``.npz`` per (split, setting); ``counts`` maps split name to episode count."""
    paths = []
    for split, count in counts.items():
        for ways, shots in settings:
            arrays = make_episodes(
                splits[split], images_per_class, ways, shots, query, count, seed, split
            )
            path = episode_path(prepared_dir, split, ways, shots)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **arrays)
            paths.append(path)
    return paths


@dataclass(frozen=True)
class Episodes:
    """Fixed episodes of one split and setting; ``rows`` index the split's bank (``load_bank``)."""

    split: str
    ways: int
    shots: int
    classes: np.ndarray  # [E, N] class ids
    rows: np.ndarray  # [E, N] rows of load_bank(prepared_dir, split)
    support: np.ndarray  # [E, N, K]
    query: np.ndarray  # [E, N, Q]

    def __len__(self) -> int:
        return len(self.classes)


def load_episodes(prepared_dir: str | Path, split: str, ways: int, shots: int) -> Episodes:
    """Read a fixed episode file and map its class ids to rows of the split's bank."""
    path = episode_path(prepared_dir, split, ways, shots)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: add {{ways: {ways}, shots: {shots}}} to "
            "prepare.episodes.settings and rerun the prepare stage"
        )
    with np.load(path) as f:
        classes, support, query = f["classes"], f["support"], f["query"]
    ids = np.asarray(read_splits(prepared_dir)[split], dtype=np.int64)  # sorted when written
    rows = np.searchsorted(ids, classes)
    if not np.array_equal(ids[np.minimum(rows, len(ids) - 1)], classes):
        raise DataError(f"{path}: classes not in the {split} split of splits.json; re-prepare")
    return Episodes(split, ways, shots, classes, rows, support, query)


def bank_dataset(bank: torch.Tensor) -> str:
    """The data set of a bank, by its channels: grayscale banks are ``[C, M, H, W]`` (Omniglot),
    colour ones ``[C, M, H, W, 3]`` (miniImageNet)."""
    channels = 1 if bank.ndim == 4 else bank.shape[-1]
    return next(d.name for d in datasets.DATASETS.values() if d.channels == channels)


def load_bank(prepared_dir: str | Path, split: str) -> torch.Tensor:
    """All images of one split as ``uint8`` ``[C, M, H, W]`` (or ``[C, M, H, W, 3]``).

    Row ``i`` is the ``i``-th class id of ``splits.json[split]``; rotated classes are rotated
    here once, so sampling is pure indexing.
    """
    prepared_dir = Path(prepared_dir)
    splits = read_splits(prepared_dir)
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; expected train, val or test")
    ids = np.asarray(splits[split], dtype=np.int64)
    items, ks = decode_class(ids, bool(splits["rotations"]))
    images = np.load(prepared_dir / IMAGES_FILE, mmap_mode="r")
    bank = torch.from_numpy(np.ascontiguousarray(images[items]))
    ks_t = torch.from_numpy(np.asarray(ks))
    for k in range(1, 4):
        mask = ks_t == k
        if mask.any():  # counter-clockwise, as np.rot90(img, k)
            bank[mask] = torch.rot90(bank[mask], k, dims=(2, 3))
    return bank


@dataclass
class Tasks:
    """A batch of T tasks: support ``xs``/``ys`` and query ``xq``/``yq``; labels 0..N-1."""

    xs: torch.Tensor  # [T, N*K, C, H, W] float32
    ys: torch.Tensor  # [T, N*K] int64
    xq: torch.Tensor  # [T, N*Q, C, H, W] float32
    yq: torch.Tensor  # [T, N*Q] int64

    def __len__(self) -> int:
        return self.xs.shape[0]

    def to(self, device: torch.device | str) -> Tasks:
        """The same tasks on another device."""
        return Tasks(
            *(t.to(device, non_blocking=True) for t in (self.xs, self.ys, self.xq, self.yq))
        )


def check_task_shape(n_classes: int, n_images: int, ways: int, shots: int, query: int) -> None:
    """Fail early and clearly on task shapes that cannot be drawn."""
    for name, value in (("ways", ways), ("shots", shots), ("query", query)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if ways > n_classes:
        raise DataError(f"{ways}-way tasks need {ways} classes, the split has {n_classes}")
    if shots + query > n_images:
        raise DataError(
            f"shots + query = {shots + query} images per class, only {n_images} per class exist"
        )


def gather_tasks(
    bank: torch.Tensor, rows: torch.Tensor, images: torch.Tensor, shots: int, dataset: str
) -> Tasks:
    """Build tasks from class rows ``[T, N]`` and image indices ``[T, N, K+Q]`` (support first)."""
    t, n, kq = images.shape
    q = kq - shots
    rows = rows.to(bank.device)[:, :, None]
    images = images.to(bank.device)

    def take(idx: torch.Tensor, per_class: int) -> torch.Tensor:
        # gathering support and query separately keeps both contiguous: no copy on reshape
        x = bank[rows.expand(t, n, per_class), idx]  # [T, N, per_class, H, W(, 3)]
        return to_float(x.reshape(t, n * per_class, *bank.shape[2:]), dataset)

    labels = torch.arange(n, device=bank.device)
    return Tasks(
        xs=take(images[..., :shots], shots),
        ys=labels.repeat_interleave(shots).expand(t, -1).contiguous(),
        xq=take(images[..., shots:], q),
        yq=labels.repeat_interleave(q).expand(t, -1).contiguous(),
    )


class TaskSampler:
    """Random N-way K-shot tasks from a bank (``load_bank``), reproducible for a seed."""

    def __init__(
        self,
        bank: torch.Tensor,
        ways: int,
        shots: int,
        query: int,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        check_task_shape(bank.shape[0], bank.shape[1], ways, shots, query)
        self.bank, self.ways, self.shots, self.query = bank, ways, shots, query
        self.dataset = bank_dataset(bank)
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        self.generator = generator

    def sample(self, n_tasks: int, part: slice | None = None) -> Tasks:
        """``n_tasks`` tasks; classes without repeats within a task, in random label order.

        ``part`` keeps only those tasks (a process's shard under torchrun): the random numbers
        of all ``n_tasks`` are still drawn, so the generator, and the tasks of every shard, are
        the same whatever the number of processes.
        """
        g = self.generator
        n_classes, n_images = self.bank.shape[:2]
        # top-k of uniform noise = N distinct classes in random order (random label assignment)
        # drawn on the generator's device: a CUDA generator keeps sampling on the GPU, with no
        # host-to-device copy (and so no sync) per iteration
        rows = torch.rand(n_tasks, n_classes, generator=g, device=g.device)
        rows = rows.topk(self.ways, dim=1).indices
        noise = torch.rand(n_tasks, self.ways, n_images, generator=g, device=g.device)
        images = noise.argsort(dim=-1)[..., : self.shots + self.query]
        if part is not None:
            rows, images = rows[part], images[part]
        return gather_tasks(self.bank, rows, images, self.shots, self.dataset)


def episode_tasks(
    bank_or_prepared: torch.Tensor | str | Path, episodes: Episodes, start: int, stop: int
) -> Tasks:
    """Episodes ``start:stop`` as one ``Tasks`` batch. Pass the bank when calling repeatedly
    (a prepared-folder path reloads the split every call)."""
    bank = bank_or_prepared
    if not isinstance(bank, torch.Tensor):
        bank = load_bank(bank, episodes.split)
    sl = slice(start, stop)
    rows = torch.from_numpy(episodes.rows[sl])
    images = torch.from_numpy(np.concatenate([episodes.support[sl], episodes.query[sl]], axis=-1))
    return gather_tasks(bank, rows, images, episodes.shots, bank_dataset(bank))

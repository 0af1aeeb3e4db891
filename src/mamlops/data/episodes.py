"""Tasks for meta-learning: fixed evaluation episodes on disk and a fast in-memory sampler.

Evaluation uses fixed, seeded episode files so that every model, run and machine is scored on the
same 600 test tasks; comparing numbers from different random tasks would add noise to every
comparison. Each (split, setting) has its own seed stream, so adding a setting leaves the others'
files unchanged.

Training draws fresh tasks every iteration. MAML spends little compute per task, so the sampler
must not become the bottleneck: it keeps one split as a ``uint8`` tensor (rotations materialised)
and builds a whole meta-batch with a few tensor ops; no per-image Python, no DataLoader.

Episode file ``episodes/<scheme>/<split>_<N>w<K>s.npz``: int64 arrays ``classes`` [E, N] (class
ids as in ``splits/<scheme>.json``), ``support`` [E, N, K] and ``query`` [E, N, Q] (image
indices within the class, disjoint). In a task, label ``j`` is the ``j``-th class of its row;
rows are drawn in random order, so labels are a random assignment. Examples are grouped by class
(class-major). ``<split>_alphabet_<N>w<K>s.npz`` (Omniglot): the same, but the N classes of an
episode are upright characters of one alphabet, drawn among the alphabets of the split that
have at least N characters.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mamlops import datasets
from mamlops.data.augment import affine_augment
from mamlops.data.preprocess import to_float
from mamlops.data.splits import decode_class, prepared_dataset, read_splits, resolve_scheme
from mamlops.datasets.common import N_ROTATIONS
from mamlops.errors import DataError

EPISODE_DIR = "episodes"
IMAGES_FILE = "images.npy"
ALPHABET = "alphabet"  # the kind of the within-alphabet episode files


def setting_name(ways: int, shots: int) -> str:
    """``5w1s`` for 5-way 1-shot: the suffix of the episode files."""
    return f"{ways}w{shots}s"


def episode_path(
    prepared_dir: str | Path,
    split: str,
    ways: int,
    shots: int,
    scheme: str | None = None,
    *,
    alphabet: bool = False,
) -> Path:
    """Where the fixed episodes of one split and setting live (``alphabet``: the
    within-alphabet ones); ``scheme`` None is the folder's default split scheme."""
    scheme = resolve_scheme(prepared_dir, scheme)
    kind = f"{split}_{ALPHABET}" if alphabet else split
    return Path(prepared_dir) / EPISODE_DIR / scheme / f"{kind}_{setting_name(ways, shots)}.npz"


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
    *,
    group: int = 1,
) -> dict[str, np.ndarray]:
    """``count`` episodes over ``class_ids``: N distinct classes, disjoint support and query.

    ``group`` > 1: the (sorted) ids come in groups of that many rotations of one character, and
    an episode takes N distinct characters, each at a random one of its rotations.
    """
    check_task_shape(len(class_ids) // group, images_per_class, ways, shots, query)
    rng = episode_rng(seed, split, ways, shots)
    ids = np.asarray(class_ids, dtype=np.int64)
    n = len(ids) // group
    picks = np.stack([rng.choice(n, size=ways, replace=False) for _ in range(count)])
    if group > 1:
        picks = picks * group + rng.integers(group, size=picks.shape)
    order = rng.random((count, ways, images_per_class)).argsort(axis=-1)
    return {
        "classes": ids[picks],
        "support": order[..., :shots].astype(np.int64),
        "query": order[..., shots : shots + query].astype(np.int64),
    }


def alphabet_members(
    class_ids: Sequence[int], alphabets: Sequence[str], rotations: bool
) -> dict[str, list[int]]:
    """The upright classes of ``class_ids`` by alphabet (``alphabets[char_id]``), sorted."""
    members: dict[str, list[int]] = {}
    for cid in sorted(int(c) for c in class_ids):
        char, k = decode_class(cid, rotations)
        if int(k) == 0:
            members.setdefault(alphabets[int(char)], []).append(cid)
    return dict(sorted(members.items()))


def make_alphabet_episodes(
    members: dict[str, list[int]],
    images_per_class: int,
    ways: int,
    shots: int,
    query: int,
    count: int,
    seed: int,
    split: str,
) -> dict[str, np.ndarray] | None:
    """``count`` episodes whose N classes are characters of one alphabet (uniform over the
    alphabets with at least N characters, then N of its characters); None when no alphabet
    has N characters."""
    eligible = [a for a, ids in members.items() if len(ids) >= ways]
    if not eligible:
        return None
    check_task_shape(len(members[eligible[0]]), images_per_class, ways, shots, query)
    rng = episode_rng(seed, f"{split}:{ALPHABET}", ways, shots)
    classes = np.empty((count, ways), dtype=np.int64)
    for e in range(count):
        ids = members[eligible[rng.integers(len(eligible))]]
        classes[e] = np.asarray(ids, dtype=np.int64)[rng.choice(len(ids), ways, replace=False)]
    order = rng.random((count, ways, images_per_class)).argsort(axis=-1)
    return {
        "classes": classes,
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
    alphabets: Sequence[str] | None = None,
) -> list[Path]:
    """Write one ``.npz`` per (split, setting) of the scheme ``splits`` describes into
    ``episodes/<scheme>/``; ``counts`` maps split name to episode count. With ``alphabets``
    (the alphabet of each character), also the within-alphabet episodes."""
    out = Path(prepared_dir) / EPISODE_DIR / splits["scheme"]
    out.mkdir(parents=True, exist_ok=True)
    rotations = bool(splits["rotations"])
    group = N_ROTATIONS if splits.get("distinct_characters") and rotations else 1
    paths = []
    for split, count in counts.items():
        members = alphabet_members(splits[split], alphabets, rotations) if alphabets else None
        for ways, shots in settings:
            name = setting_name(ways, shots)
            arrays = make_episodes(
                splits[split], images_per_class, ways, shots, query, count, seed, split, group=group
            )
            paths.append(out / f"{split}_{name}.npz")
            np.savez(paths[-1], **arrays)
            if members is None:
                continue
            arrays = make_alphabet_episodes(
                members, images_per_class, ways, shots, query, count, seed, split
            )
            if arrays is not None:
                paths.append(out / f"{split}_{ALPHABET}_{name}.npz")
                np.savez(paths[-1], **arrays)
    return paths


@dataclass(frozen=True)
class Episodes:
    """Fixed episodes of one split and setting; ``rows`` index the split's bank (``load_bank``)."""

    split: str
    ways: int
    shots: int
    classes: np.ndarray  # [E, N] class ids
    rows: np.ndarray  # [E, N] rows of load_bank(prepared_dir, split, scheme)
    support: np.ndarray  # [E, N, K]
    query: np.ndarray  # [E, N, Q]
    dataset: str  # the prepared folder's (meta.json): how its images scale to floats
    scheme: str | None = None

    def __len__(self) -> int:
        return len(self.classes)


def load_episodes(
    prepared_dir: str | Path,
    split: str,
    ways: int,
    shots: int,
    scheme: str | None = None,
    *,
    alphabet: bool = False,
) -> Episodes:
    """Read a fixed episode file and map its class ids to rows of the split's bank."""
    scheme = resolve_scheme(prepared_dir, scheme)
    path = episode_path(prepared_dir, split, ways, shots, scheme, alphabet=alphabet)
    if not path.is_file():
        if alphabet:
            raise FileNotFoundError(
                f"{path} not found: no {split} alphabet of split {scheme} has {ways} characters"
                " (or the data set has no alphabets)"
            )
        raise FileNotFoundError(
            f"{path} not found: add {{ways: {ways}, shots: {shots}}} to "
            "prepare.episodes.settings and rerun the prepare stage"
        )
    with np.load(path) as f:
        classes, support, query = f["classes"], f["support"], f["query"]
    ids = np.asarray(read_splits(prepared_dir, scheme)[split], dtype=np.int64)  # sorted
    rows = np.searchsorted(ids, classes)
    if not np.array_equal(ids[np.minimum(rows, len(ids) - 1)], classes):
        raise DataError(f"{path}: classes not in the {split} split of {scheme}; re-prepare")
    dataset = prepared_dataset(prepared_dir)
    return Episodes(split, ways, shots, classes, rows, support, query, dataset, scheme)


def load_bank(prepared_dir: str | Path, split: str, scheme: str | None = None) -> torch.Tensor:
    """All images of one split as ``uint8`` ``[C, M, H, W]`` (or ``[C, M, H, W, 3]``).

    Row ``i`` is the ``i``-th class id of ``splits/<scheme>.json[split]``; rotated classes are
    rotated here once, so sampling is pure indexing.
    """
    prepared_dir = Path(prepared_dir)
    splits = read_splits(prepared_dir, scheme)
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
    """Random N-way K-shot tasks from a bank (``load_bank``), reproducible for a seed.

    ``dataset``: the data set of the bank (``splits.prepared_dataset`` of its folder), which
    says how its images scale to floats; a bank's shape cannot say it for every data set.
    ``group`` > 1: the bank's rows come in groups of that many rotations of one character
    (``character_groups``), and a task takes N distinct characters, each at a random one of its
    rotations: the reference code's tasks (``distinct_characters``). ``alphabets`` (the
    alphabet of each character, ``character_alphabets``): a task takes N characters of one
    alphabet, drawn uniformly among the alphabets with at least N, all at one random rotation
    (``alphabet_tasks``). ``augment="affine"`` warps every image by a small random affine
    transform (``affine_augment``).
    """

    def __init__(
        self,
        bank: torch.Tensor,
        ways: int,
        shots: int,
        query: int,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        *,
        dataset: str,
        group: int = 1,
        augment: str = "none",
        alphabets: np.ndarray | None = None,
    ) -> None:
        if group < 1 or bank.shape[0] % group:
            raise ValueError(f"a bank of {bank.shape[0]} rows has no groups of {group}")
        check_task_shape(bank.shape[0] // group, bank.shape[1], ways, shots, query)
        self.alphabets = self.eligible = None
        if alphabets is not None:
            alphabets = np.asarray(alphabets)
            if len(alphabets) != bank.shape[0] // group:
                raise ValueError(
                    f"{len(alphabets)} alphabets for {bank.shape[0] // group} characters"
                )
            names, counts = np.unique(alphabets, return_counts=True)
            if counts.max() < ways:
                raise DataError(
                    f"{ways}-way tasks of one alphabet: no alphabet has {ways} characters"
                )
            device = bank.device if generator is None else generator.device
            self.alphabets = torch.as_tensor(np.searchsorted(names, alphabets), device=device)
            self.eligible = torch.as_tensor(np.flatnonzero(counts >= ways), device=device)
        if augment not in ("none", "affine"):
            raise ValueError(f"unknown augment {augment!r}: expected 'none' or 'affine'")
        self.bank, self.ways, self.shots, self.query = bank, ways, shots, query
        self.group, self.augment = group, augment
        self.dataset = datasets.get(dataset).name  # a clear error for unknown names
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
        rows = torch.rand(n_tasks, n_classes // self.group, generator=g, device=g.device)
        if self.alphabets is not None:  # only the characters of the task's alphabet compete
            pick = torch.randint(len(self.eligible), (n_tasks, 1), generator=g, device=g.device)
            rows = rows.masked_fill(self.alphabets[None, :] != self.eligible[pick], -1.0)
        rows = rows.topk(self.ways, dim=1).indices
        noise = torch.rand(n_tasks, self.ways, n_images, generator=g, device=g.device)
        images = noise.argsort(dim=-1)[..., : self.shots + self.query]
        if self.group > 1:  # a random rotation of each character, or of the whole task
            shape = (n_tasks, 1) if self.alphabets is not None else rows.shape
            turn = torch.randint(self.group, shape, generator=g, device=g.device)
            rows = rows * self.group + turn
        if part is not None:
            rows, images = rows[part], images[part]
        tasks = gather_tasks(self.bank, rows, images, self.shots, self.dataset)
        if self.augment == "affine":
            fill = "zeros" if datasets.get(self.dataset).invert else "border"
            tasks.xs = affine_augment(tasks.xs, g, n_tasks, part, fill)
            tasks.xq = affine_augment(tasks.xq, g, n_tasks, part, fill)
        return tasks


def character_alphabets(
    prepared_dir: str | Path, split: str, scheme: str | None = None
) -> np.ndarray:
    """The alphabet of each character of ``split``, in bank order (a row, or a group of rows
    with rotations), from ``classes.csv``."""
    import csv

    with open(Path(prepared_dir) / "classes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "alphabet" not in rows[0]:
        raise DataError(f"{prepared_dir}: the data set has no alphabets (classes.csv)")
    splits = read_splits(prepared_dir, scheme)
    group = character_groups(prepared_dir, split, scheme)
    chars, _ = decode_class(np.asarray(splits[split], dtype=np.int64)[::group], splits["rotations"])
    return np.array([rows[int(c)]["alphabet"] for c in chars])


def character_groups(prepared_dir: str | Path, split: str, scheme: str | None = None) -> int:
    """How many bank rows each character of ``split`` has (4 with rotations, else 1), checked:
    every character must have all its rotations, in consecutive rows."""
    splits = read_splits(prepared_dir, scheme)
    if not splits["rotations"]:
        return 1
    ids = np.asarray(splits[split], dtype=np.int64)
    group = N_ROTATIONS
    whole = len(ids) % group == 0 and np.array_equal(
        ids.reshape(-1, group) % group, np.tile(np.arange(group), (len(ids) // group, 1))
    )
    if not whole:
        raise DataError(f"the {split} split does not hold all {group} rotations of each character")
    return group


def episode_tasks(
    bank_or_prepared: torch.Tensor | str | Path, episodes: Episodes, start: int, stop: int
) -> Tasks:
    """Episodes ``start:stop`` as one ``Tasks`` batch. Pass the bank when calling repeatedly
    (a prepared-folder path reloads the split every call)."""
    bank = bank_or_prepared
    if not isinstance(bank, torch.Tensor):
        bank = load_bank(bank, episodes.split, episodes.scheme)
    sl = slice(start, stop)
    rows = torch.from_numpy(episodes.rows[sl])
    images = torch.from_numpy(np.concatenate([episodes.support[sl], episodes.query[sl]], axis=-1))
    return gather_tasks(bank, rows, images, episodes.shots, episodes.dataset)

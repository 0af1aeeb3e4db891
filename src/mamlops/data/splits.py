"""Class splits: which classes are for meta-training, validation and testing.

Few-shot results are only comparable when everyone uses the same classes, so the default is the
Vinyals et al. (2016) Omniglot split that most later work uses, read from the shipped files
(``resources/splits/vinyals``). ``prepare.omniglot.splits`` lists the schemes a prepared folder
holds (the first is the default; a preset picks one with ``split``):

* ``vinyals``: whole alphabets held out for testing (but Gurmukhi, split 41/4); every rotation of
  a character is a class of its own, and an episode draws N of those classes, so a task may
  hold one character twice, in two rotations (the protocol of the papers that use this split).
* ``random``: the MAML paper code's scheme. Characters are shuffled by ``split_seed`` ignoring
  alphabets: 1100 train / 100 val / 423 test, so test characters come from alphabets seen in
  training. The paper code listed folders with ``os.listdir`` (file-system order), so its exact
  split cannot be reproduced; we shuffle the sorted characters with numpy's
  ``default_rng(split_seed)``. Its episodes, like the paper code's tasks, take N distinct
  characters, each at a random one of its four rotations.
* ``official``: Lake et al.'s own division. ``images_evaluation`` (659 characters) is the test
  set; ``images_background`` (964) is training, minus a validation carve-out of whole alphabets
  (so validation measures transfer to unseen alphabets, as the test does): the background
  alphabets at sorted positions 5, 11, 17, 23, 29 (every sixth), 158 characters, leaving 806.
  Episodes take distinct characters, as for ``random``.

Each scheme's ``splits/<scheme>.json`` says whether its episodes draw distinct characters
(``distinct_characters``); ``episodes.py`` also writes within-alphabet episodes (upright
characters of one alphabet: what a user teaching one script faces) from the alphabet of each
character (``classes.csv``).

Class ids. With rotations (``prepare.omniglot.rotations``, default true), each character gives
four classes, ``class_id = char_id * 4 + k`` for a rotation by ``k * 90`` degrees
counter-clockwise (``np.rot90(img, k)`` / ``torch.rot90(img, k, (-2, -1))``). Without rotations
``class_id = char_id``. ``char_id`` is the row of ``images.npy`` / ``classes.csv``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mamlops import datasets

SPLITS = ("train", "val", "test")
SPLITS_DIR = "splits"  # splits/<scheme>.json in a prepared folder
# Characters per split for each scheme (datasets.py): known in advance, so config.py checks the
# episode settings before any work and ``make_omniglot_splits`` checks it got them.
CHARACTER_COUNTS = datasets.OMNIGLOT.split_sizes
SCHEMES = tuple(CHARACTER_COUNTS)
N_ROTATIONS = 4
OFFICIAL_VAL_EVERY = 6  # official: every sixth background alphabet (positions 5, 11, ...) is val
MINIIMAGENET_COUNTS = datasets.MINIIMAGENET.split_sizes["ravi"]  # no rotations


class Character(NamedTuple):
    """One Omniglot character, in ``char_id`` order (set, alphabet, character sorted)."""

    set: str  # "background" or "evaluation"
    alphabet: str
    character: str

    @property
    def name(self) -> str:
        return f"{self.alphabet}/{self.character}"


def expected_class_counts(scheme: str, rotations: bool = True) -> dict[str, int]:
    """Classes per split for an Omniglot scheme, without looking at the data."""
    if scheme not in CHARACTER_COUNTS:
        raise ValueError(f"unknown Omniglot split {scheme!r}; expected one of {list(SCHEMES)}")
    factor = N_ROTATIONS if rotations else 1
    return {s: n * factor for s, n in zip(SPLITS, CHARACTER_COUNTS[scheme], strict=True)}


def class_id(char_id: int, k: int, rotations: bool = True) -> int:
    """The class id of character ``char_id`` rotated by ``k * 90`` degrees counter-clockwise."""
    return char_id * N_ROTATIONS + k if rotations else char_id


def decode_class(cid: int | np.ndarray, rotations: bool) -> tuple[Any, Any]:
    """``(char_id, k)`` of a class id (works on arrays too)."""
    if rotations:
        return cid // N_ROTATIONS, cid % N_ROTATIONS
    return cid, cid * 0


def vinyals_lines(split: str) -> list[str]:
    """Lines ``Alphabet/characterNN/rotDDD`` of a shipped Vinyals split file."""
    text = resources.files("mamlops") / "resources" / "splits" / "vinyals" / f"{split}.txt"
    return [ln.strip() for ln in text.read_text().splitlines() if ln.strip()]


def _expand(char_ids: np.ndarray, rotations: bool) -> list[int]:
    if not rotations:
        return sorted(int(c) for c in char_ids)
    return sorted(int(c) * N_ROTATIONS + k for c in char_ids for k in range(N_ROTATIONS))


def _vinyals(characters: list[Character], rotations: bool) -> dict[str, list[int]]:
    index = {c.name: i for i, c in enumerate(characters)}
    out: dict[str, list[int]] = {}
    for split in SPLITS:
        ids = []
        for line in vinyals_lines(split):
            name, rot = line.rsplit("/", 1)
            if name not in index:
                raise ValueError(f"vinyals/{split}.txt names {name!r}, not in the prepared data")
            k = int(rot.removeprefix("rot")) // 90
            if rotations or k == 0:
                ids.append(class_id(index[name], k, rotations))
        out[split] = sorted(ids)
    return out


def _random(n_chars: int, seed: int, rotations: bool) -> dict[str, list[int]]:
    n_train, n_val, n_test = CHARACTER_COUNTS["random"]
    if n_chars != n_train + n_val + n_test:
        raise ValueError(
            f"random split expects {n_train + n_val + n_test} characters, got {n_chars}"
        )
    perm = np.random.default_rng(seed).permutation(n_chars)
    parts = (perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :])
    return {s: _expand(p, rotations) for s, p in zip(SPLITS, parts, strict=True)}


def _official(characters: list[Character], rotations: bool) -> dict[str, list[int]]:
    background = sorted({c.alphabet for c in characters if c.set == "background"})
    val_alphabets = set(background[OFFICIAL_VAL_EVERY - 1 :: OFFICIAL_VAL_EVERY])
    chars = np.arange(len(characters))
    is_bg = np.array([c.set == "background" for c in characters])
    is_val = np.array([c.alphabet in val_alphabets for c in characters]) & is_bg
    parts = (chars[is_bg & ~is_val], chars[is_val], chars[~is_bg])
    return {s: _expand(p, rotations) for s, p in zip(SPLITS, parts, strict=True)}


def make_omniglot_splits(
    characters: list[Character], scheme: str = "vinyals", seed: int = 1, rotations: bool = True
) -> dict[str, Any]:
    """The ``splits.json`` content for ``characters`` (in ``char_id`` order).

    Checks that the splits are disjoint and have the sizes ``expected_class_counts`` promises,
    since later stages validated their params against those numbers.
    """
    expected = expected_class_counts(scheme, rotations)
    if scheme == "vinyals":
        parts = _vinyals(characters, rotations)
    elif scheme == "random":
        parts = _random(len(characters), seed, rotations)
    else:
        parts = _official(characters, rotations)
    _check(parts, expected)
    return {
        "scheme": scheme,
        "rotations": rotations,
        "seed": seed,
        "distinct_characters": rotations and scheme in datasets.OMNIGLOT.distinct_character_schemes,
        **parts,
    }


def make_miniimagenet_splits(counts: tuple[int, int, int] = MINIIMAGENET_COUNTS) -> dict[str, Any]:
    """Ravi split: classes are stored train, val, test in order, so the ids are ranges."""
    bounds = np.cumsum((0, *counts))
    parts = {s: list(range(bounds[i], bounds[i + 1])) for i, s in enumerate(SPLITS)}
    return {
        "scheme": "ravi",
        "rotations": False,
        "seed": None,
        "distinct_characters": False,
        **parts,
    }


def _check(parts: dict[str, list[int]], expected: dict[str, int]) -> None:
    seen: set[int] = set()
    for split in SPLITS:
        ids = set(parts[split])
        if len(ids) != expected[split]:
            raise ValueError(f"{split} split has {len(ids)} classes, expected {expected[split]}")
        if seen & ids:
            raise ValueError(f"{split} split overlaps an earlier split")
        seen |= ids


def write_splits(path: str | Path, splits: dict[str, Any]) -> None:
    """Write ``splits.json`` with one key per line (id lists stay on one line, so it is short)."""
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in splits.items())
    Path(path).write_text("{\n" + body + "\n}\n")


def prepared_schemes(prepared_dir: str | Path) -> list[str]:
    """The split schemes a prepared folder holds, the default first (``meta.json``)."""
    prepared_dir = Path(prepared_dir)
    meta = prepared_dir / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found; run the prepare stage first")
    schemes = json.loads(meta.read_text()).get("splits")
    if not schemes:  # folders prepared before splits/<scheme>.json: one root splits.json
        raise FileNotFoundError(
            f"{prepared_dir} was prepared by an older mamlops (no {SPLITS_DIR}/); rerun the "
            "prepare stage (dvc repro prepare, or mamlops prepare)"
        )
    return list(schemes)


def resolve_scheme(prepared_dir: str | Path, scheme: str | None) -> str:
    """``scheme``, checked to be in the prepared folder, or its default when None."""
    schemes = prepared_schemes(prepared_dir)
    if scheme is None:
        return schemes[0]
    if scheme not in schemes:
        raise FileNotFoundError(
            f"{prepared_dir} holds the splits {schemes}, not {scheme!r}: add {scheme} to "
            "prepare.<dataset>.splits in params.yaml and rerun the prepare stage"
        )
    return scheme


def splits_path(prepared_dir: str | Path, scheme: str) -> Path:
    """Where one scheme's class ids live in a prepared folder."""
    return Path(prepared_dir) / SPLITS_DIR / f"{scheme}.json"


def read_splits(prepared_dir: str | Path, scheme: str | None = None) -> dict[str, Any]:
    """The class ids of ``scheme`` (the folder's default scheme when None)."""
    return json.loads(splits_path(prepared_dir, resolve_scheme(prepared_dir, scheme)).read_text())

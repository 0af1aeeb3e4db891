"""Omniglot (Lake et al. 2015): its facts, its ``prepare.omniglot`` keys, and its class splits.

Everything that is particular to Omniglot lives here, found through the registry
(``datasets/__init__.py``); the prepare stage (``data/prepare.py``) decodes, writes and draws
episodes for any data set, and asks this module what its source folder holds and how its
classes split. The images come from the download stage (``data/download.py``).

Split schemes (``prepare.omniglot.splits`` lists those a prepared folder holds; the first is
the default; a preset picks one with ``split``). Few-shot results are only comparable when
everyone uses the same classes, so the default is the Vinyals et al. (2016) split that most
later work uses, read from the shipped files (``resources/splits/vinyals``):

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

Class ids. With rotations (``prepare.omniglot.rotations``, default true), each character gives
four classes, ``class_id = char_id * 4 + k`` for a rotation by ``k * 90`` degrees
counter-clockwise (``np.rot90(img, k)`` / ``torch.rot90(img, k, (-2, -1))``). Without rotations
``class_id = char_id``. ``char_id`` is the row of ``images.npy`` / ``classes.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
from pydantic import Field

from mamlops.datasets.common import (
    N_ROTATIONS,
    SPLITS,
    Listing,
    check_fits,
    check_split_ids,
    class_id,
    expand,
)
from mamlops.errors import DataError, ParamsError
from mamlops.schema import SCHEMA, Bool, NonNegInt

# Vinyals et al. 2016; the MAML paper code's random 1100/100/423; Lake et al.'s background /
# evaluation with every sixth background alphabet held out for validation
CHARACTER_COUNTS: dict[str, tuple[int, int, int]] = {
    "vinyals": (1028, 172, 423),
    "random": (1100, 100, 423),
    "official": (806, 158, 659),
}
SCHEMES = tuple(CHARACTER_COUNTS)
# schemes whose episodes take N distinct characters, each at a random rotation (the MAML paper
# code's tasks), rather than N of the rotated classes
DISTINCT_CHARACTER_SCHEMES = ("random", "official")
OFFICIAL_VAL_EVERY = 6  # official: every sixth background alphabet (positions 5, 11, ...) is val
SETS = {"background": "images_background", "evaluation": "images_evaluation"}  # the two zips

FACTS: dict[str, Any] = dict(
    name="omniglot",
    image_size=28,
    channels=1,
    color_mode="L",
    invert=True,
    hidden=64,
    max_pool=False,
    images_per_class=20,
    split_sizes=CHARACTER_COUNTS,
    distinct_character_schemes=DISTINCT_CHARACTER_SCHEMES,
    # MAML paper (Finn et al. 2017, Table 1): accuracy, 95% CI, transductive BN, 600 tasks
    paper={(5, 1): (98.7, 0.4), (5, 5): (99.9, 0.1), (20, 1): (95.8, 0.3), (20, 5): (98.9, 0.2)},
    # MAML++ (Antoniou et al. 2019, Table 1): the means as reported
    mamlpp={(5, 1): "99.47", (5, 5): "99.93", (20, 1): "97.65", (20, 5): "99.33"},
)
IMAGES_PER_CLASS = FACTS["images_per_class"]
CLASSES = sum(CHARACTER_COUNTS["vinyals"])

SplitName = Literal[SCHEMES]  # type: ignore[valid-type]


@dataclass(frozen=True)
class Keys:
    """``prepare.omniglot``: the split schemes prepared (the default first), the seed of the
    ``random`` scheme, and whether rotations are classes of their own."""

    __pydantic_config__ = SCHEMA
    splits: Annotated[tuple[SplitName, ...], Field(min_length=1)] = ("vinyals",)
    split_seed: NonNegInt = 1
    rotations: Bool = True


class Character(NamedTuple):
    """One Omniglot character, in ``char_id`` order (set, alphabet, character sorted)."""

    set: str  # "background" or "evaluation"
    alphabet: str
    character: str

    @property
    def name(self) -> str:
        return f"{self.alphabet}/{self.character}"


# ----------------------------------------------------------------------------- params


def check_section(prep: dict[str, Any]) -> None:
    """Keys of an older params.yaml, refused with what to write instead."""
    if isinstance(prep.get("omniglot"), dict) and "split" in prep["omniglot"]:
        raise ParamsError(
            "params.yaml: prepare.omniglot.split is now prepare.omniglot.splits, a list of "
            "split schemes to prepare (the first is the default; a preset picks one with "
            f"split:), e.g. splits: [{prep['omniglot']['split']}]"
        )


def check_keys(keys: Keys, episodes: Any) -> None:
    """Every episode setting fits every scheme prepared, before any work starts."""
    if len(set(keys.splits)) < len(keys.splits):
        raise ParamsError(
            f"params.yaml: prepare.omniglot.splits lists a split twice: {keys.splits}"
        )
    for scheme in keys.splits:
        # each rotation by 90 degrees is a class of its own, unless the scheme's episodes
        # draw distinct characters
        distinct = scheme in DISTINCT_CHARACTER_SCHEMES
        factor = 4 if keys.rotations and not distinct else 1
        check_fits(
            episodes.settings,
            "prepare.episodes.settings",
            episodes.query,
            [n * factor for n in CHARACTER_COUNTS[scheme]],
            IMAGES_PER_CLASS,
            f"Omniglot, split {scheme}, rotations {str(keys.rotations).lower()}"
            + (", distinct characters" if distinct else ""),
        )


def schemes(keys: Keys) -> tuple[str, ...]:
    """The split schemes prepared, the default first."""
    return tuple(keys.splits)


def settings(keys: Keys, episodes: Any) -> tuple[tuple[int, int], ...]:
    """The N-way K-shot settings that get fixed episode files: ``prepare.episodes.settings``."""
    return episodes.settings


# ----------------------------------------------------------------------------- source


def source(data: Any, download_dir: Path) -> Path:
    """Where the prepare stage reads Omniglot: the download stage's folder."""
    return download_dir


def describe_source(data: Any) -> str | None:
    """Nothing to check beyond the download itself (the download stage verifies it)."""
    return None


def list_classes(raw_dir: str | Path) -> Listing:
    """Characters (sorted by set, alphabet, character) and their drawings (sorted by name)."""
    raw_dir = Path(raw_dir)
    characters: list[Character] = []
    files: list[list[Path]] = []
    for set_name, folder in SETS.items():
        root = raw_dir / folder
        if not root.is_dir():
            raise FileNotFoundError(f"{root} not found; run the download stage first")
        for alphabet in sorted(p for p in root.iterdir() if p.is_dir()):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                pngs = sorted(char.glob("*.png"))
                if len(pngs) != IMAGES_PER_CLASS:
                    raise DataError(f"{char}: {len(pngs)} drawings, expected {IMAGES_PER_CLASS}")
                characters.append(Character(set_name, alphabet.name, char.name))
                files.append(pngs)
    if len(characters) != CLASSES:
        raise DataError(f"{raw_dir}: {len(characters)} characters, expected {CLASSES}")
    header = ("char_id", "set", "alphabet", "character")
    return Listing(header, list(characters), files, [c.alphabet for c in characters])


# ----------------------------------------------------------------------------- splits


def make_splits(listing: Listing, keys: Keys) -> list[dict[str, Any]]:
    """The ``splits/<scheme>.json`` contents of every scheme of ``keys``, the default first."""
    characters = [Character(*row) for row in listing.rows]
    return [split(characters, s, keys.split_seed, keys.rotations) for s in keys.splits]


def expected_class_counts(scheme: str, rotations: bool = True) -> dict[str, int]:
    """Classes per split for a scheme, without looking at the data."""
    if scheme not in CHARACTER_COUNTS:
        raise ValueError(f"unknown Omniglot split {scheme!r}; expected one of {list(SCHEMES)}")
    factor = N_ROTATIONS if rotations else 1
    return {s: n * factor for s, n in zip(SPLITS, CHARACTER_COUNTS[scheme], strict=True)}


def vinyals_lines(split: str) -> list[str]:
    """Lines ``Alphabet/characterNN/rotDDD`` of a shipped Vinyals split file."""
    text = resources.files("mamlops") / "resources" / "splits" / "vinyals" / f"{split}.txt"
    return [ln.strip() for ln in text.read_text().splitlines() if ln.strip()]


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
    return {s: expand(p, rotations) for s, p in zip(SPLITS, parts, strict=True)}


def _official(characters: list[Character], rotations: bool) -> dict[str, list[int]]:
    background = sorted({c.alphabet for c in characters if c.set == "background"})
    val_alphabets = set(background[OFFICIAL_VAL_EVERY - 1 :: OFFICIAL_VAL_EVERY])
    chars = np.arange(len(characters))
    is_bg = np.array([c.set == "background" for c in characters])
    is_val = np.array([c.alphabet in val_alphabets for c in characters]) & is_bg
    parts = (chars[is_bg & ~is_val], chars[is_val], chars[~is_bg])
    return {s: expand(p, rotations) for s, p in zip(SPLITS, parts, strict=True)}


def split(
    characters: list[Character], scheme: str = "vinyals", seed: int = 1, rotations: bool = True
) -> dict[str, Any]:
    """The ``splits/<scheme>.json`` content for ``characters`` (in ``char_id`` order).

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
    check_split_ids(parts, expected)
    return {
        "scheme": scheme,
        "rotations": rotations,
        "seed": seed,
        "distinct_characters": rotations and scheme in DISTINCT_CHARACTER_SCHEMES,
        **parts,
    }

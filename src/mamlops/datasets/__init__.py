"""The data sets, in one registry: each one's facts, the network that reads it, and its hooks.

Training, evaluation, adaptation and serving must agree on what a prepared image looks like; if
each module kept its own copy, an edit to one (say, the image size) would leave a served model
fed images of a size it was never trained on. So every module reads them from the ``Dataset``
record here, and nothing in ``params.yaml`` overrides them: they are facts of the data set and
of the paper's network, not knobs.

One module per data set (``omniglot.py``, ``miniimagenet.py``) declares its facts (``FACTS``),
its ``prepare.<name>`` keys (``Keys``) and the hooks the stages call through ``Dataset``: what
its source folder holds, how its classes split, how its keys are checked. Adding a data set is
one module, listed in ``_MODULES``, and its params.yaml / presets.yaml entries; no other code
names a data set.

Pure data, torch-free: the serving path (``preprocess``, ``onnx_predict``) reads it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from mamlops.datasets import miniimagenet, omniglot
from mamlops.datasets.common import Listing
from mamlops.errors import UserError

_MODULES: tuple[ModuleType, ...] = (omniglot, miniimagenet)  # the registry, in params.yaml order

N_BLOCKS = 4  # conv blocks of the paper's network


@dataclass(frozen=True)
class ConvNetConfig:
    """Shape of the network. Omniglot: 64 filters, stride-2 convs, spatial mean before the head.
    miniImageNet: 32 filters, stride-1 convs with 2x2 max-pool, flattened features."""

    in_channels: int = 1
    ways: int = 5
    hidden: int = 64
    max_pool: bool = False
    image_size: int = 28

    @classmethod
    def for_dataset(cls, dataset: str, ways: int) -> ConvNetConfig:
        """The paper's network for ``dataset``, ``ways`` outputs (``Dataset.network``)."""
        return get(dataset).network(ways)

    @property
    def stride(self) -> int:
        """Conv stride: 2 downsamples Omniglot; miniImageNet downsamples by max-pool instead."""
        return 1 if self.max_pool else 2

    @property
    def first_block_activations(self) -> int:
        """Floats per image out of the first conv (3x3, padding 1): the largest activation."""
        side = (self.image_size - 1) // self.stride + 1
        return self.hidden * side * side

    @property
    def feature_dim(self) -> int:
        if not self.max_pool:
            return self.hidden  # spatial mean, as the paper code does for Omniglot
        size = self.image_size
        for _ in range(N_BLOCKS):
            size = size // 2
        return self.hidden * size * size

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Dataset:
    """One data set: its facts (image format, value scaling, network geometry, class and split
    sizes, the papers' accuracies) and, through ``hooks`` (its module), what the stages do
    that differs between data sets."""

    name: str
    image_size: int  # side of the square image the network sees (resized with LANCZOS)
    channels: int
    color_mode: str  # Pillow mode the image is converted to before resizing
    invert: bool  # float input is 1 - x/255 (Omniglot: strokes = 1), else x/255
    hidden: int  # filters per conv block (the paper: 64 for Omniglot, 32 for miniImageNet)
    max_pool: bool  # stride-1 convs + 2x2 max-pool (miniImageNet) or stride-2 convs (Omniglot)
    images_per_class: int
    # classes (Omniglot: characters, before rotations) per split (train, val, test) per scheme
    split_sizes: dict[str, tuple[int, int, int]]
    # schemes whose episodes take N distinct characters, each at a random rotation (the MAML
    # paper code's tasks), rather than N of the rotated classes
    distinct_character_schemes: tuple[str, ...] = ()
    # (ways, shots) -> the MAML paper's accuracy and 95% CI, and MAML++'s, for the results table
    paper: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    mamlpp: dict[tuple[int, int], str] = field(default_factory=dict)
    hooks: ModuleType | None = field(default=None, repr=False, compare=False)

    @property
    def scale(self) -> str:
        """The float scaling in words, as written into classifier and ONNX metadata."""
        return "1 - x / 255" if self.invert else "x / 255"

    def network(self, ways: int) -> ConvNetConfig:
        """The paper's network for this data set with ``ways`` outputs."""
        return ConvNetConfig(self.channels, ways, self.hidden, self.max_pool, self.image_size)

    @property
    def classes(self) -> int:
        """Classes (characters) in the whole data set."""
        return sum(next(iter(self.split_sizes.values())))

    # ------------------------------------------------------------------- hooks (its module)

    @property
    def keys(self) -> type:
        """The checked dataclass of ``prepare.<name>`` (the schema of that section)."""
        return self.hooks.Keys

    def check_section(self, prep: dict[str, Any]) -> None:
        """Refuse keys of older params files in the raw ``prepare`` section, with the fix."""
        self.hooks.check_section(prep)

    def check_keys(self, keys: Any, episodes: Any) -> None:
        """``ParamsError`` unless every episode setting fits every scheme ``keys`` prepares."""
        self.hooks.check_keys(keys, episodes)

    def schemes(self, keys: Any) -> tuple[str, ...]:
        """The split schemes prepared under ``keys``, the default first."""
        return self.hooks.schemes(keys)

    def settings(self, keys: Any, episodes: Any) -> tuple[tuple[int, int], ...]:
        """The N-way K-shot settings that get fixed episode files."""
        return self.hooks.settings(keys, episodes)

    def source(self, data: Any, download_dir: Path) -> Path:
        """Where the prepare stage reads it (``data``: ``config.DataConfig``)."""
        return self.hooks.source(data, download_dir)

    def describe_source(self, data: Any) -> str | None:
        """The download stage's check of a source it does not download (None: nothing)."""
        return self.hooks.describe_source(data)

    def list_classes(self, source: str | Path, **options: Any) -> Listing:
        """The classes of a source folder and their image files, in ``images.npy`` order."""
        return self.hooks.list_classes(source, **options)

    def make_splits(self, listing: Listing, keys: Any) -> list[dict[str, Any]]:
        """The ``splits/<scheme>.json`` contents of every scheme prepared, the default first."""
        return self.hooks.make_splits(listing, keys)


DATASETS: dict[str, Dataset] = {m.FACTS["name"]: Dataset(**m.FACTS, hooks=m) for m in _MODULES}
NAMES = tuple(DATASETS)


def get(name: str) -> Dataset:
    """The facts of ``name``; a clear error for unknown names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}; expected one of {list(NAMES)}") from None

"""Per-dataset facts, in one table: what a prepared image looks like and which network reads it.

Training, evaluation, adaptation and serving must agree on these numbers; if each module kept
its own copy, an edit to one (say, the image size) would leave a served model fed images of a
size it was never trained on. So ``preprocess``, ``model``, ``prepare``, ``splits``,
``episodes``, ``classifier`` and ``miniimagenet`` all read them from here, and nothing in
``params.yaml`` overrides them: they are facts of the data set and of the paper's network, not
knobs.

Pure data, torch-free: the serving path (``preprocess``, ``onnx_predict``) reads it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mamlops.errors import UserError

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
    """One data set: image format, value scaling, network geometry, class and split sizes."""

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
    # paper code's tasks), rather than N of the rotated classes (splits.py)
    distinct_character_schemes: tuple[str, ...] = ()

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


OMNIGLOT = Dataset(
    name="omniglot",
    image_size=28,
    channels=1,
    color_mode="L",
    invert=True,
    hidden=64,
    max_pool=False,
    images_per_class=20,
    # Vinyals et al. 2016; the MAML paper code's random 1100/100/423; Lake et al.'s background /
    # evaluation with every sixth background alphabet held out for validation (splits.py)
    split_sizes={
        "vinyals": (1028, 172, 423),
        "random": (1100, 100, 423),
        "official": (806, 158, 659),
    },
    distinct_character_schemes=("random", "official"),
)

MINIIMAGENET = Dataset(
    name="miniimagenet",
    image_size=84,
    channels=3,
    color_mode="RGB",
    invert=False,
    hidden=32,
    max_pool=True,
    images_per_class=600,
    split_sizes={"ravi": (64, 16, 20)},  # Ravi & Larochelle 2017
)

DATASETS: dict[str, Dataset] = {d.name: d for d in (OMNIGLOT, MINIIMAGENET)}
NAMES = tuple(DATASETS)


def get(name: str) -> Dataset:
    """The facts of ``name``; a clear error for unknown names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}; expected one of {list(NAMES)}") from None

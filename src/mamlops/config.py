"""The typed, frozen, checked configs of ``params.yaml``: the one place its keys are named.

Every stage reads its section through one ``*.from_params`` here; the rest of the library takes
these objects and never looks at the YAML. The frozen configs are also the schema: pydantic
checks a section against their annotated types and ranges (``schema.py`` turns its errors into
one line naming the key), and ``params.load_params`` checks the whole file, so a bad value or a
typo anywhere fails before any work starts. A data set's own ``prepare.<name>`` keys are
declared by its module (``datasets/``) and gathered here into the ``prepare`` section.

No torch here: ``download`` and ``prepare`` do not depend on the network code, so editing
``maml.py`` does not re-run them.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field

from mamlops import datasets
from mamlops.datasets.common import check_unique
from mamlops.errors import ParamsError
from mamlops.schema import (
    SCHEMA,
    Bool,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Settings,
    Str,
    checked,
    section,
)

PRESETS_FILE = "presets.yaml"  # beside the params file: the training presets, by setting name
Strategy = Literal["auto", "loop", "batched", "graph"]
QueryBN = Literal["transductive", "support"]
HeadInit = Literal["xavier", "normal"]  # the output layer's init: Xavier, or the reference's N(0,1)
Augment = Literal["none", "affine"]  # training images as drawn, or small random affine warps
ThetaChoice = Literal["best", "final"]  # theta_best (highest val accuracy) or theta (last)
THETA_CHOICES: tuple[str, ...] = get_args(ThetaChoice)
DatasetName = Literal[datasets.NAMES]  # type: ignore[valid-type]


class _Fields:
    """``to_dict``: a flat config's fields by name, as params.yaml spells them (MLflow params,
    theta metadata)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def presets_of(params: dict[str, Any]) -> dict[str, Any]:
    """presets.yaml's presets and a params file's own ``train.presets`` (those win on a name)."""
    train = section(params, "train")
    return {**(params.get(PRESETS_FILE) or {}), **(train.get("presets") or {})}


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataConfig:
    """``data``: where Omniglot comes from and where a user's miniImageNet lies."""

    __pydantic_config__ = SCHEMA
    mirror: Str | None  # "" in params.yaml = the official release
    miniimagenet_dir: Str | None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DataConfig:
        cfg = checked(cls, section(params, "data"), "params.yaml: data")
        return cls((cfg.mirror or "").strip() or None, (cfg.miniimagenet_dir or "").strip() or None)

    def source(self, dataset: str, download_dir: Path) -> Path:
        """Where the prepare stage reads ``dataset`` from (its module says: the download
        stage's ``download_dir``, or a folder of the user's, which must then be configured)."""
        return datasets.get(dataset).source(self, download_dir)


# ----------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class EpisodeConfig:
    """``prepare.episodes``: the fixed evaluation episodes."""

    __pydantic_config__ = SCHEMA
    seed: NonNegInt
    count: PosInt  # test episodes per setting
    val_count: PosInt  # validation episodes per setting
    query: PosInt  # query images per class
    settings: Settings


# The ``prepare`` section as params.yaml nests it: one required key per data set (its module's
# ``Keys``), then the episodes and the data sets to prepare (``PrepareConfig`` is the checked
# view). Built from the registry, so a new data set module brings its section with it.
_PrepareKeys = dataclasses.make_dataclass(
    "_PrepareKeys",
    [
        *((d.name, d.keys) for d in datasets.DATASETS.values()),
        ("episodes", EpisodeConfig),
        (
            "datasets",
            Annotated[tuple[DatasetName, ...], Field(min_length=1)],
            field(default=datasets.NAMES[:1]),
        ),
    ],
    frozen=True,
    namespace={"__pydantic_config__": SCHEMA},
)


@dataclass(frozen=True)
class PrepareConfig:
    """The checked ``prepare`` section. Image sizes are not here: they are facts of the data set
    (``datasets/``), shared with the network and the served classifier."""

    keys: dict[str, Any]  # data set name -> its checked prepare.<name> keys (its ``Keys``)
    episodes: EpisodeConfig
    datasets: tuple[str, ...] = datasets.NAMES[:1]

    def schemes(self, dataset: str) -> tuple[str, ...]:
        """The split schemes prepared for ``dataset``, the default first."""
        return datasets.get(dataset).schemes(self.keys[dataset])

    def settings(self, dataset: str) -> tuple[tuple[int, int], ...]:
        """The N-way K-shot settings that get fixed episode files for ``dataset``."""
        return datasets.get(dataset).settings(self.keys[dataset], self.episodes)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PrepareConfig:
        """``ParamsError`` names the bad key and why, before any work starts."""
        prep = section(params, "prepare")
        for name in datasets.NAMES:
            if isinstance(prep.get(name), dict) and "image_size" in prep[name]:
                raise ParamsError(
                    f"params.yaml: prepare.{name}.image_size is no longer a setting: the image "
                    "size is a fact of the data set that the network and the served classifier "
                    "share (src/mamlops/datasets/); remove the key"
                )
        for data in datasets.DATASETS.values():
            data.check_section(prep)
        keys = checked(_PrepareKeys, prep, "params.yaml: prepare")
        if len(set(keys.datasets)) < len(keys.datasets):
            raise ParamsError(
                f"params.yaml: prepare.datasets lists a data set twice: {prep['datasets']}"
            )
        check_unique(keys.episodes.settings, "prepare.episodes.settings")
        by_name = {name: getattr(keys, name) for name in datasets.NAMES}
        for name, data in datasets.DATASETS.items():
            data.check_keys(by_name[name], keys.episodes)
        return cls(by_name, keys.episodes, keys.datasets)


# ----------------------------------------------------------------------------- train


@dataclass(frozen=True)
class MAMLConfig(_Fields):
    """Inner loop and MAML++ switches; defaults are the paper's Omniglot 5-way setting.

    ``first_order_iters``: derivative-order annealing, first-order for iterations < E, then
    second order (ignored when ``first_order`` is set). ``multi_step_anneal_iters``: with
    ``multi_step_loss``, the iterations over which the weight of the intermediate-step losses
    decays to a floor while the final step's weight grows. ``strategy``: how a meta-batch is
    executed (``maml.resolve_strategy``); it changes speed, not the math.

    Four switches reproduce the reference code (cbfinn/maml) where it differs from this
    project's defaults (docs/accuracy.md): ``bn_scale: false`` (its BatchNorm learns an offset
    only), ``adapt_bn: false`` (its BatchNorm offsets are meta-learned but not adapted by the
    inner loop), ``head_init: normal`` (its Omniglot output layer starts N(0, 1)) and
    ``label_smoothing`` (its targets ``0.9 * onehot + 0.01`` are label smoothing
    ``0.01 N / (0.9 + 0.01 N)`` on a loss scaled by ``(0.9 + 0.01 N) / K``; the scale is the
    inner lr's business). The first two are visible in theta itself (no ``bn*.weight``; BN
    tensors with a step axis), so evaluation and serving need no config for them.
    """

    __pydantic_config__ = SCHEMA
    inner_lr: PosFloat = 0.4
    inner_steps: NonNegInt = 1
    first_order: Bool = False
    strategy: Strategy = "auto"
    learn_inner_lr: Bool = False
    per_step_bn: Bool = False
    multi_step_loss: Bool = False
    multi_step_anneal_iters: NonNegInt = 0
    first_order_iters: NonNegInt = 0
    bn_scale: Bool = True
    adapt_bn: Bool = True
    head_init: HeadInit = "xavier"
    label_smoothing: Annotated[float, Field(strict=True, ge=0, lt=1, allow_inf_nan=False)] = 0.0
    # the BatchNorm statistics of the query pass in the meta-loss: the query batch's own (the
    # paper's transductive protocol) or the support set's under the adapted weights, as a
    # deployed classifier normalises (``maml.query_logits``'s two protocols)
    query_bn: QueryBN = "transductive"


_MAML_KEYS = tuple(f.name for f in fields(MAMLConfig))


@dataclass(frozen=True)
class TrainConfig:
    """One training setting: params.yaml's ``train.common`` under presets.yaml's ``<name>``.

    In params.yaml the keys are flat (``inner_lr`` beside ``meta_batch``); here the inner-loop
    keys form the nested ``maml`` config the algorithm takes. ``to_dict`` flattens it back, so
    MLflow params, theta metadata and checkpoints use the params.yaml key names.
    """

    __pydantic_config__ = SCHEMA
    __flat_fields__ = (("maml", MAMLConfig),)  # flat in params.yaml (schema.flat_fields)
    name: Str
    dataset: DatasetName
    ways: Annotated[int, Field(strict=True, ge=2)]
    shots: PosInt
    query: PosInt
    meta_batch: PosInt
    test_inner_steps: NonNegInt
    meta_lr: PosFloat
    iterations: PosInt
    maml: MAMLConfig = field(default_factory=MAMLConfig)
    # which class split of the prepared data (prepare.<dataset>.splits) it trains and is scored
    # on; None: the data set's default (Vinyals for Omniglot, Ravi for miniImageNet)
    split: Str | None = None
    # training tasks only: N distinct characters, each turned by a random multiple of 90
    # degrees (the reference code's tasks), instead of N of the rotated classes (a task may
    # then hold one character twice, in two rotations)
    distinct_characters: Bool = False
    # training tasks only: the N characters of a task come from one alphabet, the whole task
    # at one random rotation (what a user teaching one script faces; Omniglot)
    alphabet_tasks: Bool = False
    augment: Augment = "none"  # training images only; "affine": small random warps per image
    seed: NonNegInt = 0
    device: Str = "auto"
    processes: PosInt = 1  # >1: data-parallel under torchrun (distributed.py)
    amp_bf16: Bool = False
    cosine_meta_lr: Bool = False
    grad_clip: NonNegFloat = 0.0
    val_every: PosInt = 250
    val_episodes: NonNegInt = 100
    checkpoint_every: NonNegInt = 250
    log_every: PosInt = 10

    @classmethod
    def from_flat(cls, values: dict[str, Any], where: str = "train") -> TrainConfig:
        """Build from flat params.yaml-style keys (``where`` names them in messages), checked."""
        maml = {k: values[k] for k in _MAML_KEYS if k in values}
        nested = {**{k: v for k, v in values.items() if k not in _MAML_KEYS}, "maml": maml}
        cfg = checked(cls, nested, where)
        if cfg.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", cfg.device):
            raise ParamsError(f"{where}.device must be auto, cpu or cuda[:N], got {cfg.device!r}")
        schemes = list(datasets.get(cfg.dataset).split_sizes)
        if cfg.split is not None and cfg.split not in schemes:
            raise ParamsError(
                f"{where}.split must be one of {schemes} for {cfg.dataset}, got {cfg.split!r}"
            )
        if cfg.meta_batch % cfg.processes:
            raise ParamsError(
                f"{where}: meta_batch {cfg.meta_batch} does not split over {cfg.processes} "
                f"processes; make meta_batch a multiple of processes"
            )
        return cfg

    @classmethod
    def from_params(cls, params: dict[str, Any], name: str) -> TrainConfig:
        """Merge ``train.common`` and the preset ``name`` and check them.

        Presets come from presets.yaml (see ``load_params``) and, for a params file of one's
        own, from its ``train.presets`` section; the latter wins on a name both define.
        """
        train = section(params, "train")
        presets = presets_of(params)
        if name not in presets:
            known = ", ".join(sorted(presets)) or "none"
            close = difflib.get_close_matches(name, list(presets), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ParamsError(
                f"{PRESETS_FILE} has no setting {name!r}; {hint}known: {known}. "
                f"Add it to {PRESETS_FILE} or pick a known one"
            )
        if not isinstance(presets[name], dict):
            raise ParamsError(f"{PRESETS_FILE}: {name} must be a mapping of train keys")
        common = train.get("common") or {}
        if not isinstance(common, dict):
            raise ParamsError("params.yaml: train.common must be a mapping of train keys")
        merged = {**common, **presets[name], "name": name}
        # a value in the preset wins over train.common: name the file the bad value came from
        where = f"{PRESETS_FILE}:{name}"
        try:
            return cls.from_flat(merged, where)
        except ParamsError as exc:
            bad = str(exc).removeprefix(where + ".").split(" ")[0].split(":")[0]
            if bad in common and bad not in presets[name]:
                raise ParamsError(str(exc).replace(where, "params.yaml: train.common", 1)) from None
            raise

    @property
    def inner_lr(self) -> float:
        return float(self.maml.inner_lr)

    @property
    def network(self) -> datasets.ConvNetConfig:
        """The network this setting trains: the data set's geometry, ``ways`` outputs."""
        return datasets.get(self.dataset).network(self.ways)

    def to_dict(self) -> dict[str, Any]:
        """Flat, with the params.yaml key names (MLflow params, theta metadata, checkpoints)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "maml"}
        return {**out, **self.maml.to_dict()}


def train_settings(params: dict[str, Any]) -> dict[str, str]:
    """``train.settings``: the settings ``dvc repro`` trains, as ``{preset: dataset}``."""
    settings = section(params, "train").get("settings") or {}
    if not isinstance(settings, dict):
        raise ParamsError("params.yaml: train.settings must map setting names to data sets")
    return dict(settings)


# ----------------------------------------------------------------------------- evaluate, export


@dataclass(frozen=True)
class EvaluateConfig(_Fields):
    """``evaluate``: which theta, how many test-time steps, batch size, episodes drawn."""

    __pydantic_config__ = SCHEMA
    checkpoint: ThetaChoice = "best"
    steps: NonNegInt | None = None  # None: the preset's test_inner_steps
    batch: PosInt = 50
    grid_episodes: PosInt = 3  # a declared DVC output: always draw at least one episode
    # also score the within-alphabet test episodes (Omniglot: N characters of one script)
    within_alphabet: Bool = True
    # also score transductive BN with K query images per class (the MAML paper's protocol;
    # the standard metrics use every query image of the episode)
    reference_query: Bool = True

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EvaluateConfig:
        return checked(cls, section(params, "evaluate"), "params.yaml: evaluate")


DEFAULT_OPSET = 20  # what the dvc-tracked model.onnx files are written with
MIN_OPSET = 18  # the oldest opset the files are checked against (onnxruntime 1.16+ runs it)


@dataclass(frozen=True)
class ExportConfig(_Fields):
    """``export``: the demo classifier, its ONNX opset, and the registry."""

    __pydantic_config__ = SCHEMA
    checkpoint: ThetaChoice = "best"
    demo_episode: NonNegInt = 0
    opset: Annotated[int, Field(strict=True, ge=MIN_OPSET)] = DEFAULT_OPSET
    register: Bool = True
    alias: Str = "champion"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ExportConfig:
        return checked(cls, section(params, "export"), "params.yaml: export")

    def check_demo_episode(self, test_episodes: int) -> None:
        """The demo episode must be one of the prepared test episodes."""
        if self.demo_episode >= test_episodes:
            raise ParamsError(
                f"params.yaml: export.demo_episode = {self.demo_episode} but only "
                f"{test_episodes} test episodes exist"
            )

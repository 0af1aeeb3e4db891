"""``params.yaml`` -> typed, frozen, checked configs: the one place its keys are read and named.

Every stage reads its section through one ``*.from_params`` here; the rest of the library takes
these objects and never looks at the YAML. The frozen configs are also the schema: pydantic
checks a section against their annotated types and ranges, and ``load_params`` checks the whole
file, so a bad value or a typo anywhere fails before any work starts, with a ``ParamsError``
naming the key and what would work (a did-you-mean for unknown keys). This is the only module
whose messages name ``params.yaml`` keys. DVC tracks the keys each stage lists under ``params:``
in ``dvc.yaml``.

``Layout`` is where the stages read and write by default (the paths ``dvc.yaml`` passes on each
stage's command line; ``tests/test_layout.py`` checks the two agree), so ``mamlops train``
without arguments works on the same files as ``dvc repro``.

No torch here (``resolve_device`` imports it when called): ``download`` and ``prepare`` do not
depend on the network code, so editing ``maml.py`` does not re-run them.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Literal,
    NamedTuple,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from mamlops import datasets
from mamlops.errors import UserError

if TYPE_CHECKING:
    import torch

PARAMS_FILE = Path("params.yaml")
PRESETS_FILE = "presets.yaml"  # beside the params file: the training presets, by setting name
Strategy = Literal["auto", "loop", "batched", "graph"]
QueryBN = Literal["transductive", "support"]
HeadInit = Literal["xavier", "normal"]  # the output layer's init: Xavier, or the reference's N(0,1)
Augment = Literal["none", "affine"]  # training images as drawn, or small random affine warps
_T = TypeVar("_T")


class ParamsError(UserError):
    """A params.yaml key is missing or has a value that cannot work; the message says which."""


# ----------------------------------------------------------------------------- the schema
# The frozen configs below are the schema of params.yaml: their annotations (with pydantic's
# constraints) say what each key takes, and ``_checked`` builds a config from its YAML section
# through pydantic, so a wrong type, an out-of-range value or an unknown key is refused in one
# line that names the key. Constructing a config in code (``MAMLConfig(inner_lr=0.4)``) is
# plain dataclass construction: the checks are for what users write.

PosInt = Annotated[int, Field(strict=True, ge=1)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
PosFloat = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]
ThetaChoice = Literal["best", "final"]  # theta_best (highest val accuracy) or theta (last)
THETA_CHOICES: tuple[str, ...] = get_args(ThetaChoice)
_SCHEMA = ConfigDict(extra="forbid")  # every config's __pydantic_config__: unknown keys refused

_WHAT = {  # pydantic error type -> what the key must be, in a user's words
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dataclass_type": "a mapping",
    "dict_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
}


def _checked(cls: type[_T], data: Any, where: str) -> _T:
    """``cls`` built from the YAML mapping ``data`` and checked against its annotations; the
    first problem becomes a one-line ``ParamsError`` naming ``where``'s key."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where} must be a mapping of keys, got {data!r}")
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise ParamsError(_explain(exc.errors()[0], cls, where)) from None


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _explain(error: dict[str, Any], cls: type, where: str) -> str:
    loc = [part for part in error["loc"] if part != "maml"]  # TrainConfig's nested keys are flat
    key = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        known = _known_keys(cls, error["loc"][:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{key}: unknown key; {hint}known: {', '.join(known)}"
    if kind in ("missing", "missing_argument"):
        return f"{key} is missing"
    if kind == "literal_error":
        return f"{key} must be one of {ctx['expected']}, got {value!r}"
    if kind == "greater_than_equal":
        bound = ctx["ge"]
        what = {0: "an integer >= 0", 1: "a positive integer"}.get(bound, f">= {bound}")
        return f"{key} must be {what}, got {value!r}"
    if kind == "greater_than":
        return f"{key} must be a positive number, got {value!r}"
    if kind == "too_short":
        return f"{key} must not be empty"
    if kind in _WHAT:
        return f"{key} must be {_WHAT[kind]}, got {value!r}"
    return f"{key}: {error['msg'][0].lower()}{error['msg'][1:]}, got {value!r}"


def _known_keys(cls: type, loc: tuple) -> list[str]:
    """The keys the mapping at ``loc`` inside ``cls`` may have (for did-you-mean)."""
    for part in loc:
        if isinstance(part, int):
            continue
        hint = get_type_hints(cls, include_extras=True)[part]
        while get_origin(hint) is not None:  # Annotated[...], tuple[X, ...], X | None
            hint = next(a for a in get_args(hint) if a is not Ellipsis and a is not type(None))
        cls = hint
    names = list(cls._fields) if hasattr(cls, "_fields") else [f.name for f in fields(cls)]
    if cls is TrainConfig:  # flat in params.yaml
        names = [n for n in names if n != "maml"] + list(_MAML_KEYS)
    return sorted(names)


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a dict, with the presets of a ``presets.yaml`` beside it under
    the key ``"presets.yaml"``; a clear error when a file is missing or not a mapping, and when
    any section has a key or value that cannot work (``check_params``), whichever stage reads it.

    The presets live in their own DVC params file so that ``dvc exp show`` lists the keys of
    the presets a run uses, not those of every preset (DVC shows all of params.yaml, but only
    the tracked keys of other params files).
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(
            f"{path}: params file not found; run from the repository root or pass --params FILE"
        )
    data = _read_mapping(path)
    presets_path = path.parent / PRESETS_FILE
    if presets_path.is_file():
        data[PRESETS_FILE] = _read_mapping(presets_path)
    check_params(data)
    return data


SECTIONS = ("data", "prepare", "train", "evaluate", "export")


def check_params(params: dict[str, Any]) -> None:
    """Every section of a params file against the schema, so that a typo in ``export`` fails
    ``dvc repro`` at its first stage rather than after an hour of training. Sections a file
    lacks are left to the stage that needs them (its own clear error)."""
    unknown = sorted(set(params) - set(SECTIONS) - {PRESETS_FILE})
    if unknown:
        close = [difflib.get_close_matches(k, SECTIONS, n=1) for k in unknown]
        hint = "; ".join(f"did you mean {c[0]!r}" for c in close if c)
        raise ParamsError(
            f"params.yaml: unknown section(s) {unknown}{'; ' + hint if hint else ''}; "
            f"known: {', '.join(SECTIONS)}"
        )
    prepare = PrepareConfig.from_params(params) if "prepare" in params else None
    for name, section in (("data", DataConfig), ("evaluate", EvaluateConfig)):
        if name in params:
            section.from_params(params)
    if "export" in params:
        ExportConfig.from_params(params)
    if "train" not in params:
        return
    configs = {name: TrainConfig.from_params(params, name) for name in _presets(params)}
    for name, dataset in train_settings(params).items():
        # a name without a preset: from_params raises with a did-you-mean
        cfg = configs.get(name) or TrainConfig.from_params(params, name)
        if dataset != cfg.dataset:
            raise ParamsError(
                f"params.yaml: train.settings.{name} is {dataset!r}, but the preset trains "
                f"on {cfg.dataset!r}; make them agree"
            )
        if prepare is not None and dataset not in prepare.datasets:
            raise ParamsError(
                f"params.yaml: train.settings.{name} trains on {dataset}, which "
                f"prepare.datasets {list(prepare.datasets)} does not prepare; add it there"
            )
        if prepare is not None and cfg.split not in (None, *prepare.schemes(dataset)):
            raise ParamsError(
                f"{PRESETS_FILE}:{name}.split is {cfg.split!r}, which the prepare stage does "
                f"not prepare for {dataset} ({list(prepare.schemes(dataset))}); add it to "
                "prepare.omniglot.splits in params.yaml"
            )


def _presets(params: dict[str, Any]) -> dict[str, Any]:
    """presets.yaml's presets and a params file's own ``train.presets`` (those win on a name)."""
    train = _section(params, "train")
    return {**(params.get(PRESETS_FILE) or {}), **(train.get("presets") or {})}


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def _section(params: dict[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name)
    if not isinstance(value, dict):
        raise ParamsError(f"params.yaml: section {name!r} is missing or not a mapping")
    return value


class _Fields:
    """``to_dict``: a flat config's fields by name, as params.yaml spells them (MLflow params,
    theta metadata)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataConfig:
    """``data``: where Omniglot comes from and where a user's miniImageNet lies."""

    __pydantic_config__ = _SCHEMA
    mirror: Str | None  # "" in params.yaml = the official release
    miniimagenet_dir: Str | None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DataConfig:
        cfg = _checked(cls, _section(params, "data"), "params.yaml: data")
        return cls((cfg.mirror or "").strip() or None, (cfg.miniimagenet_dir or "").strip() or None)

    def source(self, dataset: str, raw_omniglot: Path) -> Path:
        """Where the prepare stage reads ``dataset`` from: the downloaded Omniglot, or the
        user's miniImageNet folder, which must then be configured."""
        datasets.get(dataset)  # a clear error for a name that is not a data set
        if dataset == "omniglot":
            return raw_omniglot
        if not self.miniimagenet_dir:
            raise ParamsError(
                f"params.yaml: data.miniimagenet_dir is empty but {dataset} is to be prepared; "
                "point it at the images or drop it from prepare.datasets"
            )
        return Path(self.miniimagenet_dir)


# ----------------------------------------------------------------------------- prepare


class Setting(NamedTuple):
    """One N-way K-shot pair; ``{ways: 5, shots: 1}`` in params.yaml, ``(5, 1)`` in code."""

    ways: PosInt
    shots: PosInt


Settings = Annotated[tuple[Setting, ...], Field(min_length=1)]
DatasetName = Literal[datasets.NAMES]  # type: ignore[valid-type]
SplitName = Literal[tuple(datasets.OMNIGLOT.split_sizes)]  # type: ignore[valid-type]


@dataclass(frozen=True)
class EpisodeConfig:
    """``prepare.episodes``: the fixed evaluation episodes."""

    __pydantic_config__ = _SCHEMA
    seed: NonNegInt
    count: PosInt  # test episodes per setting
    val_count: PosInt  # validation episodes per setting
    query: PosInt  # query images per class
    settings: Settings


@dataclass(frozen=True)
class _OmniglotKeys:
    __pydantic_config__ = _SCHEMA
    splits: Annotated[tuple[SplitName, ...], Field(min_length=1)] = ("vinyals",)
    split_seed: NonNegInt = 1
    rotations: Bool = True


@dataclass(frozen=True)
class _MiniImageNetKeys:
    __pydantic_config__ = _SCHEMA
    settings: Settings = (Setting(5, 1), Setting(5, 5))


@dataclass(frozen=True)
class _PrepareKeys:
    """The ``prepare`` section as params.yaml nests it (``PrepareConfig`` is the flat view)."""

    __pydantic_config__ = _SCHEMA
    omniglot: _OmniglotKeys
    miniimagenet: _MiniImageNetKeys
    episodes: EpisodeConfig
    datasets: Annotated[tuple[DatasetName, ...], Field(min_length=1)] = ("omniglot",)


@dataclass(frozen=True)
class PrepareConfig:
    """The checked ``prepare`` section. Image sizes are not here: they are facts of the data set
    (``datasets.py``), shared with the network and the served classifier."""

    splits: tuple[str, ...]  # Omniglot split schemes to prepare, the default first
    split_seed: int
    rotations: bool
    miniimagenet_settings: tuple[tuple[int, int], ...]
    episodes: EpisodeConfig
    datasets: tuple[str, ...] = ("omniglot",)

    def schemes(self, dataset: str) -> tuple[str, ...]:
        """The split schemes prepared for ``dataset``, the default first."""
        return self.splits if dataset == "omniglot" else tuple(datasets.get(dataset).split_sizes)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PrepareConfig:
        """``ParamsError`` names the bad key and why, before any work starts."""
        prep = _section(params, "prepare")
        for sec in ("omniglot", "miniimagenet"):
            if isinstance(prep.get(sec), dict) and "image_size" in prep[sec]:
                raise ParamsError(
                    f"params.yaml: prepare.{sec}.image_size is no longer a setting: the image "
                    "size is a fact of the data set that the network and the served classifier "
                    "share (mamlops/datasets.py); remove the key"
                )
        if isinstance(prep.get("omniglot"), dict) and "split" in prep["omniglot"]:
            raise ParamsError(
                "params.yaml: prepare.omniglot.split is now prepare.omniglot.splits, a list of "
                "split schemes to prepare (the first is the default; a preset picks one with "
                f"split:), e.g. splits: [{prep['omniglot']['split']}]"
            )
        keys = _checked(_PrepareKeys, prep, "params.yaml: prepare")
        if len(set(keys.datasets)) < len(keys.datasets):
            raise ParamsError(
                f"params.yaml: prepare.datasets lists a data set twice: {prep['datasets']}"
            )
        for where, pairs in (
            ("prepare.episodes.settings", keys.episodes.settings),
            ("prepare.miniimagenet.settings", keys.miniimagenet.settings),
        ):
            if len(set(pairs)) < len(pairs):
                raise ParamsError(f"params.yaml: {where} lists a setting twice")
        om, episodes = keys.omniglot, keys.episodes
        if len(set(om.splits)) < len(om.splits):
            raise ParamsError(
                f"params.yaml: prepare.omniglot.splits lists a split twice: {om.splits}"
            )
        for scheme in om.splits:
            # each rotation by 90 degrees is a class of its own, unless the scheme's episodes
            # draw distinct characters
            distinct = scheme in datasets.OMNIGLOT.distinct_character_schemes
            factor = 4 if om.rotations and not distinct else 1
            _check_fits(
                episodes.settings,
                "prepare.episodes.settings",
                episodes.query,
                [n * factor for n in datasets.OMNIGLOT.split_sizes[scheme]],
                datasets.OMNIGLOT,
                f"Omniglot, split {scheme}, rotations {str(om.rotations).lower()}"
                + (", distinct characters" if distinct else ""),
            )
        _check_fits(
            keys.miniimagenet.settings,
            "prepare.miniimagenet.settings",
            episodes.query,
            list(datasets.MINIIMAGENET.split_sizes["ravi"]),
            datasets.MINIIMAGENET,
            "miniImageNet, Ravi split",
        )
        return cls(
            om.splits,
            om.split_seed,
            om.rotations,
            keys.miniimagenet.settings,
            episodes,
            keys.datasets,
        )


def _check_fits(
    settings: tuple[tuple[int, int], ...],
    where: str,
    query: int,
    split_classes: list[int],
    data: datasets.Dataset,
    why: str,
) -> None:
    classes = dict(zip(("train", "val", "test"), split_classes, strict=True))
    for i, (ways, shots) in enumerate(settings):
        for split in ("val", "test"):
            if ways > classes[split]:
                raise ParamsError(
                    f"params.yaml: {where}[{i}].ways = {ways} is larger than the "
                    f"{classes[split]} classes of the {split} split ({why})"
                )
        if shots + query > data.images_per_class:
            raise ParamsError(
                f"params.yaml: {where}[{i}].shots + prepare.episodes.query = {shots} + {query} "
                f"is more than the {data.images_per_class} images per class ({why})"
            )


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

    __pydantic_config__ = _SCHEMA
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

    __pydantic_config__ = _SCHEMA
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
        cfg = _checked(cls, nested, where)
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
        train = _section(params, "train")
        presets = _presets(params)
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
    settings = _section(params, "train").get("settings") or {}
    if not isinstance(settings, dict):
        raise ParamsError("params.yaml: train.settings must map setting names to data sets")
    return dict(settings)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; asking for CUDA without it is a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"device {name!r} asked for, but CUDA is not available; use auto or cpu")
    return torch.device(name)


def hardware(device: str | torch.device | None = None) -> str:
    """One line on what runs this process (CPU model, cores and threads, or GPU; torch), for
    the results table and MLflow tags."""
    import os
    import platform

    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(dev)}, torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    return (
        f"CPU {name} ({cores} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"
    )


# ----------------------------------------------------------------------------- evaluate, export


@dataclass(frozen=True)
class EvaluateConfig(_Fields):
    """``evaluate``: which theta, how many test-time steps, batch size, episodes drawn."""

    __pydantic_config__ = _SCHEMA
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
        return _checked(cls, _section(params, "evaluate"), "params.yaml: evaluate")


DEFAULT_OPSET = 20  # what the dvc-tracked model.onnx files are written with
MIN_OPSET = 18  # the oldest opset the files are checked against (onnxruntime 1.16+ runs it)


@dataclass(frozen=True)
class ExportConfig(_Fields):
    """``export``: the demo classifier, its ONNX opset, and the registry."""

    __pydantic_config__ = _SCHEMA
    checkpoint: ThetaChoice = "best"
    demo_episode: NonNegInt = 0
    opset: Annotated[int, Field(strict=True, ge=MIN_OPSET)] = DEFAULT_OPSET
    register: Bool = True
    alias: Str = "champion"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ExportConfig:
        return _checked(cls, _section(params, "export"), "params.yaml: export")

    def check_demo_episode(self, test_episodes: int) -> None:
        """The demo episode must be one of the prepared test episodes."""
        if self.demo_episode >= test_episodes:
            raise ParamsError(
                f"params.yaml: export.demo_episode = {self.demo_episode} but only "
                f"{test_episodes} test episodes exist"
            )


# ----------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Layout:
    """Where the stages read and write, relative to the project root; ``dvc.yaml`` passes the
    same paths on each stage's command line."""

    root: Path = Path(".")

    @property
    def raw_omniglot(self) -> Path:
        return self.root / "data" / "raw" / "omniglot"

    def prepared(self, dataset: str) -> Path:
        return self.root / "data" / "prepared" / dataset

    def model_dir(self, setting: str) -> Path:
        return self.root / "models" / setting

    def checkpoint_dir(self, setting: str) -> Path:
        return self.root / "checkpoints" / setting

    def metrics(self, stage: str, setting: str) -> Path:
        return self.root / "metrics" / stage / f"{setting}.json"

    def plot(self, kind: str, setting: str) -> Path:
        """``plots/<kind>/<setting>.<ext>``: one folder per chart of dvc.yaml's ``plots:``."""
        ext = {"train": "tsv", "val": "tsv", "eval": "csv", "curves": "png", "episodes": "png"}
        return self.root / "plots" / kind / f"{setting}.{ext[kind]}"

    def results(self, setting: str) -> Path:
        """What an evaluation measured on what (data set, hardware, ...): not metrics."""
        return self.root / "results" / f"{setting}.json"

    def train_paths(self, setting: str, dataset: str) -> tuple[Path, ...]:
        """The train stage's paths, in its command line's order (after the setting)."""
        return (
            self.prepared(dataset),
            self.model_dir(setting),
            self.checkpoint_dir(setting),
            self.metrics("train", setting),
            self.plot("train", setting),
            self.plot("val", setting),
            self.plot("curves", setting),
        )

    def evaluate_paths(self, setting: str, dataset: str) -> tuple[Path, ...]:
        """The evaluate stage's paths, in its command line's order (after the setting)."""
        return (
            self.prepared(dataset),
            self.model_dir(setting),
            self.metrics("eval", setting),
            self.results(setting),
            self.plot("eval", setting),
            self.plot("episodes", setting),
        )

    def export_paths(self, setting: str, dataset: str) -> tuple[Path, ...]:
        """The export stage's paths, in its command line's order (after the setting)."""
        return (
            self.prepared(dataset),
            self.model_dir(setting),
            self.metrics("eval", setting),
            self.metrics("export", setting),
        )

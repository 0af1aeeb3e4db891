"""``params.yaml`` -> typed, frozen, checked configs: the one place its keys are read and named.

Every stage reads its section through one ``*.from_params`` here; the rest of the library takes
these objects and never looks at the YAML. A bad value fails before any work starts with a
``ParamsError`` naming the key and what would work; this is the only module whose messages name
``params.yaml`` keys. DVC tracks the keys each stage lists under ``params:`` in ``dvc.yaml``.

``Layout`` is where the stages read and write by default (the paths ``dvc.yaml`` passes on each
stage's command line; ``tests/test_layout.py`` checks the two agree), so ``mamlops train``
without arguments works on the same files as ``dvc repro``.

No torch here (``resolve_device`` imports it when called): ``download`` and ``prepare`` do not
depend on the network code, so editing ``maml.py`` does not re-run them.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from mamlops import datasets
from mamlops.errors import UserError

if TYPE_CHECKING:
    import torch

PARAMS_FILE = Path("params.yaml")
PRESETS_FILE = "presets.yaml"  # beside the params file: the training presets, by setting name
Strategy = Literal["auto", "loop", "batched"]
THETA_CHOICES = ("best", "final")  # theta_best (highest val accuracy) or theta (last iteration)


class ParamsError(UserError):
    """A params.yaml key is missing or has a value that cannot work; the message says which."""


# ----------------------------------------------------------------------------- reading


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a dict, with the presets of a ``presets.yaml`` beside it under
    the key ``"presets.yaml"``; a clear error when a file is missing or not a mapping.

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
    return data


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


def _require(sec: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``sec[key]`` checked for type; ``where`` is the dotted path used in the message."""
    if key not in sec:
        raise ParamsError(f"params.yaml: {where}.{key} is missing")
    value = sec[key]
    if isinstance(value, bool) and kind in (int, float):
        raise ParamsError(f"params.yaml: {where}.{key} must be a number, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ParamsError(f"params.yaml: {where}.{key} must be {names}, got {value!r}")
    return value


def _int(sec: dict[str, Any], key: str, where: str, minimum: int = 1) -> int:
    value = _require(sec, key, int, where)
    if value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ParamsError(f"params.yaml: {where}.{key} must be {what}, got {value}")
    return value


def _no_unknown(sec: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(sec) - known)
    if unknown:
        raise ParamsError(f"params.yaml: {where}: unknown key(s) {unknown}; known: {sorted(known)}")


def _theta_choice(sec: dict[str, Any], where: str) -> str:
    value = sec.get("checkpoint", "best")
    if value not in THETA_CHOICES:
        raise ParamsError(
            f"params.yaml: {where}.checkpoint must be 'best' or 'final', got {value!r}"
        )
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

    mirror: str | None  # "" in params.yaml = the official release
    miniimagenet_dir: str | None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DataConfig:
        sec = _section(params, "data")
        mirror = _require(sec, "mirror", (str, type(None)), "data")
        mini = _require(sec, "miniimagenet_dir", (str, type(None)), "data")
        return cls((mirror or "").strip() or None, (mini or "").strip() or None)

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


@dataclass(frozen=True)
class EpisodeConfig:
    """``prepare.episodes``: the fixed evaluation episodes."""

    seed: int
    count: int  # test episodes per setting
    val_count: int  # validation episodes per setting
    query: int  # query images per class
    settings: tuple[tuple[int, int], ...]  # (ways, shots)


@dataclass(frozen=True)
class PrepareConfig:
    """The checked ``prepare`` section. Image sizes are not here: they are facts of the data set
    (``datasets.py``), shared with the network and the served classifier."""

    split: str
    split_seed: int
    rotations: bool
    miniimagenet_settings: tuple[tuple[int, int], ...]
    episodes: EpisodeConfig
    datasets: tuple[str, ...] = ("omniglot",)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PrepareConfig:
        """``ParamsError`` names the bad key and why, before any work starts."""
        prep = _section(params, "prepare")
        _no_unknown(prep, {"datasets", "omniglot", "miniimagenet", "episodes"}, "prepare")
        om = _require(prep, "omniglot", dict, "prepare")
        mini = _require(prep, "miniimagenet", dict, "prepare")
        ep = _require(prep, "episodes", dict, "prepare")
        for sec, where, known in (
            (om, "prepare.omniglot", {"split", "split_seed", "rotations"}),
            (mini, "prepare.miniimagenet", {"settings"}),
        ):
            if "image_size" in sec:
                raise ParamsError(
                    f"params.yaml: {where}.image_size is no longer a setting: the image size is "
                    "a fact of the data set that the network and the served classifier share "
                    "(mamlops/datasets.py); remove the key"
                )
            _no_unknown(sec, known, where)

        chosen = tuple(prep.get("datasets", ["omniglot"]) or ())
        if (
            not chosen
            or any(d not in datasets.NAMES for d in chosen)
            or len(set(chosen)) < len(chosen)
        ):
            raise ParamsError(
                f"params.yaml: prepare.datasets must list some of {list(datasets.NAMES)} once "
                f"each, got {prep.get('datasets')!r}"
            )
        split = _require(om, "split", str, "prepare.omniglot")
        schemes = datasets.OMNIGLOT.split_sizes
        if split not in schemes:
            raise ParamsError(
                f"params.yaml: prepare.omniglot.split is {split!r}; expected one of {list(schemes)}"
            )
        split_seed = _int(om, "split_seed", "prepare.omniglot", minimum=0)
        rotations = om.get("rotations", True)
        if not isinstance(rotations, bool):
            raise ParamsError(
                f"params.yaml: prepare.omniglot.rotations must be true or false, got {rotations!r}"
            )
        mini_settings = ((5, 1), (5, 5))
        if "settings" in mini:
            mini_settings = _settings(mini["settings"], "prepare.miniimagenet.settings")
        episodes = EpisodeConfig(
            seed=_int(ep, "seed", "prepare.episodes", minimum=0),
            count=_int(ep, "count", "prepare.episodes"),
            val_count=_int(ep, "val_count", "prepare.episodes"),
            query=_int(ep, "query", "prepare.episodes"),
            settings=_settings(ep.get("settings"), "prepare.episodes.settings"),
        )
        factor = 4 if rotations else 1  # each rotation by 90 degrees is a class of its own
        _check_fits(
            episodes.settings,
            "prepare.episodes.settings",
            episodes.query,
            [n * factor for n in schemes[split]],
            datasets.OMNIGLOT,
            f"Omniglot, split {split}, rotations {str(rotations).lower()}",
        )
        _check_fits(
            mini_settings,
            "prepare.miniimagenet.settings",
            episodes.query,
            list(datasets.MINIIMAGENET.split_sizes["ravi"]),
            datasets.MINIIMAGENET,
            "miniImageNet, Ravi split",
        )
        return cls(split, split_seed, rotations, mini_settings, episodes, chosen)


def _settings(value: Any, where: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or not value:
        raise ParamsError(f"params.yaml: {where} must be a non-empty list of {{ways, shots}}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ParamsError(f"params.yaml: {where}[{i}] must be a mapping {{ways, shots}}")
        out.append((_int(item, "ways", f"{where}[{i}]"), _int(item, "shots", f"{where}[{i}]")))
    if len(set(out)) != len(out):
        raise ParamsError(f"params.yaml: {where} lists a setting twice")
    return tuple(out)


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
    """

    inner_lr: float = 0.4
    inner_steps: int = 1
    first_order: bool = False
    strategy: Strategy = "auto"
    learn_inner_lr: bool = False
    per_step_bn: bool = False
    multi_step_loss: bool = False
    multi_step_anneal_iters: int = 0
    first_order_iters: int = 0


_MAML_KEYS = tuple(f.name for f in fields(MAMLConfig))


@dataclass(frozen=True)
class TrainConfig:
    """One training setting: params.yaml's ``train.common`` under presets.yaml's ``<name>``.

    In params.yaml the keys are flat (``inner_lr`` beside ``meta_batch``); here the inner-loop
    keys form the nested ``maml`` config the algorithm takes. ``to_dict`` flattens it back, so
    MLflow params, theta metadata and checkpoints use the params.yaml key names.
    """

    name: str
    dataset: str
    ways: int
    shots: int
    query: int
    meta_batch: int
    test_inner_steps: int
    meta_lr: float
    iterations: int
    maml: MAMLConfig = field(default_factory=MAMLConfig)
    seed: int = 0
    device: str = "auto"
    amp_bf16: bool = False
    cosine_meta_lr: bool = False
    grad_clip: float = 0.0
    val_every: int = 250
    val_episodes: int = 100
    checkpoint_every: int = 250
    log_every: int = 10

    @classmethod
    def from_flat(cls, values: dict[str, Any], where: str = "train") -> TrainConfig:
        """Build from flat params.yaml-style keys (``where`` names them in messages), checked."""
        own = [f for f in fields(cls) if f.name != "maml"]
        unknown = sorted(set(values) - {f.name for f in own} - set(_MAML_KEYS))
        if unknown:
            known = sorted({f.name for f in own} | set(_MAML_KEYS))
            hints = [difflib.get_close_matches(k, known, n=1) for k in unknown]
            mean = [f"{k} -> {h[0]}" for k, h in zip(unknown, hints, strict=True) if h]
            hint = f" (did you mean {', '.join(mean)}?)" if mean else ""
            raise ParamsError(f"{where}: unknown key(s) {unknown}{hint}")
        required = [f.name for f in own if f.default is MISSING] + ["inner_lr", "inner_steps"]
        missing = sorted(k for k in required if k not in values)
        if missing:
            raise ParamsError(f"{where} is missing {missing}")
        maml_values = {k: values[k] for k in _MAML_KEYS if k in values}
        lr = maml_values["inner_lr"]
        if isinstance(lr, int) and not isinstance(lr, bool):
            maml_values["inner_lr"] = float(lr)  # the algorithm's step size is a float
        maml = MAMLConfig(**maml_values)
        rest = {k: v for k, v in values.items() if k not in _MAML_KEYS}
        cfg = cls(maml=maml, **rest)
        cfg.validate()
        return cfg

    @classmethod
    def from_params(cls, params: dict[str, Any], name: str) -> TrainConfig:
        """Merge ``train.common`` and the preset ``name`` and check them.

        Presets come from presets.yaml (see ``load_params``) and, for a params file of one's
        own, from its ``train.presets`` section; the latter wins on a name both define.
        """
        train = _section(params, "train")
        presets = {**(params.get(PRESETS_FILE) or {}), **(train.get("presets") or {})}
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
        merged = {**(train.get("common") or {}), **presets[name], "name": name}
        return cls.from_flat(merged, f"{PRESETS_FILE}:{name}")

    def validate(self) -> None:
        where = f"{PRESETS_FILE}:{self.name}"  # a value there wins over train.common
        if self.dataset not in datasets.NAMES:
            raise ParamsError(
                f"{where}.dataset must be one of {list(datasets.NAMES)}, got {self.dataset!r}"
            )
        positive = ("ways", "shots", "query", "meta_batch", "iterations", "val_every", "log_every")
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamsError(f"{where}.{key} must be a positive integer, got {value!r}")
        for key, value in (
            ("inner_steps", self.maml.inner_steps),
            ("test_inner_steps", self.test_inner_steps),
            ("checkpoint_every", self.checkpoint_every),
            ("val_episodes", self.val_episodes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ParamsError(f"{where}.{key} must be an integer >= 0, got {value!r}")
        if self.ways < 2:
            raise ParamsError(f"{where}.ways must be at least 2, got {self.ways}")
        for key, value in (("inner_lr", self.maml.inner_lr), ("meta_lr", self.meta_lr)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ParamsError(f"{where}.{key} must be a positive number, got {value!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ParamsError(f"{where}.device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.maml.strategy not in ("auto", "loop", "batched"):
            raise ParamsError(f"{where}.strategy must be auto, loop or batched")

    @property
    def inner_lr(self) -> float:
        return float(self.maml.inner_lr)

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

    checkpoint: str = "best"
    steps: int | None = None  # None: the preset's test_inner_steps
    batch: int = 50
    grid_episodes: int = 3

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EvaluateConfig:
        sec = _section(params, "evaluate")
        _no_unknown(sec, {f.name for f in fields(cls)}, "evaluate")
        steps = sec.get("steps")
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 0
        ):
            raise ParamsError(f"params.yaml: evaluate.steps must be null or >= 0, got {steps!r}")
        # the episode grid is a declared DVC output: always draw at least one episode
        return cls(
            checkpoint=_theta_choice(sec, "evaluate"),
            steps=steps,
            batch=_int(sec, "batch", "evaluate"),
            grid_episodes=_int(sec, "grid_episodes", "evaluate"),
        )


DEFAULT_OPSET = 20  # the dynamo exporter's native opset: no version conversion pass needed
MIN_OPSET = 18  # the dynamo exporter writes nothing older (asked for 7, it silently wrote 18)


@dataclass(frozen=True)
class ExportConfig(_Fields):
    """``export``: the demo classifier, its ONNX opset, and the registry."""

    checkpoint: str = "best"
    demo_episode: int = 0
    opset: int = DEFAULT_OPSET
    register: bool = True
    alias: str = "champion"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ExportConfig:
        sec = _section(params, "export")
        _no_unknown(sec, {f.name for f in fields(cls)}, "export")
        return cls(
            checkpoint=_theta_choice(sec, "export"),
            demo_episode=_int(sec, "demo_episode", "export", minimum=0),
            opset=_int(sec, "opset", "export", minimum=MIN_OPSET),
            register=_require(sec, "register", bool, "export"),
            alias=_require(sec, "alias", str, "export"),
        )

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

"""Reading ``params.yaml`` (and ``presets.yaml`` beside it) and checking it whole.

``load_params`` is how every stage and the CLI read the params file: it checks every section
against the schema (``config.py``) and the sections against each other (``check_params``), so a
typo in ``export`` fails ``dvc repro`` at its first stage rather than after an hour of training.
This and ``config.py`` are the only modules whose messages name ``params.yaml`` keys.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from mamlops.config import (
    PRESETS_FILE,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    PrepareConfig,
    TrainConfig,
    train_settings,
)
from mamlops.errors import ParamsError

PARAMS_FILE = Path("params.yaml")


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
    # the presets that will run: one not in train.settings may not fit train.common (say, its
    # meta_batch over 16 processes) and is checked when a run picks it (its stage, mamlops train)
    for name, dataset in train_settings(params).items():
        # a name without a preset: from_params raises with a did-you-mean
        cfg = TrainConfig.from_params(params, name)
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
                f"prepare.{dataset}.splits in params.yaml"
            )


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 4]
        raise ParamsError(
            f"{path}: not UTF-8 text (byte {exc.start}: {bad!r}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data

"""Files a trained meta-model lives in: theta and the resumable checkpoint.

Out of ``train.py`` so that evaluation, adaptation and serving read a model without importing
the training loop.

* ``theta.safetensors`` / ``theta_best.safetensors``: the meta-parameters (last iteration /
  highest validation accuracy) with the train config as metadata. safetensors, so a file someone
  hands you loads without unpickling; byte-identical for identical runs, so DVC hashes match.
* ``checkpoint.pt``: theta, Adam's moments, the task sampler's RNG state, the step and the best
  theta so far with its step, for a bitwise resume that can always rewrite both theta files
  (DVC deletes a stage's outputs before it runs it). ``resume_key`` says what it was trained
  from: a checkpoint is resumed only when config, prepared data and training code all match.
  Read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
  dicts only, nothing is unpickled into code.

Example::

    theta, meta = load_theta(theta_file(Path("models/omniglot-5w1s"), "best"))
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mamlops import code
from mamlops.config import THETA_CHOICES, TrainConfig
from mamlops.errors import UserError
from mamlops.files import (
    atomic_write,
    files_digest,
    folder_digest,
    read_safetensors,
    write_safetensors,
)
from mamlops.meta.model import Params

CHECKPOINT = "checkpoint.pt"


def training_code() -> list[Path]:
    """The files whose code decides what a training run computes: ``train.py``'s import
    closure less the modules without an effect on outputs (``code.output_code``, the same walk
    that checks dvc.yaml's deps), so no module can be forgotten from a hand-kept list."""
    return code.output_code(code.PACKAGE / "meta" / "train.py")


THETA_FILES = dict(zip(THETA_CHOICES, ("theta_best.safetensors", "theta.safetensors"), strict=True))
THETA_FORMAT = "mamlops-theta-1"


class ModelFileError(UserError):
    """A meta-model file is missing or is not one mamlops wrote; the message says which."""


def theta_file(model_dir: Path, which: str = "best") -> Path:
    """The theta a later stage uses: ``best`` (highest val accuracy) or ``final``."""
    return Path(model_dir) / THETA_FILES[which]


def theta_metadata(cfg: TrainConfig, step: int) -> dict[str, str]:
    """What a theta file says about itself: the train config it came from, its network and the
    iteration it was taken at (JSON with sorted keys, so identical runs write identical bytes)."""
    model_cfg = cfg.network
    return {
        "format": THETA_FORMAT,
        "train_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "model_config": json.dumps(model_cfg.to_dict(), sort_keys=True),
        "step": str(step),
    }


def save_theta(params: Params, path: Path, cfg: TrainConfig, step: int) -> Path:
    """theta as safetensors, written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    return write_safetensors(path, tensors, theta_metadata(cfg, step))


def load_theta(path: Path) -> tuple[Params, dict[str, Any]]:
    """theta and its metadata: ``train_config`` and ``model_config`` parsed, ``step`` an int."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no meta-model here; run the train stage first")
    tensors, metadata = read_safetensors(path, ModelFileError)
    if "train_config" not in metadata or "model_config" not in metadata:
        raise ModelFileError(f"{path}: not a mamlops meta-model (no train_config metadata)")
    meta = {
        "train_config": json.loads(metadata["train_config"]),
        "model_config": json.loads(metadata["model_config"]),
        "step": int(metadata.get("step", -1)),
    }
    return tensors, meta


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The saved training state, or None when there is none yet."""
    if not Path(path).is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def resume_key(cfg: TrainConfig, prepared_dir: Path, device_type: str) -> dict[str, str]:
    """What a training run's result depends on: its config, the prepared data (every file of
    ``prepared_dir``, about 0.1 s for Omniglot) and the training code (``training_code``). A
    checkpoint resumes only a run with the same key, so a changed split or a code fix never
    continues from a state it did not produce; the number of processes is not part of it
    (``distributed``: a checkpoint resumes with another world size). ``device_type`` is: the
    task sampler's generator state is device-specific (a CPU run's cannot drive a CUDA
    generator)."""
    prepared_dir = Path(prepared_dir)
    files = training_code()
    # not the number of processes: every process draws the whole meta-batch's random numbers,
    # so the state is the same whatever the world size and resumes with any other
    config = {k: v for k, v in cfg.to_dict().items() if k != "processes"}
    return {
        "config": json.dumps(config, sort_keys=True),
        "data": folder_digest(prepared_dir),
        "code": files_digest(files, Path(os.path.commonpath(files))),
        "device": device_type,
    }


def resumable_run(checkpoint_dir: Path, key: dict[str, str]) -> str | None:
    """The tracking run (MLflow run id) that a run with ``key`` continues: the one the
    checkpoint in ``checkpoint_dir`` was logged under, when that checkpoint will be resumed. A
    resumed run logs into the interrupted one, so the UI shows one run with its whole history."""
    state = load_checkpoint(Path(checkpoint_dir) / CHECKPOINT)
    if state is None or resume_mismatch(state, key) is not None:
        return None
    return state.get("tracking_run") or None


def resume_mismatch(state: dict[str, Any], key: dict[str, str]) -> str | None:
    """Why a checkpoint cannot be resumed by a run with ``key`` (None when it can)."""
    saved = state.get("key") or {"config": state.get("config")}
    for part, what in (
        ("config", "other train params"),
        ("data", "other prepared data"),
        ("code", "other training code"),
        ("device", "another device type"),
    ):
        if saved.get(part) != key[part]:
            return f"was written with {what}"
    return None

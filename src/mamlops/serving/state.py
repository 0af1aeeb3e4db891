"""The server's shared state: what ``create_app`` loads once and every request reads.

FastAPI's way to share it: ``create_app`` puts it on ``app.state`` and the routes take it
through dependencies (``Depends``) that read ``request.app.state``, so the route modules hold no
state of their own and no closure over the app being built; two apps can live side by side.

The dependencies only read, and never refuse a request themselves: FastAPI solves dependencies
before it validates the query and the form, so a dependency answering "this server does not
teach" would hide the 400 or 422 that a malformed request gets first. The routes refuse
instead, with ``pick`` and ``teaching_on``, as the checks in their bodies always did.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from mamlops.classifier.onnx_predict import OnnxClassifier, OnnxModelError
from mamlops.classifier.teach import ClassifierStore, TeachLimits
from mamlops.serving.schemas import bad

if TYPE_CHECKING:  # torch: only a teaching server loads one
    from mamlops.classifier.adapt import MetaModel


@dataclass(frozen=True)
class Settings:
    """The limits and defaults the server was started with, fixed for its lifetime."""

    max_upload_bytes: int
    default_top_k: int
    limits: TeachLimits


@dataclass(frozen=True)
class Served:
    """The fixed ONNX classifiers by name, and the one ``/predict`` uses without ``?model=``
    (there is one only when a single model is served)."""

    models: Mapping[str, OnnxClassifier]
    default: str | None


@dataclass(frozen=True)
class Teacher:
    """What teaching needs, present only when the server has a meta-model: the meta-model, the
    store its classifiers go to, and the slots bounding how many adapt at once."""

    meta: MetaModel
    store: ClassifierStore
    slots: threading.BoundedSemaphore


def load_models(path: str | Path) -> dict[str, OnnxClassifier]:
    """One classifier for a .onnx file, or one per ``*.onnx`` in a folder, keyed by stem."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.onnx"))
        if not files:
            raise OnnxModelError(f"{path}: no .onnx files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise OnnxModelError(f"{path}: no such ONNX file or folder")
    return {f.stem: OnnxClassifier(f) for f in files}


def pick(served: Served, name: str | None) -> OnnxClassifier:
    """The model a request names, or the only one served: 400 when it must name one, 404 when
    it names none that is served."""
    models = served.models
    if not models:
        raise bad(404, "no fixed models served here; teach one with POST /classifiers")
    if name is None:
        if served.default is None:
            raise bad(400, f"several models served: pass ?model= one of {sorted(models)}")
        return models[served.default]
    if name not in models:
        raise bad(404, f"unknown model {name!r}; available: {sorted(models)}")
    return models[name]


def teaching_on(teacher: Teacher | None) -> Teacher:
    """The teacher, or the 404 of a server started without a meta-model."""
    if teacher is None:
        raise bad(404, "this server does not teach: start it with --meta THETA (a meta-model)")
    return teacher


# ``async``: these only read an attribute, which the event loop does faster than a hop to the
# thread pool (where FastAPI runs a plain ``def`` dependency)


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _served(request: Request) -> Served:
    return request.app.state.served


async def _teacher(request: Request) -> Teacher | None:
    return request.app.state.teacher


ServerSettings = Annotated[Settings, Depends(_settings)]
ServedModels = Annotated[Served, Depends(_served)]
MaybeTeacher = Annotated[Teacher | None, Depends(_teacher)]

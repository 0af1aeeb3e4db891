"""HTTP serving of exported ONNX classifiers (FastAPI + uvicorn, onnxruntime, no torch), and of
classifiers taught on the spot from a meta-model: ``create_app`` builds the app, ``serve`` runs it.

The app is assembled from one router per concern, FastAPI's way: ``predict.py`` (the fixed ONNX
models), ``teach.py`` (teaching, the store of taught classifiers, the page); the JSON they answer
with is ``schemas.py``, the upload limits and image decoding they share ``uploads.py``. What
they share is loaded here once and put on ``app.state`` (``state.py``), which the routes read
through dependencies.

Uploads are FastAPI ``UploadFile`` parameters and every answer is a pydantic model, so
``/docs`` can send images and ``/openapi.json`` describes every body, errors included. Every bad
request gets a 4xx with ``{"detail": "..."}`` saying what was wrong (the handlers below turn
validation and teaching errors into that); nothing a client sends can take the server down.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mamlops.classifier.teach import ClassifierStore, TeachError, TeachLimits
from mamlops.errors import UserError
from mamlops.serving import predict, teach
from mamlops.serving.state import Served, Settings, Teacher, load_models
from mamlops.serving.uploads import (
    DEFAULT_MAX_UPLOAD_BYTES,
    FIELD,
    UploadGate,
    binary_file_fields,
    explain_validation,
)


class ServeError(UserError):
    """The server cannot start: a bad limit, or an address it cannot listen on."""


# ----------------------------------------------------------------------------- the app


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors as the one-line 400 or 422 every other 4xx looks like."""
    body = exc.body
    fields = list(body.keys()) if hasattr(body, "keys") else []
    status, detail = explain_validation(exc.errors(), fields)
    return JSONResponse({"detail": detail}, status_code=status)


async def teach_error(request: Request, exc: TeachError) -> JSONResponse:
    """A ``TeachError`` carries its own status: a support set it cannot teach 400, an unknown
    classifier 404, one over a limit 413."""
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


def create_app(
    model_path: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    default_top_k: int = 5,
    *,
    meta_path: str | Path | None = None,
    store: str | Path = "classifiers",
    limits: TeachLimits | None = None,
) -> FastAPI:
    """Build the app; loads the model(s), their sessions and the meta-model now, so errors
    surface at start-up. ``model_path``: ONNX classifiers to serve as they are; ``meta_path``:
    a meta-model (theta) to teach new ones from, kept under ``store``. Either or both."""
    if max_upload_bytes < 1:
        raise ServeError(f"upload limit must be positive, got {max_upload_bytes} bytes")
    if model_path is None and meta_path is None:
        raise ServeError(
            "nothing to serve: pass ONNX classifiers (a file or folder), or --meta THETA "
            "(e.g. models/omniglot-5w1s/theta_best.safetensors) to teach new ones"
        )
    models = load_models(model_path) if model_path is not None else {}
    limits = limits or TeachLimits()
    teacher = None
    if meta_path is not None:
        from mamlops.classifier.adapt import MetaModel  # torch: only a teaching server needs it

        teacher = Teacher(
            meta=MetaModel.load(meta_path),
            store=ClassifierStore(store, limits.cache_size),
            slots=threading.BoundedSemaphore(limits.max_teaching),
        )
    app = FastAPI(
        title="mamlops classifier",
        version="1",
        description="Few-shot classifiers adapted with MAML, exported to ONNX. "
        f"POST images to /predict as multipart field {FIELD!r}; with a meta-model, teach new "
        "classifiers with POST /classifiers (one form field per class) or at /.",
    )
    app.state.settings = Settings(max_upload_bytes, default_top_k, limits)
    app.state.served = Served(models, next(iter(models)) if len(models) == 1 else None)
    app.state.teacher = teacher

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = binary_file_fields(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(UploadGate, max_upload_bytes=max_upload_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(TeachError, teach_error)  # type: ignore[arg-type]
    app.include_router(predict.router)
    app.include_router(teach.router)
    return app


# ----------------------------------------------------------------------------- running


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), made here rather than by uvicorn so that a taken port or
    an unknown host is one line naming the fix instead of uvicorn's log and exit status 3."""
    if not 0 <= port <= 65535:
        raise ServeError(f"port {port} is out of range; pass --port between 1 and 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServeError(
            f"cannot listen on {host!r}: {exc.strerror or exc}; check --host"
        ) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
            "(or stop what uses it)"
        ) from None
    sock.set_inheritable(True)
    return sock


def serve(
    path: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    *,
    meta_path: str | Path | None = None,
    store: str | Path = "classifiers",
    limits: TeachLimits | None = None,
) -> None:
    """Run the app with uvicorn until interrupted (binds to localhost unless told otherwise;
    port 0 takes a free one, which the start-up log names)."""
    import uvicorn

    app = create_app(
        path, max_upload_bytes=max_upload_bytes, meta_path=meta_path, store=store, limits=limits
    )
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    served, teacher = app.state.served, app.state.teacher
    what = [", ".join(sorted(served.models))] if served.models else []
    if teacher is not None:
        what.append(
            f"teaching from {teacher.meta.path} into {teacher.store.root}/ "
            f"(page: http://{shown}:{bound}/)"
        )
    print(
        f"serving {'; '.join(what)} on http://{shown}:{bound} "
        f"(API docs: http://{shown}:{bound}/docs)",
        file=sys.stderr,
        flush=True,
    )
    if meta_path is not None:
        import torch

        # One thread per adaptation: an adaptation's convs are too small to split (5-way
        # 1-shot, 10 steps: 41 ms on 1 thread), while two OpenMP threads started from the
        # server's worker threads took 110 ms, and one thread each lets two clients teach at
        # once on two cores (docs/serving.md).
        torch.set_num_threads(1)
    config = uvicorn.Config(app, host=host, port=bound)
    uvicorn.Server(config).run(sockets=[sock])

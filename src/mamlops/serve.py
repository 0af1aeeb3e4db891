"""HTTP serving of exported ONNX classifiers (FastAPI + uvicorn, onnxruntime, no torch).

One onnxruntime session per model, created when the app is built, shared by all requests
(``InferenceSession.run`` is thread-safe; inference runs in the thread pool so the event loop
keeps answering ``/health``). Given a folder, every ``*.onnx`` in it is served, by file stem.

Uploads are FastAPI ``UploadFile`` parameters and every answer is a pydantic model, so
``/docs`` can send images and ``/openapi.json`` describes every body, errors included. Every bad
request gets a 4xx with ``{"detail": "..."}`` saying what was wrong; nothing a client sends can
take the server down.

Uploads are capped *before* FastAPI parses the form (``UploadGate``): Content-Length is checked
first, and the body is counted while it is read, so a chunked upload cannot bypass the limit and
no request holds more than the limit in memory. The gate also answers the two mistakes a form
parser would misreport (not multipart: 415; empty body: 400).
"""

from __future__ import annotations

import copy
import io
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mamlops.errors import UserError
from mamlops.onnx_predict import OnnxClassifier, OnnxModelError

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
FIELD = "files"
MAX_FILES = 256
MAX_PIXELS = 4096 * 4096  # checked before decoding: a small PNG can inflate to gigabytes


class ServeError(UserError):
    """The server cannot start: a bad limit, or an address it cannot listen on."""


# ----------------------------------------------------------------------------- response models
# What /openapi.json publishes: the field names are the JSON a client gets, so a change here is
# a change of the API.


class ErrorResponse(BaseModel):
    """Every 4xx body: one line naming the problem and, where there is one, the fix."""

    detail: str = Field(examples=["q0.png: not a readable image (UnidentifiedImageError)"])


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    models: list[str] = Field(description="names of the served models (file stems)")


class ClassProbability(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    filename: str = Field(description="the upload's file name, as sent")
    label: str = Field(description="the most likely class")
    probability: float = Field(description="its probability")
    probabilities: dict[str, float] = Field(description="every class's probability, by label")
    top_k: list[ClassProbability] = Field(description="the k most likely, most likely first")


class PredictResponse(BaseModel):
    model: str = Field(description="the model that answered")
    model_sha256: str = Field(description="SHA-256 of its ONNX file")
    predictions: list[Prediction] = Field(description="one per uploaded image, in upload order")


class InputSpec(BaseModel):
    name: str
    shape: list[str | int] = Field(examples=[["batch", 1, 28, 28]])
    dtype: str
    normalisation: dict[str, Any]


class OutputSpec(BaseModel):
    name: str
    shape: list[str | int] = Field(examples=[["batch", 5]])


class ModelMetadata(BaseModel):
    """``OnnxClassifier.metadata()``: labels, input spec and provenance of one served file."""

    name: str
    labels: list[str]
    dataset: str
    input: InputSpec
    output: OutputSpec
    model_sha256: str
    meta_model_sha256: str | None
    params: dict[str, Any]
    mamlops_version: str | None
    opset: str | None


class ModelList(BaseModel):
    models: list[ModelMetadata]
    default: str | None = Field(description="the model /predict uses without ?model=, if one")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in [
        (400, "bad upload or parameters (not an image, no 'files' field, top_k < 1, ...)"),
        (404, "unknown model"),
        (413, "upload, file count or image dimensions over the limit"),
        (415, "not a multipart/form-data request"),
        (422, "a query or path parameter of the wrong type"),
    ]
}


# ----------------------------------------------------------------------------- models


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


def _bad(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


# ----------------------------------------------------------------------------- upload gate


async def _read_capped(headers: Headers, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing (413) as soon as it is known to exceed ``limit``: by
    Content-Length before reading anything, else by counting while reading."""
    ctype = headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise _bad(415, f"expected multipart/form-data with field {FIELD!r}, got {ctype!r}")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _bad(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            raise _bad(400, "request body ended early")
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise _bad(413, f"upload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    if not size:
        raise _bad(400, f"empty request body: send images as multipart field {FIELD!r}")
    return b"".join(chunks)


def takes_uploads(method: str, path: str) -> bool:
    """The requests ``UploadGate`` checks: POSTs to ``/predict`` and ``/models/NAME/predict``
    (any other POST is a 404 or 405 that FastAPI answers itself)."""
    named = path.startswith("/models/") and path.endswith("/predict")
    return method == "POST" and (path == "/predict" or named)


class UploadGate:
    """ASGI middleware in front of the upload routes: reads the body under the size cap and
    hands it on only when it is a non-empty multipart body within the cap.

    Why not leave it to FastAPI: its form parser spools any size to disk before the endpoint
    runs, and a chunked body that is garbage *and* too large would get the parser's 400, not
    the 413 that says what to change.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int) -> None:
        self.app = app
        self.limit = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not takes_uploads(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_capped(Headers(scope=scope), receive, self.limit)
        except HTTPException as exc:
            response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # the body is gone: later reads wait for the disconnect, as usual
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------- request checks


def explain_validation(errors: Sequence[Any], form_fields: Sequence[str]) -> tuple[int, str]:
    """(status, one line) for FastAPI's validation errors, whose own body is a list of dicts.
    A missing or non-file ``files`` field is a malformed upload: 400, naming the fields that
    were sent. Anything else (a query parameter of the wrong type) is 422, naming it."""
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if loc[:2] == ("body", FIELD):
            if err.get("type") == "missing":
                return 400, f"no {FIELD!r} field in the form; got fields {sorted(set(form_fields))}"
            return 400, f"field {FIELD!r} must carry files, not plain text values"
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ())]
    where = f"{loc[0]} parameter {'.'.join(loc[1:])}" if len(loc) > 1 else "request"
    return 422, f"{where}: {first.get('msg', 'invalid value')}"


def binary_file_fields(openapi: dict[str, Any]) -> dict[str, Any]:
    """The schema with ``format: binary`` beside every upload's ``contentMediaType``: FastAPI
    writes file fields the OpenAPI 3.1 way only, and Swagger UI (``/docs``) offers a file
    picker for the items of a list of files only when they say ``format: binary``
    (swagger-ui issue 10825)."""
    out = copy.deepcopy(openapi)
    for body in out.get("components", {}).get("schemas", {}).values():
        for prop in body.get("properties", {}).values():
            for node in (prop, prop.get("items", {})):
                if node.get("contentMediaType") == "application/octet-stream":
                    node["format"] = "binary"
    return out


# Full-size decoded images alive at once in this process: each request decodes one image at a
# time and shrinks it to the model's input before the next, and at most this many requests
# decode at the same time, so the peak is about DECODE_SLOTS x MAX_PIXELS x 4 bytes (268 MB),
# whatever the number of images per request or of concurrent clients.
DECODE_SLOTS = 2
_decoding = threading.BoundedSemaphore(DECODE_SLOTS)


def _decode(uploads: list[tuple[str, bytes]], clf: OnnxClassifier) -> np.ndarray:
    """Every upload decoded and preprocessed to the model's input [N, C, H, W], one at a time:
    a truncated or non-image file is a 400 here, an oversized one a 413 before decoding."""
    rows = []
    for name, data in uploads:
        if not data:
            raise _bad(400, f"{name}: empty file")
        try:
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > MAX_PIXELS:
                raise _bad(413, f"{name}: {im.width}x{im.height} image is too large to decode")
            with _decoding:
                im.load()
                rows.append(clf.preprocess([im]))
            del im
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise _bad(400, f"{name}: not a readable image ({type(exc).__name__})") from exc
        except UserError as exc:  # preprocess.ImageError: a mode or shape it cannot convert
            raise _bad(400, f"{name}: {exc}") from exc
    return np.concatenate(rows)


# ----------------------------------------------------------------------------- the app

Files = Annotated[
    list[UploadFile],
    File(description=f"one or more images (PNG, JPEG, ...), each as a part named {FIELD!r}"),
]
TopK = Annotated[
    int | None, Query(description="classes listed per image, most likely first (default 5)")
]


def create_app(
    model_path: str | Path,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    default_top_k: int = 5,
) -> FastAPI:
    """Build the app; loads the model(s) and their sessions now, so errors surface at start-up."""
    if max_upload_bytes < 1:
        raise ServeError(f"upload limit must be positive, got {max_upload_bytes} bytes")
    models = load_models(model_path)
    default = next(iter(models)) if len(models) == 1 else None
    app = FastAPI(
        title="mamlops classifier",
        version="1",
        description="Few-shot classifiers adapted with MAML, exported to ONNX. "
        f"POST images to /predict as multipart field {FIELD!r}.",
    )
    app.state.models = models

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = binary_file_fields(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(UploadGate, max_upload_bytes=max_upload_bytes)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = exc.body
        fields = list(body.keys()) if hasattr(body, "keys") else []
        status, detail = explain_validation(exc.errors(), fields)
        return JSONResponse({"detail": detail}, status_code=status)

    def pick(name: str | None) -> OnnxClassifier:
        if name is None:
            if default is None:
                raise _bad(400, f"several models served: pass ?model= one of {sorted(models)}")
            return models[default]
        if name not in models:
            raise _bad(404, f"unknown model {name!r}; available: {sorted(models)}")
        return models[name]

    async def predict(
        files: list[UploadFile], name: str | None, top_k: int | None
    ) -> PredictResponse:
        clf = pick(name)
        k = default_top_k if top_k is None else top_k
        if k < 1:
            raise _bad(400, "top_k must be at least 1")
        uploads = [(f.filename or "upload", await f.read()) for f in files]
        x = await run_in_threadpool(_decode, uploads, clf)
        preds = clf.describe(await run_in_threadpool(clf.predict_array, x), k)
        return PredictResponse(
            model=clf.name,
            model_sha256=clf.sha256,
            predictions=[
                Prediction(filename=filename, **pred)
                for (filename, _), pred in zip(uploads, preds, strict=True)
            ],
        )

    limits = {"max_files": MAX_FILES}

    @app.get("/health")
    def health() -> Health:
        """Liveness, and which models this server answers for."""
        return Health(status="ok", models=sorted(models))

    @app.get("/models")
    def list_models() -> ModelList:
        """Metadata of every served model, and the one /predict uses by default."""
        return ModelList(models=[m.metadata() for m in models.values()], default=default)

    @app.get("/metadata", responses=ERRORS)
    def metadata(model: str | None = None) -> ModelMetadata:
        """Labels, input spec and provenance of ``model`` (or of the only one served)."""
        return ModelMetadata(**pick(model).metadata())

    @app.get("/models/{name}/metadata", responses=ERRORS)
    def model_metadata(name: str) -> ModelMetadata:
        """Labels, input spec and provenance of the model ``name``."""
        return ModelMetadata(**pick(name).metadata())

    @app.post("/predict", responses=ERRORS, form_limits=limits)
    async def predict_default(
        files: Files, model: str | None = None, top_k: TopK = None
    ) -> PredictResponse:
        """Classify one or more uploaded images with ``model`` (or the only one served)."""
        return await predict(files, model, top_k)

    @app.post("/models/{name}/predict", responses=ERRORS, form_limits=limits)
    async def predict_named(files: Files, name: str, top_k: TopK = None) -> PredictResponse:
        """Classify one or more uploaded images with the model ``name``."""
        return await predict(files, name, top_k)

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
    path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> None:
    """Run the app with uvicorn until interrupted (binds to localhost unless told otherwise;
    port 0 takes a free one, which the start-up log names)."""
    import uvicorn

    app = create_app(path, max_upload_bytes=max_upload_bytes)
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {', '.join(sorted(app.state.models))} on http://{shown}:{bound} "
        f"(API docs: http://{shown}:{bound}/docs)",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, host=host, port=bound)
    uvicorn.Server(config).run(sockets=[sock])

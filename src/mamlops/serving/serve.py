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

Given a meta-model (``--meta``), the server also teaches: ``POST /classifiers`` adapts it to
the labelled images of the request (``teach.py``: the code of ``mamlops adapt``), stores the
ONNX classifier under an id made from its content, and ``/classifiers/{id}/predict`` uses it.
Adaptation runs in the thread pool, at most ``TeachLimits.max_teaching`` at once (then 429
with Retry-After), so ``/health`` and other clients' predictions keep answering meanwhile.
``/`` is a page that does all of it in a browser (``resources/teach.html``).
"""

from __future__ import annotations

import copy
import io
import socket
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.datastructures import UploadFile as FormFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mamlops.classifier.onnx_predict import OnnxClassifier, OnnxModelError
from mamlops.classifier.teach import (
    ZIP_MAGIC,
    ClassifierStore,
    TeachError,
    TeachLimits,
    teach,
    zip_support,
)
from mamlops.data import preprocess
from mamlops.errors import UserError

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
    teaching: bool = Field(description="whether POST /classifiers teaches (a meta-model is loaded)")


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


class MetaModelInfo(BaseModel):
    """The meta-model the server teaches from, and what one teaching request may carry."""

    name: str = Field(description="its file name")
    sha256: str
    setting: str | None = Field(description="the DVC setting it was trained as")
    dataset: str
    ways: int = Field(description="the most classes one classifier can have")
    image_size: int
    channels: int
    steps: int = Field(description="inner steps of each adaptation")
    lr: float = Field(description="their learning rate")
    max_shots: int = Field(description="images per class, at most")
    max_upload_bytes: int
    max_pixels: int = Field(description="pixels per image, at most")


class SupportClass(BaseModel):
    label: str
    images: list[str] = Field(description="URLs of the support images, as the network saw them")


class ClassifierInfo(BaseModel):
    id: str = Field(description="first 16 hex digits of the ONNX file's SHA-256")
    labels: list[str]
    created: str = Field(description="when it was stored (UTC, ISO 8601)")
    predict_url: str
    model_sha256: str
    meta_model_sha256: str | None
    support: list[SupportClass]
    provenance: dict[str, Any] = Field(description="how it was adapted: steps, lr, shots, ...")


class TaughtClassifier(ClassifierInfo):
    new: bool = Field(description="false when the same classifier had been taught before")
    teach_ms: float = Field(description="adaptation and ONNX export, in milliseconds")


class ClassifierList(BaseModel):
    classifiers: list[ClassifierInfo] = Field(description="the most recently taught first")
    total: int = Field(description="how many the store holds")


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
TEACH_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorResponse, "description": "unknown classifier, or teaching is off"},
    429: {"model": ErrorResponse, "description": "busy teaching: retry after Retry-After s"},
}
# POST /classifiers has one form field per class, named by its label: OpenAPI says so here
TEACH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": "one field per class, named by the label, with its images; "
                    "or a single field holding a zip of class folders (label/image.png)",
                    "additionalProperties": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                    },
                }
            }
        },
    }
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
    """The requests ``UploadGate`` checks: POSTs to ``/predict``, ``/models/NAME/predict``,
    ``/classifiers`` and ``/classifiers/ID/predict`` (any other POST is a 404 or 405 that
    FastAPI answers itself)."""
    named = path.startswith(("/models/", "/classifiers/")) and path.endswith("/predict")
    return method == "POST" and (path in ("/predict", "/classifiers") or named)


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


def _decode(uploads: list[tuple[str, bytes]], dataset: str) -> np.ndarray:
    """Every upload decoded and resized to the dataset's ``uint8`` images, one at a time: a
    truncated or non-image file is a 400 here, an oversized one a 413 before decoding."""
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
                rows.append(preprocess.read_image(im, dataset))
            del im
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise _bad(400, f"{name}: not a readable image ({type(exc).__name__})") from exc
        except UserError as exc:  # preprocess.ImageError: a mode or shape it cannot convert
            raise _bad(400, f"{name}: {exc}") from exc
    return np.stack(rows)


async def read_support(form: Any, max_images: int, max_bytes: int) -> dict[str, list[tuple]]:
    """``{label: [(file name, bytes)]}`` from a teaching form: one field per class, named by
    the label, in the order sent; or a single field holding a zip of class folders (which
    ``max_images`` bounds; the form's own count is bounded by its parser)."""
    items = list(form.multi_items())
    texts = sorted({key for key, value in items if not isinstance(value, FormFile)})
    if texts:
        raise _bad(400, f"form field(s) {texts} carry text, not image files")
    if not items:
        raise _bad(400, "no images: send one form field per class, named by its label")
    support: dict[str, list[tuple]] = {}
    for key, upload in items:
        support.setdefault(key, []).append((upload.filename or key, await upload.read()))
    if len(items) == 1:  # one class is no classifier: a single file may be a zip of them
        _, data = support[items[0][0]][0]
        if data.startswith(ZIP_MAGIC):
            return zip_support(data, max_images, max_bytes)
    return support


# ----------------------------------------------------------------------------- the app

Files = Annotated[
    list[UploadFile],
    File(description=f"one or more images (PNG, JPEG, ...), each as a part named {FIELD!r}"),
]
TopK = Annotated[
    int | None, Query(description="classes listed per image, most likely first (default 5)")
]


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
    default = next(iter(models)) if len(models) == 1 else None
    limits = limits or TeachLimits()
    meta = store_ = None
    if meta_path is not None:
        from mamlops.classifier.adapt import MetaModel  # torch: only a teaching server needs it

        meta = MetaModel.load(meta_path)
        store_ = ClassifierStore(store, limits.cache_size)
    teaching = threading.BoundedSemaphore(limits.max_teaching)
    app = FastAPI(
        title="mamlops classifier",
        version="1",
        description="Few-shot classifiers adapted with MAML, exported to ONNX. "
        f"POST images to /predict as multipart field {FIELD!r}; with a meta-model, teach new "
        "classifiers with POST /classifiers (one form field per class) or at /.",
    )
    app.state.models = models
    app.state.meta = meta
    app.state.store = store_

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

    @app.exception_handler(TeachError)
    async def teach_error(request: Request, exc: TeachError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def pick(name: str | None) -> OnnxClassifier:
        if not models:
            raise _bad(404, "no fixed models served here; teach one with POST /classifiers")
        if name is None:
            if default is None:
                raise _bad(400, f"several models served: pass ?model= one of {sorted(models)}")
            return models[default]
        if name not in models:
            raise _bad(404, f"unknown model {name!r}; available: {sorted(models)}")
        return models[name]

    def the_store() -> ClassifierStore:
        if store_ is None:
            raise _bad(404, "this server does not teach: start it with --meta THETA (a meta-model)")
        return store_

    async def predict(
        files: list[UploadFile], clf: OnnxClassifier, top_k: int | None, name: str | None = None
    ) -> PredictResponse:
        k = default_top_k if top_k is None else top_k
        if k < 1:
            raise _bad(400, "top_k must be at least 1")
        uploads = [(f.filename or "upload", await f.read()) for f in files]
        x = await run_in_threadpool(lambda: clf.to_input(_decode(uploads, clf.dataset)))
        preds = clf.describe(await run_in_threadpool(clf.predict_array, x), k)
        return PredictResponse(
            model=name or clf.name,
            model_sha256=clf.sha256,
            predictions=[
                Prediction(filename=filename, **pred)
                for (filename, _), pred in zip(uploads, preds, strict=True)
            ],
        )

    def info(cid: str) -> ClassifierInfo:
        st = the_store()
        facts = st.info(cid)
        created = datetime.fromtimestamp(st.created(cid), UTC).isoformat(timespec="seconds")
        base = f"/classifiers/{cid}"
        return ClassifierInfo(
            id=cid,
            labels=facts["labels"],
            created=created,
            predict_url=f"{base}/predict",
            model_sha256=facts["model_sha256"],
            meta_model_sha256=facts.get("meta_model_sha256"),
            support=[
                SupportClass(label=label, images=[f"{base}/support/{n}" for n in names])
                for label, names in zip(facts["labels"], facts["support"], strict=True)
            ],
            provenance=facts["provenance"],
        )

    limits_ = {"max_files": MAX_FILES}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        """The teaching page: draw or upload a few images per class, teach, then predict."""
        html = resources.files("mamlops").joinpath("resources/teach.html").read_text("utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    def health() -> Health:
        """Liveness, which models this server answers for, and whether it teaches."""
        return Health(status="ok", models=sorted(models), teaching=meta is not None)

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

    @app.post("/predict", responses=ERRORS, form_limits=limits_)
    async def predict_default(
        files: Files, model: str | None = None, top_k: TopK = None
    ) -> PredictResponse:
        """Classify one or more uploaded images with ``model`` (or the only one served)."""
        return await predict(files, pick(model), top_k)

    @app.post("/models/{name}/predict", responses=ERRORS, form_limits=limits_)
    async def predict_named(files: Files, name: str, top_k: TopK = None) -> PredictResponse:
        """Classify one or more uploaded images with the model ``name``."""
        return await predict(files, pick(name), top_k)

    @app.get("/meta-model", responses=TEACH_ERRORS)
    def meta_model() -> MetaModelInfo:
        """The meta-model new classifiers are taught from, and the limits of one request."""
        the_store()
        assert meta is not None
        return MetaModelInfo(
            name=meta.path.name,
            sha256=meta.sha256,
            setting=meta.train_config.get("name"),
            dataset=meta.dataset,
            ways=meta.ways,
            image_size=meta.model_cfg.image_size,
            channels=meta.model_cfg.in_channels,
            steps=meta.steps,
            lr=meta.lr,
            max_shots=limits.max_shots,
            max_upload_bytes=max_upload_bytes,
            max_pixels=MAX_PIXELS,
        )

    @app.post(
        "/classifiers",
        status_code=201,
        responses=TEACH_ERRORS | {200: {"model": TaughtClassifier, "description": "taught before"}},
        openapi_extra=TEACH_BODY,
    )
    async def teach_classifier(request: Request, response: Response) -> TaughtClassifier:
        """Teach a classifier: adapt the meta-model to the images sent, one form field per
        class named by its label (or one zip of class folders), and store it. 201 with its
        id; 200 when the same images had taught it before."""
        st = the_store()
        assert meta is not None
        max_images = meta.ways * limits.max_shots
        if not teaching.acquire(blocking=False):
            return JSONResponse(  # type: ignore[return-value]
                {
                    "detail": f"busy: {limits.max_teaching} classifiers are being taught "
                    "now (the server's --max-teaching); retry in a second"
                },
                status_code=429,
                headers={"Retry-After": "1"},
            )
        try:
            try:
                form = await request.form(max_files=max_images, max_fields=max_images)
            except StarletteHTTPException as exc:  # the parser's own count limit: name ours
                if "Too many" in str(exc.detail):
                    raise _bad(413, f"over {max_images} images; at most {max_images}") from None
                raise
            support = await read_support(form, max_images, max_upload_bytes)

            def run() -> tuple:
                images = {label: _decode(files, meta.dataset) for label, files in support.items()}
                taught = teach(meta, images, limits)
                return taught, *st.put(taught)

            taught, cid, new = await run_in_threadpool(run)
        finally:
            teaching.release()
        response.status_code = 201 if new else 200
        response.headers["Location"] = f"/classifiers/{cid}"
        return TaughtClassifier(**info(cid).model_dump(), new=new, teach_ms=1000 * taught.seconds)

    @app.get("/classifiers", responses=TEACH_ERRORS)
    def list_classifiers(
        limit: Annotated[int, Query(ge=1, le=1000, description="at most this many")] = 100,
        offset: Annotated[int, Query(ge=0, description="skip the newest this many")] = 0,
    ) -> ClassifierList:
        """The taught classifiers, the most recent first, a page at a time."""
        ids = the_store().ids()
        page = [info(cid) for cid in ids[offset : offset + limit]]
        return ClassifierList(classifiers=page, total=len(ids))

    @app.get("/classifiers/{cid}", responses=TEACH_ERRORS)
    def get_classifier(cid: str) -> ClassifierInfo:
        """Labels, support images and provenance of one taught classifier."""
        return info(cid)

    @app.delete("/classifiers/{cid}", status_code=204, responses=TEACH_ERRORS)
    def delete_classifier(cid: str) -> Response:
        """Forget a taught classifier (its files and its loaded session)."""
        the_store().delete(cid)
        return Response(status_code=204)

    @app.get("/classifiers/{cid}/support/{name}", responses=TEACH_ERRORS)
    def support_image(cid: str, name: str) -> Response:
        """One support image as the network saw it (PNG)."""
        return Response(the_store().support_png(cid, name), media_type="image/png")

    @app.post("/classifiers/{cid}/predict", responses=TEACH_ERRORS, form_limits=limits_)
    async def predict_taught(files: Files, cid: str, top_k: TopK = None) -> PredictResponse:
        """Classify one or more uploaded images with the taught classifier ``cid``."""
        clf = await run_in_threadpool(the_store().get, cid)
        return await predict(files, clf, top_k, cid)

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
    what = [", ".join(sorted(app.state.models))] if app.state.models else []
    if app.state.meta is not None:
        what.append(
            f"teaching from {app.state.meta.path} into {app.state.store.root}/ "
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

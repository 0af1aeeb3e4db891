"""HTTP serving of exported ONNX classifiers (FastAPI + uvicorn, onnxruntime, no torch).

One onnxruntime session per model, created when the app is built, shared by all requests
(``InferenceSession.run`` is thread-safe; inference runs in the thread pool so the event loop
keeps answering ``/health``). Given a folder, every ``*.onnx`` in it is served, by file stem.

Every bad request gets a 4xx with ``{"detail": "..."}`` saying what was wrong; nothing a client
sends can take the server down. Uploads are capped: Content-Length is checked first and the
body is counted while read, so a chunked upload cannot bypass the limit.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request as StarletteRequest

from mamlops.onnx_predict import OnnxClassifier, OnnxModelError

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
FIELD = "files"
MAX_FILES = 256
MAX_PIXELS = 4096 * 4096  # checked before decoding: a small PNG can inflate to gigabytes


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


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _bad(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _bad(413, f"upload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _uploads(request: Request, limit: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every part named ``files``; 4xx with the reason otherwise."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise _bad(415, f"expected multipart/form-data with field {FIELD!r}, got {ctype!r}")
    body = await _read_body(request, limit)
    if not body:
        raise _bad(400, "empty request body: send images as multipart field 'files'")

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await StarletteRequest(request.scope, replay).form(max_files=MAX_FILES)
    except Exception as exc:  # multipart errors come in several types; all are client errors
        raise _bad(400, f"malformed multipart body: {exc}") from exc
    parts = form.getlist(FIELD)
    if not parts:
        raise _bad(400, f"no {FIELD!r} field in the form; got fields {sorted(set(form.keys()))}")
    out = []
    for part in parts:
        if not isinstance(part, UploadFile):
            raise _bad(400, f"field {FIELD!r} must carry files, not plain text values")
        out.append((part.filename or "upload", await part.read()))
    return out


def _decode(uploads: list[tuple[str, bytes]]) -> list[Image.Image]:
    """Decode every upload fully now, so a truncated or non-image file is a 400 here."""
    images = []
    for name, data in uploads:
        if not data:
            raise _bad(400, f"{name}: empty file")
        try:
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > MAX_PIXELS:
                raise _bad(413, f"{name}: {im.width}x{im.height} image is too large to decode")
            im.load()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise _bad(400, f"{name}: not a readable image ({type(exc).__name__})") from exc
        images.append(im)
    return images


def create_app(
    model_path: str | Path,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    default_top_k: int = 5,
) -> FastAPI:
    """Build the app; loads the model(s) and their sessions now, so errors surface at start-up."""
    models = load_models(model_path)
    default = next(iter(models)) if len(models) == 1 else None
    app = FastAPI(title="mamlops classifier", version="1")
    app.state.models = models

    def pick(name: str | None) -> OnnxClassifier:
        if name is None:
            if default is None:
                raise _bad(400, f"several models served: pass ?model= one of {sorted(models)}")
            return models[default]
        if name not in models:
            raise _bad(404, f"unknown model {name!r}; available: {sorted(models)}")
        return models[name]

    async def predict(request: Request, name: str | None, top_k: int | None) -> dict[str, Any]:
        clf = pick(name)
        k = default_top_k if top_k is None else top_k
        if k < 1:
            raise _bad(400, "top_k must be at least 1")
        uploads = await _uploads(request, max_upload_bytes)
        images = await run_in_threadpool(_decode, uploads)
        try:
            preds = await run_in_threadpool(clf.predict_images, images, k)
        except ValueError as exc:
            raise _bad(400, f"could not preprocess the images: {exc}") from exc
        for (filename, _), pred in zip(uploads, preds, strict=True):
            pred["filename"] = filename
        return {"model": clf.name, "model_sha256": clf.sha256, "predictions": preds}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": sorted(models)}

    @app.get("/models")
    def list_models() -> dict[str, Any]:
        return {"models": [m.metadata() for m in models.values()], "default": default}

    @app.get("/metadata")
    def metadata(model: str | None = None) -> dict[str, Any]:
        return pick(model).metadata()

    @app.get("/models/{name}/metadata")
    def model_metadata(name: str) -> dict[str, Any]:
        return pick(name).metadata()

    @app.post("/predict")
    async def predict_default(
        request: Request, model: str | None = None, top_k: int | None = None
    ) -> dict[str, Any]:
        return await predict(request, model, top_k)

    @app.post("/models/{name}/predict")
    async def predict_named(request: Request, name: str, top_k: int | None = None) -> dict:
        return await predict(request, name, top_k)

    return app


def serve(
    path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> None:
    """Run the app with uvicorn until interrupted (binds to localhost unless told otherwise)."""
    import uvicorn

    uvicorn.run(create_app(path, max_upload_bytes=max_upload_bytes), host=host, port=port)

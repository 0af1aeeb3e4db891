"""Uploads: what a request may carry, and turning its parts into images.

Uploads are capped *before* FastAPI parses the form (``UploadGate``): Content-Length is checked
first, and the body is counted while it is read, so a chunked upload cannot bypass the limit and
no request holds more than the limit in memory. The gate also answers the two mistakes a form
parser would misreport (not multipart: 415; empty body: 400). ``explain_validation`` turns
FastAPI's validation errors into the one-line ``{"detail": ...}`` every other 4xx has.

Apart from the routes because the predicting and the teaching routes share all of it: the same
limits, the same decoding (one image at a time, under ``DECODE_SLOTS``), the same errors.
"""

from __future__ import annotations

import copy
import io
import threading
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from fastapi import File, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers
from starlette.datastructures import UploadFile as FormFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mamlops.classifier.teach import ZIP_MAGIC, zip_support
from mamlops.data import preprocess
from mamlops.errors import UserError
from mamlops.serving.schemas import bad

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
FIELD = "files"
MAX_FILES = 256
MAX_PIXELS = 4096 * 4096  # checked before decoding: a small PNG can inflate to gigabytes
# the form parser's own cap on the parts of a predict request (the byte cap is UploadGate's)
FORM_LIMITS = {"max_files": MAX_FILES}


# ----------------------------------------------------------------------------- upload gate


def size_text(n: int) -> str:
    """``10485760`` -> ``10 MB``, ``65536`` -> ``64 KB``: sizes as a person reads them (the
    limit is set in MB, ``--max-upload-mb``), not a raw byte count."""
    return f"{n / 2**20:.3g} MB" if n >= 2**20 else f"{n / 2**10:.3g} KB"


async def _read_capped(headers: Headers, receive: Receive, limit: int, wanted: str) -> bytes:
    """The whole request body, refusing (413) as soon as it is known to exceed ``limit``: by
    Content-Length before reading anything, else by counting while reading. ``wanted`` says
    what the route expects, for the messages."""
    ctype = headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise bad(415, f"expected multipart/form-data with {wanted}, got {ctype!r}")
    declared = headers.get("content-length")
    too_big = f"exceeds the limit of {size_text(limit)} (the server's --max-upload-mb)"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise bad(413, f"upload of {size_text(int(declared))} {too_big}")
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            raise bad(400, "request body ended early")
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise bad(413, f"upload {too_big}")
        chunks.append(chunk)
    if not size:
        raise bad(400, f"empty request body: send {wanted}")
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
        wanted = (  # the teaching route's form differs from the predict routes'
            "one form field per class, named by its label, holding its images"
            if scope["path"] == "/classifiers"
            else f"the images in form field {FIELD!r}"
        )
        try:
            body = await _read_capped(Headers(scope=scope), receive, self.limit, wanted)
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


def decode_images(uploads: list[tuple[str, bytes]], dataset: str) -> np.ndarray:
    """Every upload decoded and resized to the dataset's ``uint8`` images, one at a time: a
    truncated or non-image file is a 400 here, an oversized one a 413 before decoding."""
    rows = []
    for name, data in uploads:
        if not data:
            raise bad(400, f"{name}: empty file")
        try:
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > MAX_PIXELS:
                raise bad(
                    413,
                    f"{name}: {im.width}x{im.height} image is too large; at most {MAX_PIXELS:,} "
                    f"pixels (4096x4096): shrink it (the model sees it at 28x28 or 84x84)",
                )
            with _decoding:
                im.load()
                rows.append(preprocess.read_image(im, dataset))
            del im
        except UnidentifiedImageError as exc:
            raise bad(400, f"{name}: not a readable image; send a PNG, JPEG, GIF or BMP") from exc
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise bad(400, f"{name}: not a readable image (damaged or cut short)") from exc
        except UserError as exc:  # preprocess.ImageError: a mode or shape it cannot convert
            raise bad(400, f"{name}: {exc}") from exc
    return np.stack(rows)


async def read_support(form: Any, max_images: int, max_bytes: int) -> dict[str, list[tuple]]:
    """``{label: [(file name, bytes)]}`` from a teaching form: one field per class, named by
    the label, in the order sent; or a single field holding a zip of class folders (which
    ``max_images`` bounds; the form's own count is bounded by its parser)."""
    items = list(form.multi_items())
    texts = sorted({key for key, value in items if not isinstance(value, FormFile)})
    if texts:
        raise bad(400, f"form field(s) {texts} carry text, not image files")
    if not items:
        raise bad(400, "no images: send one form field per class, named by its label")
    support: dict[str, list[tuple]] = {}
    for key, upload in items:
        support.setdefault(key, []).append((upload.filename or key, await upload.read()))
    if len(items) == 1:  # one class is no classifier: a single file may be a zip of them
        _, data = support[items[0][0]][0]
        if data.startswith(ZIP_MAGIC):
            return zip_support(data, max_images, max_bytes)
    return support


# the image parameter of every predict route: a list of file parts, all named FIELD
Files = Annotated[
    list[UploadFile],
    File(description=f"one or more images (PNG, JPEG, ...), each as a part named {FIELD!r}"),
]

"""Fuzzing with hypothesis: whatever bytes a user hands over, the answer is a result or the
project's one-line error, never a crash; the HTTP server never answers 5xx and stays up.

Three surfaces: image decoding (every format and colour mode Pillow writes, 1x1 to odd sizes,
truncated and bit-flipped, headers declaring huge dimensions, random bytes), loading damaged
classifier and ONNX files, and HTTP requests to a real uvicorn on 127.0.0.1. Example counts are
bounded and the database is off, so a run takes seconds and is the same on every machine
(``derandomize``).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ThreadServer, build_classifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mamlops.classifier.classifier import Classifier
from mamlops.classifier.onnx_export import export_onnx
from mamlops.classifier.onnx_predict import OnnxClassifier
from mamlops.data.preprocess import ImageError, read_image
from mamlops.errors import UserError
from mamlops.serving.serve import create_app

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "F", "CMYK", "YCbCr", "PA"]
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "ICO"]


def _encode(mode: str, size: tuple[int, int], fmt: str, seed: int) -> bytes | None:
    """An image of ``mode`` and ``size`` in ``fmt``, or None where Pillow cannot write that."""
    rng = np.random.default_rng(seed)
    im = Image.new(mode, size)
    noise = Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "L")
    try:
        im.paste(noise.convert(mode), (0, 0))
        buf = io.BytesIO()
        im.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        return None
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixel data (a bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


@st.composite
def image_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["image", "damaged", "random", "huge"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "huge":
        side = st.integers(1, 2**31 - 1)
        return _png_header(draw(side), draw(side))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    data = _encode(
        draw(st.sampled_from(MODES)), size, draw(st.sampled_from(FORMATS)), draw(st.integers(0, 9))
    )
    if data is None:
        data = _encode("L", size, "PNG", 0)
    if kind == "damaged":
        cut = draw(st.integers(0, len(data)))
        flips = draw(st.lists(st.integers(0, max(len(data) - 1, 0)), max_size=4))
        buf = bytearray(data[:cut] if draw(st.booleans()) else data)
        for i in flips:
            if i < len(buf):
                buf[i] ^= 0xFF
        data = bytes(buf)
    return data


@FUZZ
@given(data=image_bytes(), dataset=st.sampled_from(["omniglot", "miniimagenet"]))
def test_any_bytes_decode_or_fail_with_an_image_error(data: bytes, dataset: str) -> None:
    try:
        image = read_image(data, dataset)
    except ImageError as exc:
        assert "cannot read image" in str(exc) and "\n" not in str(exc)
        return
    side = 28 if dataset == "omniglot" else 84
    assert image.dtype == np.uint8
    assert image.shape == ((side, side) if dataset == "omniglot" else (side, side, 3))


@functools.cache
def _model_files(folder: Path) -> tuple[bytes, bytes]:
    """A valid classifier and its ONNX export, as bytes (read once per test module)."""
    return (folder / "clf.safetensors").read_bytes(), (folder / "clf.onnx").read_bytes()


@st.composite
def damaged(draw, data: bytes) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "random", "splice"]))
    if how == "random":
        return draw(st.binary(max_size=4096))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    buf = bytearray(data)
    if how == "flip":
        for i in draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=8)):
            buf[i] ^= draw(st.integers(1, 255))
        return bytes(buf)
    at = draw(st.integers(0, len(buf)))
    return bytes(buf[:at]) + draw(st.binary(min_size=1, max_size=64)) + bytes(buf[at:])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-models")
    clf, _ = build_classifier(seed=0)
    clf.save(folder / "clf.safetensors")
    export_onnx(clf, folder / "clf.onnx")
    return folder


@FUZZ
@given(st.data())
def test_damaged_model_files_load_or_fail_in_one_line(model_dir, tmp_path, data) -> None:
    safetensors, onnx_bytes = _model_files(model_dir)
    for loader, suffix, original in (
        (Classifier.load, ".safetensors", safetensors),
        (OnnxClassifier, ".onnx", onnx_bytes),
    ):
        path = tmp_path / f"m{suffix}"
        path.write_bytes(data.draw(damaged(original)))
        try:
            loader(path)
        except UserError as exc:
            assert str(exc) and "\n" not in str(exc).strip()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-serve")
    (folder / "alpha.onnx").write_bytes(_model_files(model_dir)[1])
    with ThreadServer(create_app(folder, max_upload_bytes=64 * 1024)) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


_VALID_PNG = _encode("L", (28, 28), "PNG", 1)


@st.composite
def requests(draw) -> dict:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"]))
    path = draw(
        st.sampled_from(
            [
                "/predict",
                "/models/alpha/predict",
                "/models/nope/predict",
                "/metadata",
                "/models",
                "/health",
                "/",
                "/docs",
                "/models/alpha/metadata",
            ]
        )
    ) + draw(st.sampled_from(["", "?top_k=3", "?top_k=-1", "?top_k=x", "/..%2f..", "%00"]))
    boundary = draw(st.sampled_from(["b0undary", "", "x" * 80, "a b"]))
    content_type = draw(
        st.sampled_from(
            [
                f"multipart/form-data; boundary={boundary}",
                "multipart/form-data",
                "image/png",
                "application/json",
                "text/plain",
                "",
            ]
        )
    )
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(["files", "file", "", 'files"; x="y']))
        body = draw(st.sampled_from([_VALID_PNG, b"", b"not an image"])) + draw(
            st.binary(max_size=64)
        )
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="a.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
            + body
            + b"\r\n"
        )
    tail = draw(st.sampled_from([f"--{boundary}--\r\n".encode(), b"", b"--"]))
    body = b"".join(parts) + tail if parts else draw(st.binary(max_size=256))
    return {
        "method": method,
        "url": path,
        "content": body,
        "headers": {"content-type": content_type},
    }


@FUZZ
@given(request=requests())
def test_http_requests_never_get_a_5xx(server: httpx.Client, request: dict) -> None:
    response = server.request(**request)
    assert response.status_code < 500, (request, response.status_code, response.text[:200])


def test_server_is_up_after_the_fuzzing(server: httpx.Client) -> None:
    assert server.get("/health").status_code == 200

"""Serving: real HTTP against uvicorn on 127.0.0.1, bad requests are 4xx and harmless, and the
MLflow registry + ``mlflow models serve`` answers like onnxruntime does."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ThreadServer, build_classifier, mlflow_models_serve, to_tensor
from PIL import Image

from mamlops.classifier.onnx_export import export_onnx
from mamlops.classifier.onnx_predict import OnnxClassifier
from mamlops.serving.serve import create_app
from mamlops.serving.uploads import MAX_FILES

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    clf_a, queries = build_classifier(seed=0)
    clf_b, _ = build_classifier(seed=1)
    folder = tmp_path_factory.mktemp("models")
    export_onnx(clf_a, folder / "alpha.onnx")
    export_onnx(clf_b, folder / "beta.onnx")
    app = create_app(folder, max_upload_bytes=LIMIT)
    with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield {"client": client, "folder": folder, "clf": clf_a, "queries": queries}


def _files(queries: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"q{i}.png", b, "image/png")) for i, b in enumerate(queries)]


def test_health_models_metadata(setup) -> None:
    client = setup["client"]
    assert client.get("/health").json() == {
        "status": "ok",
        "models": ["alpha", "beta"],
        "teaching": False,
    }
    names = [m["name"] for m in client.get("/models").json()["models"]]
    assert names == ["alpha", "beta"]
    meta = client.get("/metadata", params={"model": "alpha"}).json()
    assert meta["labels"] == setup["clf"].labels
    assert meta["input"]["shape"] == ["batch", 1, 28, 28]
    assert len(meta["model_sha256"]) == 64
    assert meta["meta_model_sha256"] == setup["clf"].meta_model_sha256
    assert client.get("/models/beta/metadata").json()["name"] == "beta"


def test_predict_matches_onnx_and_torch(setup) -> None:
    client, queries, clf = setup["client"], setup["queries"], setup["clf"]
    resp = client.post("/predict?model=alpha&top_k=3", files=_files(queries))
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    assert [p["filename"] for p in preds] == [f"q{i}.png" for i in range(len(queries))]
    local = OnnxClassifier(setup["folder"] / "alpha.onnx").predict_images(
        [Image.open(io.BytesIO(b)) for b in queries], top_k=3
    )
    torch_probs = clf.predict_proba(to_tensor(queries)).numpy()
    for pred, ref, row in zip(preds, local, torch_probs, strict=True):
        assert pred["label"] == ref["label"] == clf.labels[int(row.argmax())]
        assert pred["top_k"] == ref["top_k"] and len(pred["top_k"]) == 3
        got = np.array([pred["probabilities"][lab] for lab in clf.labels])
        np.testing.assert_allclose(got, row, atol=1e-5, rtol=0)
    single = client.post("/models/alpha/predict", files=_files(queries[:1])).json()
    assert single["predictions"][0]["label"] == preds[0]["label"]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "phrase"),
    [
        (
            "/predict?model=alpha",
            {"files": [("files", ("x.png", b"not an image", "image/png"))]},
            400,
            "not a readable image",
        ),
        (
            "/predict?model=alpha",
            {"files": [("image", ("x.png", b"abc", "image/png"))]},
            400,
            "no 'files' field",
        ),
        (
            "/predict?model=alpha",
            {"data": {"files": "text"}, "files": [("other", ("a", b"1"))]},
            400,
            "must carry files",
        ),
        (
            "/predict?model=alpha",
            {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}},
            400,
            "empty request body",
        ),
        ("/predict?model=alpha", {"json": {"files": []}}, 415, "multipart/form-data"),
        (
            "/predict?model=alpha",
            {"files": [("files", ("big.png", b"0" * (LIMIT + 1)))]},
            413,
            "exceeds the limit",
        ),
        ("/predict?model=gamma", {"files": [("files", ("x.png", b"1"))]}, 404, "unknown model"),
        ("/models/gamma/predict", {"files": [("files", ("x.png", b"1"))]}, 404, "unknown model"),
        ("/predict", {"files": [("files", ("x.png", b"1"))]}, 400, "several models"),
        ("/predict?model=alpha&top_k=0", {"files": [("files", ("x.png", b"1"))]}, 400, "top_k"),
        (
            "/predict?model=alpha&top_k=abc",
            {"files": [("files", ("x.png", b"1"))]},
            422,
            "query parameter top_k",
        ),
        (
            "/predict?model=alpha",
            {"files": [("files", (f"{i}.png", b"1")) for i in range(MAX_FILES + 1)]},
            400,
            f"Maximum number of files is {MAX_FILES}",
        ),
        ("/health", {"files": [("files", ("x.png", b"1"))]}, 405, "Method Not Allowed"),
    ],
)
def test_bad_requests_are_4xx_and_harmless(setup, path, kwargs, status, phrase) -> None:
    client = setup["client"]
    resp = client.post(path, **kwargs)
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail  # ErrorResponse: one line
    assert phrase in detail
    assert client.get("/health").status_code == 200


def test_chunked_upload_past_limit(setup) -> None:
    def body():
        for _ in range(LIMIT // 1024 + 2):
            yield b"0" * 1024

    headers = {"content-type": "multipart/form-data; boundary=x"}
    resp = setup["client"].post("/predict?model=alpha", content=body(), headers=headers)
    assert resp.status_code == 413
    assert setup["client"].get("/health").status_code == 200


def test_chunked_valid_form_past_limit(setup) -> None:
    """A well-formed multipart body streamed in chunks (no Content-Length) past the limit gets
    413 as well: the body is counted while it is read."""
    head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'

    def body():
        yield head
        for _ in range(4 * LIMIT // 1024):
            yield b"0" * 1024
        yield b"\r\n--b--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=b"}
    resp = setup["client"].post("/predict?model=alpha", content=body(), headers=headers)
    assert resp.status_code == 413, resp.text
    assert "exceeds the limit of 64 KB" in resp.json()["detail"]  # not a raw byte count


def test_image_errors_name_the_limit_not_python(setup) -> None:
    """Issue 25: a 6000x6000 image was "too large" without the limit, and an unreadable file
    showed Python's exception name (``UnidentifiedImageError``) to the page's user."""
    big = io.BytesIO()
    Image.new("L", (5000, 4000)).save(big, format="PNG")
    files = [("files", ("big.png", big.getvalue(), "image/png"))]
    resp = setup["client"].post("/predict?model=alpha", files=files)
    assert resp.status_code == 413 and "at most 16,777,216 pixels (4096x4096)" in resp.text
    files = [("files", ("notes.png", b"hello, not an image", "image/png"))]
    resp = setup["client"].post("/predict?model=alpha", files=files)
    assert resp.status_code == 400 and "notes.png: not a readable image; send a PNG" in resp.text
    assert "Error" not in resp.json()["detail"]


def test_metadata_round_trips_every_field(setup) -> None:
    """The typed /metadata answer drops nothing the ONNX file's metadata holds."""
    want = OnnxClassifier(setup["folder"] / "beta.onnx").metadata()
    assert setup["client"].get("/models/beta/metadata").json() == want
    listed = setup["client"].get("/models").json()
    assert listed["default"] is None and listed["models"][1] == want


def test_openapi_describes_uploads_and_answers(setup) -> None:
    """/openapi.json (what /docs renders): /predict takes a list of binary file parts named
    'files' (format binary, so Swagger UI offers file pickers), answers PredictResponse, and
    types its error bodies."""
    client = setup["client"]
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def deref(node: dict) -> dict:
        return schemas[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node

    for path in ("/predict", "/models/{name}/predict"):
        op = spec["paths"][path]["post"]
        form = deref(op["requestBody"]["content"]["multipart/form-data"]["schema"])
        assert form["required"] == ["files"]
        files = form["properties"]["files"]
        assert files["type"] == "array"
        assert files["items"]["type"] == "string" and files["items"]["format"] == "binary"
        ok = deref(op["responses"]["200"]["content"]["application/json"]["schema"])
        assert ok["title"] == "PredictResponse"
        assert set(ok["properties"]) == {"model", "model_sha256", "predictions"}
        pred = deref(ok["properties"]["predictions"]["items"])
        assert {"filename", "label", "probability", "probabilities", "top_k"} <= set(
            pred["properties"]
        )
        for code in ("400", "404", "413", "415", "422"):
            err = deref(op["responses"][code]["content"]["application/json"]["schema"])
            assert (
                err["title"] == "ErrorResponse" and err["properties"]["detail"]["type"] == "string"
            )
    health = spec["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]
    assert deref(health["schema"])["title"] == "Health"
    meta = spec["paths"]["/metadata"]["get"]["responses"]["200"]["content"]["application/json"]
    assert deref(meta["schema"])["title"] == "ModelMetadata"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_single_model_file_needs_no_model_name(setup) -> None:
    with ThreadServer(create_app(setup["folder"] / "alpha.onnx")) as url:
        resp = httpx.post(f"{url}/predict", files=_files(setup["queries"][:2]), timeout=30)
    assert resp.status_code == 200 and resp.json()["model"] == "alpha"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_registry_and_mlflow_models_serve(setup, tmp_path: Path) -> None:
    from mamlops.classifier.registry import log_and_register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = log_and_register(
        setup["folder"] / "alpha.onnx",
        "mamlops-test",
        alias="champion",
        tracking_uri=uri,
        artifact_location=str(tmp_path / "artifacts"),
    )
    assert str(version.version) == "1" and "champion" in version.aliases

    x = to_tensor(setup["queries"][:1]).numpy()
    with mlflow_models_serve("models:/mamlops-test@champion", uri) as url:
        resp = httpx.post(f"{url}/invocations", json={"inputs": x.tolist()}, timeout=30)
    assert resp.status_code == 200, resp.text
    # the registered pyfunc (mlflow_model.py) answers one row per image: label, probability and
    # a p:<label> column per class
    rows = resp.json()["predictions"]
    onnx_clf = OnnxClassifier(setup["folder"] / "alpha.onnx")
    want = onnx_clf.predict_array(x)
    got = np.array([[row[f"p:{label}"] for label in onnx_clf.labels] for row in rows])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert [row["label"] for row in rows] == [onnx_clf.labels[i] for i in want.argmax(1)]


def test_many_large_images_in_one_request_keep_memory_bounded(setup) -> None:
    """24 allowed 4096x4096 PNGs in one request raised a server's peak memory by 1.5 GiB: each
    image is now decoded, shrunk to the model's input and dropped before the next. Measured on
    a real `mamlops serve` process (its VmHWM, the peak resident set), with RGB 2048x2048 PNGs
    (12 MiB each decoded, 288 MiB for 24; a few KiB each on the wire)."""
    import io
    import sys

    from conftest import free_port, http_process
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2048, 2048), (250, 250, 250)).save(buf, format="PNG")
    png = buf.getvalue()
    port = free_port()
    cmd = [sys.executable, "-m", "mamlops", "serve", str(setup["folder"] / "alpha.onnx")]
    cmd += ["--port", str(port)]
    with http_process(cmd, f"http://127.0.0.1:{port}", "/health", 60) as url:
        pid = _server_pid(port)

        def peak_kib() -> int:
            status = open(f"/proc/{pid}/status").read()
            return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM")))

        one = [("files", ("warm.png", png, "image/png"))]
        assert httpx.post(f"{url}/predict", files=one, timeout=60).status_code == 200
        before = peak_kib()
        many = [("files", (f"{i}.png", png, "image/png")) for i in range(24)]
        resp = httpx.post(f"{url}/predict", files=many, timeout=120)
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["predictions"]) == 24
        grew_mib = (peak_kib() - before) / 1024
    assert grew_mib < 100, f"peak memory grew by {grew_mib:.0f} MiB for one request"


def _server_pid(port: int) -> int:
    """The pid of the `mamlops serve ... --port <port>` process (from /proc's command lines)."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in args and b"--port" in args and str(port).encode() in args:
            return int(proc.name)
    raise AssertionError(f"no serve process on port {port}")

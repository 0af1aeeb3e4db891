"""Serving: real HTTP against uvicorn on 127.0.0.1, bad requests are 4xx and harmless, and the
MLflow registry + ``mlflow models serve`` answers like onnxruntime does."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from conftest import build_classifier, mlflow_models_serve, to_tensor
from PIL import Image

from mamlops.export import export_onnx
from mamlops.onnx_predict import OnnxClassifier
from mamlops.serve import create_app

LIMIT = 64 * 1024


class ThreadServer:
    """uvicorn on 127.0.0.1 with an OS-chosen port, in a daemon thread; stopped on exit."""

    def __init__(self, app) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


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
    assert client.get("/health").json() == {"status": "ok", "models": ["alpha", "beta"]}
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
    ],
)
def test_bad_requests_are_4xx_and_harmless(setup, path, kwargs, status, phrase) -> None:
    client = setup["client"]
    resp = client.post(path, **kwargs)
    assert resp.status_code == status, resp.text
    assert phrase in resp.json()["detail"]
    assert client.get("/health").status_code == 200


def test_chunked_upload_past_limit(setup) -> None:
    def body():
        for _ in range(LIMIT // 1024 + 2):
            yield b"0" * 1024

    headers = {"content-type": "multipart/form-data; boundary=x"}
    resp = setup["client"].post("/predict?model=alpha", content=body(), headers=headers)
    assert resp.status_code == 413
    assert setup["client"].get("/health").status_code == 200


def test_single_model_file_needs_no_model_name(setup) -> None:
    with ThreadServer(create_app(setup["folder"] / "alpha.onnx")) as url:
        resp = httpx.post(f"{url}/predict", files=_files(setup["queries"][:2]), timeout=30)
    assert resp.status_code == 200 and resp.json()["model"] == "alpha"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_registry_and_mlflow_models_serve(setup, tmp_path: Path) -> None:
    from mamlops.registry import log_and_register

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
    got = np.array(resp.json()["predictions"]["probabilities"], dtype=np.float32)
    want = OnnxClassifier(setup["folder"] / "alpha.onnx").predict_array(x)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)

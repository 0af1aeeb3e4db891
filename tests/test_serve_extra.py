"""`pip install 'mamlops[serve]'` on its own: a fresh virtual environment with the serve extra
only has no torch, DVC or MLflow, yet `mamlops serve` answers real HTTP requests and `mamlops
predict` classifies, and the pipeline commands say which extra they need.

The ONNX file is made here, in the full environment (build_classifier + export_onnx, as in
test_serve.py), and checked against onnxruntime here too. Slow: the install takes about 15 s
with pip's cache and local wheels (much longer on a cold cache).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import REPO, build_classifier, free_port, http_process

import mamlops
from mamlops.classifier.onnx_export import export_onnx
from mamlops.classifier.onnx_predict import OnnxClassifier

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ABSENT = ("torch", "torchvision", "dvc", "mlflow")


def _copy_project(dest: Path) -> Path:
    """What pip builds the wheel from (pyproject.toml, README.md, src/), copied so that the
    build's egg-info and build/ folders land here, not in the working tree."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("*.egg-info", "__pycache__")
    shutil.copytree(REPO / "src", dest / "src", ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def serve_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a new venv holding mamlops[serve] and nothing else."""
    root = tmp_path_factory.mktemp("serve-extra")
    project = _copy_project(root / "project")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # this environment's pip installs into the new one (--python): no ensurepip run, and the
    # same cache, index and wheel configuration as any other install here
    cmd = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
    cmd += ["--no-input", "--progress-bar", "off", f"{project}[serve]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return venv / "bin"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An exported classifier (ONNX and safetensors) and four query PNG files."""
    root = tmp_path_factory.mktemp("serve-extra-model")
    clf, queries = build_classifier(seed=3)
    clf.save(root / "clf.safetensors")
    export_onnx(clf, root / "clf.onnx")
    images = []
    for i, png in enumerate(queries[::2][:4]):
        images.append(root / f"q{i}.png")
        images[-1].write_bytes(png)
    expected = OnnxClassifier(root / "clf.onnx").predict_images([str(p) for p in images], 2)
    return {"root": root, "images": images, "expected": expected, "labels": clf.labels}


def _run(serve_bin: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(serve_bin / "mamlops"), *args], capture_output=True, text=True, timeout=120
    )


def test_no_torch_dvc_or_mlflow(serve_bin: Path) -> None:
    probe = (
        "import json\n"
        "out = {}\n"
        f"for name in {ABSENT!r}:\n"
        "    try:\n"
        "        __import__(name)\n"
        "        out[name] = 'imported'\n"
        "    except ModuleNotFoundError as exc:\n"
        "        out[name] = exc.name\n"
        "import mamlops.serving.serve, mamlops.classifier.onnx_predict\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [str(serve_bin / "python"), "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {name: name for name in ABSENT}


def test_version_and_predict(serve_bin: Path, model: dict) -> None:
    version = _run(serve_bin, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"mamlops {mamlops.__version__}"

    images = [str(p) for p in model["images"]]
    proc = _run(serve_bin, "predict", str(model["root"] / "clf.onnx"), *images, "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert [row[0] for row in rows] == images
    assert [row[1] for row in rows] == [p["label"] for p in model["expected"]]

    proc = _run(serve_bin, "predict", str(model["root"] / "clf.onnx"), *images, "--json")
    assert proc.returncode == 0, proc.stderr
    preds = json.loads(proc.stdout)["predictions"]
    assert [p["label"] for p in preds] == [p["label"] for p in model["expected"]]
    for got, want in zip(preds, model["expected"], strict=True):
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)


@pytest.fixture
def server(serve_bin: Path, model: dict) -> Iterator[str]:
    """`mamlops serve clf.onnx` from the serve-only venv, on a free 127.0.0.1 port, in its own
    process group (stopped by its id afterwards)."""
    port = free_port()
    cmd = [str(serve_bin / "mamlops"), "serve", str(model["root"] / "clf.onnx")]
    cmd += ["--port", str(port)]
    with http_process(cmd, f"http://127.0.0.1:{port}", "/health", 60) as url:
        yield url


def test_serve_answers_real_images(server: str, model: dict) -> None:
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in model["images"]]
    resp = httpx.post(f"{server}/predict", params={"top_k": 2}, files=files, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "clf"
    preds = body["predictions"]
    assert [p["filename"] for p in preds] == [p.name for p in model["images"]]
    assert [p["label"] for p in preds] == [p["label"] for p in model["expected"]]
    for got, want in zip(preds, model["expected"], strict=True):
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
        assert set(got["probabilities"]) == set(model["labels"])
    bad = httpx.post(f"{server}/predict", files=[("files", ("x.png", b"no"))], timeout=30)
    assert bad.status_code == 400 and "not a readable image" in bad.json()["detail"]
    health = httpx.get(f"{server}/health", timeout=5).json()
    assert health == {"status": "ok", "models": ["clf"], "teaching": False}


@pytest.mark.parametrize(
    "args",
    [
        ["train", "omniglot-5w1s"],
        ["predict", "{root}/clf.safetensors", "{root}/q0.png"],
        ["register", "{root}/clf.onnx"],
        ["evaluate-folder", "{root}/clf.safetensors", "{root}"],
    ],
)
def test_pipeline_commands_name_the_extra(serve_bin: Path, model: dict, args: list[str]) -> None:
    proc = _run(serve_bin, *[a.format(root=model["root"]) for a in args])
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "pip install 'mamlops[pipeline]'" in lines[0] and args[0] in lines[0]
    assert proc.stdout == ""

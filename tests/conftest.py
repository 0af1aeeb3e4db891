"""Shared fixtures and helpers: real Omniglot, extracted and prepared once per test session.

The data come from the local mirror (``MAMLOPS_DATA_MIRROR`` if set, else ``shared/data/omniglot``
beside the repository); tests that need them are skipped cleanly when it is absent.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from mamlops.classifier.classifier import Classifier
from mamlops.config import PrepareConfig
from mamlops.data import preprocess
from mamlops.data.prepare import prepare_dataset
from mamlops.meta.model import ConvNetConfig, batch_stats, init_params
from mamlops.params import load_params

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_ZIPS = ("images_background.zip", "images_evaluation.zip")


def omniglot_mirror() -> Path:
    """The folder holding the Omniglot zips (may not exist)."""
    env = os.environ.get("MAMLOPS_DATA_MIRROR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


@pytest.fixture(scope="session")
def repo_params() -> dict:
    """The repository's ``params.yaml``."""
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def omniglot_raw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The two Omniglot zips extracted, laid out as the download stage leaves them."""
    mirror = omniglot_mirror()
    if not all((mirror / name).is_file() for name in OMNIGLOT_ZIPS):
        pytest.skip(f"Omniglot mirror not found at {mirror}")
    # 32k small files: on tmpfs (/dev/shm) creating and deleting them is quick; on the busy shared
    # disk, deleting them took up to 100 s
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        base = Path(tempfile.mkdtemp(prefix="mamlops-raw-", dir=shm))
    else:
        base = tmp_path_factory.mktemp("raw")
    raw = base / "omniglot"
    for name in OMNIGLOT_ZIPS:
        with zipfile.ZipFile(mirror / name) as zf:
            zf.extractall(raw)
    try:
        yield raw
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def omniglot_prepared(
    omniglot_raw: Path, repo_params: dict, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Omniglot prepared with the repository's params (Vinyals split, 28x28)."""
    out = tmp_path_factory.mktemp("prepared") / "omniglot"
    prepare_dataset("omniglot", omniglot_raw, out, PrepareConfig.from_params(repo_params))
    return out


class TrainedTheta:
    """A briefly meta-trained Omniglot 5-way 1-shot model and what it was trained on."""

    def __init__(self, path: Path, cfg: object, prepared: Path) -> None:
        self.path = path  # theta_best.safetensors
        self.cfg = cfg  # mamlops.config.TrainConfig
        self.prepared = prepared


@pytest.fixture(scope="session")
def trained_theta(
    omniglot_prepared: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainedTheta:
    """The real ``train()`` run briefly (5-way 1-shot, 100 iterations of 8 tasks, 5 query images
    per class): far from converged but well above chance, so evaluation and adaptation tests
    check real behaviour rather than plumbing on random weights."""
    import torch

    from mamlops.config import TrainConfig
    from mamlops.meta.train import train

    cfg = TrainConfig.from_flat(
        dict(
            name="test-omniglot-5w1s",
            dataset="omniglot",
            ways=5,
            shots=1,
            query=5,
            meta_batch=8,
            inner_lr=0.4,
            inner_steps=1,
            test_inner_steps=3,
            meta_lr=0.001,
            iterations=100,
            device="cpu",
            val_every=50,
            val_episodes=20,
            checkpoint_every=0,
            log_every=10,
        )
    )
    root = tmp_path_factory.mktemp("trained")
    # one thread: these convs are tiny, and on a busy 2-core machine two threads mostly wait on
    # each other (measured 6 s vs 16 s for 20 iterations)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, omniglot_prepared, root / "model", root / "checkpoints", progress=False)
    finally:
        torch.set_num_threads(threads)
    return TrainedTheta(root / "model" / "theta_best.safetensors", cfg, omniglot_prepared)


# ----------------------------------------------------------------------- shared helpers
# An adapted-style classifier on real drawings (test_classifier, test_export, test_serve) and
# an `mlflow models serve` process (test_serve, test_pipeline).

WAYS = 5


def omniglot_pngs(ways: int = WAYS, per_class: int = 3) -> list[list[bytes]]:
    """PNG bytes of ``per_class`` drawings for each of the first ``ways`` characters."""
    zpath = omniglot_mirror() / "images_evaluation.zip"
    if not zpath.is_file():
        pytest.skip(f"{zpath} not found")
    with zipfile.ZipFile(zpath) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        by_char: dict[str, list[str]] = {}
        for name in names:
            by_char.setdefault(name.rsplit("/", 1)[0], []).append(name)
        chars = sorted(by_char)[:ways]
        return [[zf.read(n) for n in by_char[c][:per_class]] for c in chars]


def to_tensor(pngs: list[bytes]) -> torch.Tensor:
    arrays = np.stack([preprocess.load_image(Image.open(io.BytesIO(b)), "omniglot") for b in pngs])
    return torch.from_numpy(preprocess.to_float_numpy(arrays, "omniglot"))


def build_classifier(seed: int = 0) -> tuple[Classifier, list[bytes]]:
    """(classifier with support-set BN stats, held-out query PNGs)."""
    pngs = omniglot_pngs()
    support = to_tensor([imgs[0] for imgs in pngs])
    queries = [b for imgs in pngs for b in imgs[1:]]
    cfg = ConvNetConfig.for_dataset("omniglot", WAYS)
    params = init_params(cfg, torch.Generator().manual_seed(seed))
    stats = batch_stats(params, support, cfg)
    labels = [f"char{i}" for i in range(WAYS)]
    provenance = {"seed": seed, "inner_steps": 0, "note": "random init, test fixture"}
    return Classifier(params, stats, cfg, labels, "omniglot", "ab" * 32, provenance), queries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_process(
    cmd: list[str], url: str, ready: str, timeout: float, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run ``cmd`` (a server) as its own process group; yield ``url`` once ``GET url+ready``
    answers 200, and stop the whole group afterwards (servers that fork workers leave none
    behind). Its output goes to a temporary log, shown when it dies or never answers."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-3000:]

        try:
            deadline = time.monotonic() + timeout
            while True:
                assert proc.poll() is None, output()
                try:
                    if httpx.get(f"{url}{ready}", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"{cmd[0]} did not answer in {timeout} s"
                time.sleep(0.2)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def mlflow_models_serve(model_uri: str, tracking_uri: str) -> Iterator[str]:
    """`mlflow models serve` on a free 127.0.0.1 port as its own process group; yields its URL
    once /ping answers, and kills the group (mlflow and its uvicorn child) afterwards."""
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    assert mlflow_bin, "mlflow CLI not found next to the interpreter"
    port = free_port()
    # mlflow execs a bare `uvicorn`: the venv's bin must be on PATH even when not activated
    path = f"{Path(mlflow_bin).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {
        **os.environ,
        "PATH": path,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_REGISTRY_URI": tracking_uri,
    }
    cmd = [mlflow_bin, "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with http_process(cmd, f"http://127.0.0.1:{port}", "/ping", 120, env) as url:
        yield url


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

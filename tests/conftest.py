"""Shared fixtures: real Omniglot, extracted and prepared once per test session.

The data come from the local mirror (``MAMLOPS_DATA_MIRROR`` if set, else ``shared/data/omniglot``
beside the repository); tests that need them are skipped cleanly when it is absent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mamlops import params
from mamlops.prepare import prepare_config, prepare_omniglot

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
    return params.load(REPO / "params.yaml")


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
    prepare_omniglot(omniglot_raw, out, prepare_config(repo_params))
    return out


class TrainedTheta:
    """A briefly meta-trained Omniglot 5-way 1-shot model and what it was trained on."""

    def __init__(self, path: Path, cfg: object, prepared: Path) -> None:
        self.path = path  # theta_best.safetensors
        self.cfg = cfg  # mamlops.train.TrainConfig
        self.prepared = prepared


@pytest.fixture(scope="session")
def trained_theta(
    omniglot_prepared: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainedTheta:
    """The real ``train()`` run briefly (5-way 1-shot, 100 iterations of 8 tasks, 5 query images
    per class): far from converged but well above chance, so evaluation and adaptation tests
    check real behaviour rather than plumbing on random weights."""
    import torch

    from mamlops.train import TrainConfig, train

    cfg = TrainConfig(
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

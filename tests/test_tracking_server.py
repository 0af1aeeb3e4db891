"""Team tracking: a real `mlflow server` on a real PostgreSQL (scripts/tracking_server.py, the
`make tracking-server` target), a tiny pipeline run logged through it, read back over REST.

Skipped, saying why, where Debian's `postgresql` package or `psycopg2` is missing; `make
tracking-server-check` runs the same check by hand.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, free_port

sys.path.insert(0, str(REPO / "scripts"))
import tracking_server  # noqa: E402


def _have_postgres() -> str | None:
    try:
        tracking_server.pg_bin("initdb")
    except SystemExit as exc:
        return str(exc)
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[server]')"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser (PostgreSQL refuses root)"
    return None


@pytest.mark.timeout(600)
def test_a_pipeline_run_through_mlflow_server_on_postgresql(
    omniglot_prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = _have_postgres()
    if missing:
        pytest.skip(missing)
    # not under pytest's tmp folder: PostgreSQL runs as another user, who must reach it
    state = Path(tempfile.mkdtemp(prefix="mamlops-tracking-"))
    state.chmod(0o755)
    try:
        backend = tracking_server.start_postgres(state, free_port())
        assert backend.startswith("postgresql+psycopg2://")
        url = tracking_server.start_mlflow(backend, state, free_port())
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        tracking_server.log_tiny_run(omniglot_prepared, state / "work")
        back = tracking_server.read_back(url)
    finally:
        tracking_server.stop_mlflow(state)
        tracking_server.stop_postgres(state)
        shutil.rmtree(state, ignore_errors=True)
    assert back["runs"] == 1 and back["status"] == "FINISHED", back
    assert back["params"]["train.meta_batch"] == "2" and back["params"]["train.ways"] == "5"
    assert 0.0 <= back["metrics"]["val/best_acc"] <= 1.0
    assert 0.0 <= back["metrics"]["eval/acc_support"] <= 1.0, sorted(back["metrics"])  # evaluate
    assert back["model_versions"] == ["1"] and back["aliases"] == ["champion"], back

"""The real pipeline: `dvc repro` in a fresh copy of the repository, on the Omniglot mirror.

One module-scoped run of the whole pipeline (with a tiny training budget written into the copy's
params.yaml) serves every test here; it is the slowest part of the suite (a few minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import OMNIGLOT_ZIPS, REPO, omniglot_mirror

from mamlops import tracking

SETTING = "omniglot-5w1s"


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{tail}"
    return proc.stdout


def fresh_copy(dest: Path) -> Path:
    """What a clean clone would hold: tracked and untracked-not-ignored files, committed."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "fresh"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def pipeline_env() -> dict[str, str]:
    mirror = omniglot_mirror()
    if not all((mirror / n).is_file() for n in OMNIGLOT_ZIPS):
        pytest.skip(f"Omniglot mirror not found at {mirror}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MAMLOPS_DATA_MIRROR"] = str(mirror.resolve())
    return env


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, pipeline_env: dict[str, str]) -> Path:
    """A fresh copy after `dvc repro` with a tiny training budget."""
    root = fresh_copy(tmp_path_factory.mktemp("clone"))
    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["train"]["presets"][SETTING].update(
        iterations=20,
        meta_batch=4,
        query=5,
        val_every=10,
        val_episodes=10,
        checkpoint_every=10,
        log_every=5,
    )
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["dvc", "repro"], root, pipeline_env)
    return root


def test_prepare_outputs(repo: Path) -> None:
    prepared = repo / "data" / "prepared" / "omniglot"
    assert (prepared / "images.npy").is_file()
    splits = json.loads((prepared / "splits.json").read_text())
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (4112, 688, 1692)
    assert (prepared / "episodes" / "test_5w1s.npz").is_file()


def test_status_clean_after_repro(repo: Path, pipeline_env: dict[str, str]) -> None:
    out = _run(["dvc", "status"], repo, pipeline_env)
    assert "up to date" in out, out


def test_train_metrics_and_plots(repo: Path, pipeline_env: dict[str, str]) -> None:
    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, pipeline_env))
    flat = json.dumps(metrics)
    assert "best_val_acc" in flat
    train_metrics = json.loads((repo / "metrics" / "train" / f"{SETTING}.json").read_text())
    assert train_metrics["iterations"] == 20
    assert 0.2 < train_metrics["best_val_acc"] <= 1.0  # 5-way: chance is 0.2
    assert (repo / "models" / SETTING / "theta.safetensors").is_file()
    _run(["dvc", "plots", "show", "-o", "dvc_plots"], repo, pipeline_env)
    assert (repo / "dvc_plots" / "index.html").is_file()


def test_mlflow_run_recorded(repo: Path) -> None:
    db = repo / "mlflow.db"
    assert db.is_file(), "the default store is sqlite:///<repo root>/mlflow.db"
    con = sqlite3.connect(db)
    try:
        runs = con.execute("select run_uuid, status, name from runs").fetchall()
        train_runs = [r for r in runs if r[2] == f"train-{SETTING}"]
        assert train_runs and train_runs[0][1] == "FINISHED"
        run_id = train_runs[0][0]
        params = dict(con.execute("select key, value from params where run_uuid=?", (run_id,)))
        assert params["ways"] == "5" and params["inner_lr"] == "0.4"
        keys = {k for (k,) in con.execute("select key from metrics where run_uuid=?", (run_id,))}
        assert {"loss", "train_acc", "val_acc", "tasks_per_s"} <= keys
        tags = dict(con.execute("select key, value from tags where run_uuid=?", (run_id,)))
        assert tags["dvc.stage"] == f"train@{SETTING}"
        assert len(tags["mlflow.source.git.commit"]) == 40
    finally:
        con.close()


def test_repo_root_sees_through_dvc_experiment_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    inner = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc"
    inner.mkdir(parents=True)
    assert tracking.repo_root(inner) == tmp_path / "proj"
    assert tracking.tracking_uri(inner) == f"sqlite:///{tmp_path / 'proj' / 'mlflow.db'}"

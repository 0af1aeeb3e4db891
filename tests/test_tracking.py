"""MLflow conventions: a stage run records params and tags, and a run that raises is FAILED."""

from __future__ import annotations

from pathlib import Path

import pytest

from mamlops import tracking


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    return uri


def test_finished_run_has_params_and_tags(store: str) -> None:
    import mlflow

    with tracking.start_run("train@x", {"a": {"b": 1}, "lr": 0.4}, system_metrics=False) as run:
        mlflow.log_metric("loss", 1.5, step=3)
    got = mlflow.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"a.b": "1", "lr": "0.4"}
    assert got.data.tags["dvc.stage"] == "train@x"
    assert got.data.tags["dvc.experiment"] == "exp-abc"
    assert tracking.tracking_uri() == store


def test_run_that_raises_is_failed(store: str) -> None:
    import mlflow

    with pytest.raises(RuntimeError, match="boom"):
        with tracking.start_run("train@y", system_metrics=False) as run:
            raise RuntimeError("boom")
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_killed_run_is_marked_killed(store: str) -> None:
    import mlflow

    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run("train@z", system_metrics=False) as run:
            raise KeyboardInterrupt
    assert mlflow.get_run(run.info.run_id).info.status == "KILLED"


def test_stage_runs_nest_and_find_the_training_run(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain evaluate/export use: a training run tagged with its theta's hash, found again
    by that hash, a child run under it, and the prepared data as a dataset input with the DVC
    hash from dvc.lock as its digest."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "prepared" / "omniglot"
    data.mkdir(parents=True)
    (data / "images.npy").write_bytes(b"\0" * 10)
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare@omniglot:\n    outs:\n"
        "    - path: data/prepared/omniglot\n      md5: 0123456789abcdef0123456789abcdef.dir\n"
    )
    theta = tmp_path / "theta.safetensors"
    theta.write_bytes(b"weights")
    exp_id = tracking.experiment_id()
    assert mlflow.get_experiment(exp_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    with tracking.start_run(
        "train@x", run_name=tracking.run_name("x"), system_metrics=False
    ) as run:
        tracking.log_dataset(Path("data/prepared/omniglot"), "omniglot", "training")
        tracking.set_tags(tracking.theta_tags({"best": theta}))
    assert run.info.run_name == "x exp-abc"  # the DVC experiment's name
    (inp,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert inp.dataset.digest == "0123456789abcdef0123456789abcdef"
    assert tracking.find_training_run(theta, "best") == run.info.run_id
    assert tracking.find_training_run(theta, "final") is None
    with tracking.start_run("evaluate@x", parent_run_id=run.info.run_id, system_metrics=False):
        pass
    (child,) = mlflow.search_runs(
        [exp_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", output_format="list"
    )
    assert child.data.tags["dvc.stage"] == "evaluate@x"
    theta.write_bytes(b"other weights")
    assert tracking.find_training_run(theta, "best") is None


def _child_run():
    """A child process inside a stage's MLflow run (``reported`` around it, as in a stage
    script), until it is stopped; (the process, its run id)."""
    import subprocess
    import sys

    code = (
        "import time\nfrom mamlops import tracking\nfrom mamlops.errors import reported\n"
        "with reported('train'), tracking.start_run('train@t', system_metrics=False) as run:\n"
        "    print(run.info.run_id, flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run_id = proc.stdout.readline().strip()
    assert run_id, "the child never started its run"
    return proc, run_id


def test_sigterm_marks_the_run_killed(store: str, tmp_path: Path) -> None:
    """`kill <pid>` (SIGTERM) of a stage mid-run: the run ends KILLED, not RUNNING forever, and
    the stage says so in one line with the shell's status for SIGTERM (it printed a 30-line
    ``KeyboardInterrupt: signal 15`` traceback; issue 25)."""
    import os
    import signal

    import mlflow

    proc, run_id = _child_run()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    err = proc.stderr.read()
    assert "Traceback" not in err
    assert "train: stopped by SIGTERM; outputs of earlier runs are kept" in err.splitlines()
    # the store the child used (the fluent API here may still point at an earlier test's)
    assert mlflow.MlflowClient(store).get_run(run_id).info.status == "KILLED"


def test_the_runs_of_killed_processes_are_marked_killed(store: str) -> None:
    """Issue 25 #4: ``kill -9`` skips the run's ending, and a run started afresh afterwards left
    the killed one RUNNING forever. The next stage run marks it KILLED; a run of a live process
    and one of another host are left alone."""
    import signal
    import subprocess
    import sys

    import mlflow

    proc, killed = _child_run()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    client = mlflow.MlflowClient(store)
    assert client.get_run(killed).info.status == "RUNNING"  # what kill -9 leaves
    exp_id = client.get_run(killed).info.experiment_id
    elsewhere = client.create_run(
        exp_id, tags={"mamlops.host": "elsewhere", "mamlops.pid": str(proc.pid)}
    )
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        here = {
            "mamlops.host": tracking.run_tags("x")["mamlops.host"],
            "mamlops.pid": str(alive.pid),
        }
        live = client.create_run(exp_id, tags=here)
        with tracking.start_run("train@t", system_metrics=False):
            pass
    finally:
        alive.kill()
        alive.wait()
    assert client.get_run(killed).info.status == "KILLED"
    for run in (elsewhere, live):
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
    assert tracking.close_dead_runs() == [live.info.run_id]  # now that its process is gone


def test_unreachable_server_fails_in_seconds(tmp_path: Path, monkeypatch) -> None:
    """A dead MLFLOW_TRACKING_URI: `mamlops train` stops before training, in seconds, with one
    line naming the server (without its credentials) and the fix; no traceback."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": f"http://me:SECRET@127.0.0.1:{port}"}
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mamlops", "train", "omniglot-5w1s", "--params", str(params)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.monotonic() - t0 < 60  # was 251 s of retries, then a traceback
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"http://***@127.0.0.1:{port}" in err and "does not answer" in err
    assert "SECRET" not in err


def test_tracking_server_lost_mid_run_lets_training_go_on(monkeypatch, capsys) -> None:
    """Decided: a tracking server dying mid-run costs the MLflow record, not the training. The
    first failed call prints one line; later calls are skipped. A local store still raises."""
    monkeypatch.setattr(tracking, "_LOST", [])
    calls = []

    @tracking._tolerant
    def log(x: int) -> int:
        calls.append(x)
        raise ConnectionError("server went away")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:TOKEN@127.0.0.1:9")
    assert log(1) is None and log(2) is None
    assert calls == [1]  # skipped once tracking is lost
    err = capsys.readouterr().err
    assert err.count("going on without tracking") == 1 and "TOKEN" not in err
    monkeypatch.setattr(tracking, "_LOST", [])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/mlflow.db")
    with pytest.raises(ConnectionError):
        log(3)

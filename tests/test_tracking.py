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

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

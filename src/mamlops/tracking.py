"""MLflow at the edge: where runs go, and the tags that tie a run to its code and DVC stage.

The store defaults to ``sqlite:///<repo root>/mlflow.db`` with an absolute path, because
``dvc exp run --queue/--temp`` executes stages in a copy under ``.dvc/tmp/exps``: a relative
``sqlite:///mlflow.db`` would land in that throwaway copy and the run would vanish.
``MLFLOW_TRACKING_URI`` overrides it (e.g. a shared server on PostgreSQL).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

EXPERIMENT = "mamlops"


def repo_root(start: Path | None = None) -> Path:
    """The git work tree's top, resolved through DVC's experiment copies to the real repo.

    A DVC temp/queued experiment runs in ``<repo>/.dvc/tmp/exps/<name>``; its ``git`` top is that
    copy, so look for the ``.dvc/tmp/exps`` marker first.
    """
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return Path(top)
    except (OSError, subprocess.CalledProcessError):
        return here


def tracking_uri(start: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute SQLite store at the repo root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{repo_root(start) / 'mlflow.db'}"


def git_commit(start: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=start or Path.cwd(),
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run_tags(stage: str) -> dict[str, str]:
    """Tags that let a reader find the code and the DVC stage/experiment behind a run."""
    tags = {"dvc.stage": stage}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        tags["dvc.experiment"] = exp
    if os.environ.get("DVC_ROOT"):
        tags["dvc.root"] = os.environ["DVC_ROOT"]
    return tags


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: MLflow params are flat key/value pairs."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextlib.contextmanager
def start_run(
    stage: str,
    params: Mapping[str, Any] | None = None,
    *,
    run_name: str | None = None,
    system_metrics: bool = True,
) -> Iterator[Any]:
    """An MLflow run for one stage execution; a run that raises is marked FAILED.

    ``mlflow.start_run`` used as a context manager already ends the run as FAILED when the body
    raises; KeyboardInterrupt (a killed stage) is marked KILLED so resumes are easy to spot.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    run = mlflow.start_run(
        run_name=run_name or stage, tags=run_tags(stage), log_system_metrics=system_metrics
    )
    try:
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def log_metrics(values: Mapping[str, float], step: int | None = None) -> None:
    """Numbers of the active run (the training loop's ``on_metrics`` callback)."""
    import mlflow

    mlflow.log_metrics(dict(values), step=step)


def log_summary(
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
    artifacts: list[tuple[Path, str]],
) -> None:
    """Tags, final numbers and ``(file, artifact folder)`` pairs on the active run."""
    import mlflow

    mlflow.set_tags(dict(tags))
    mlflow.log_metrics(dict(metrics))
    for path, folder in artifacts:
        mlflow.log_artifact(str(path), folder)


def log_evaluation(
    setting: str,
    run_id: str | None,
    metrics: Mapping[str, Any],
    curve: list[dict[str, float]],
    artifacts: list[Path],
) -> str:
    """Add an evaluation to the training run ``run_id`` (one run holds a model's whole story),
    or to a new run tagged with the setting when that run is unknown; returns the run id.

    Numbers become ``eval_<key>`` metrics, the accuracy after each inner step a curve
    (``eval_curve_acc_*`` by step), strings tags, and ``artifacts`` go to ``eval/``.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except Exception as exc:  # store moved or reset: do not lose the evaluation over it
            print(f"warning: training run {run_id} not found ({exc}); logging to a new run")
            run_id = None
    if run_id is not None:
        ctx = mlflow.start_run(run_id=run_id, log_system_metrics=False)
    else:
        tags = {**run_tags(f"evaluate@{setting}"), "mamlops.setting": setting}
        ctx = mlflow.start_run(run_name=f"evaluate-{setting}", tags=tags)
    numbers = {
        f"eval_{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    with ctx as run:
        mlflow.set_tags({f"eval.{k}": str(v) for k, v in metrics.items() if isinstance(v, str)})
        mlflow.log_metrics(numbers)
        for row in curve:
            mlflow.log_metrics(
                {f"eval_curve_{k}": v for k, v in row.items() if k != "step"},
                step=int(row["step"]),
            )
        for path in artifacts:
            mlflow.log_artifact(str(path), "eval")
        return run.info.run_id

"""MLflow at the edge: where runs go, what they are called, and how they link up.

The store defaults to ``sqlite:///<repo root>/mlflow.db`` with an absolute path, because
``dvc exp run --queue/--temp`` executes stages in a copy under ``.dvc/tmp/exps``: a relative
``sqlite:///mlflow.db`` would land in that throwaway copy and the run would vanish. Artifacts
go beside it, to ``<repo root>/mlartifacts``, set when the experiment is created (MLflow's own
default is ``./mlruns`` of whichever folder first created it); beside any SQLite store, in fact.
``MLFLOW_TRACKING_URI`` overrides the store (e.g. a shared server on PostgreSQL, which keeps its
own artifact root).

One training run per ``train@<setting>`` execution, named after the DVC experiment; the
evaluate and export stages log child runs under it, found by the SHA-256 of the theta file
they read (a tag of the training run), so no run id has to travel in a file. Metric keys are
grouped by prefix: ``train/``, ``val/``, ``eval/``, ``export/``; descriptive values are params
or tags, never single-value metrics.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mamlops.errors import UserError, sigterm_as_interrupt
from mamlops.files import file_sha256, folder_digest, process_alive
from mamlops.mlflow_ui import EXPERIMENT_TAGS, shown

EXPERIMENT = "mamlops"
THETA_TAG = "mamlops.theta_sha256.{}"  # best | final: links evaluate/export to training


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
    # who runs it: close_dead_runs marks the run KILLED once this process is gone
    tags = {
        "dvc.stage": stage,
        "mamlops.host": socket.gethostname(),
        "mamlops.pid": str(os.getpid()),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        tags["dvc.experiment"] = exp
    if os.environ.get("DVC_ROOT"):
        tags["dvc.root"] = os.environ["DVC_ROOT"]
    return tags


def run_name(setting: str) -> str:
    """``<setting> <DVC experiment>``, or the start time outside ``dvc exp run``: every rerun
    gets a name of its own, and the experiment's runs are easy to pick out in the list."""
    exp = os.environ.get("DVC_EXP_NAME") or time.strftime("%Y-%m-%d %H:%M")
    return f"{setting} {exp}"


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


class TrackingError(UserError):
    """The MLflow store cannot be reached; the message names it and the fix."""


# MLflow's HTTP client retries a dead server for minutes (7 retries, exponential backoff, 120 s
# timeouts); a stage should fail, or give up tracking, in seconds. A user's own values win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
HEALTH_TIMEOUT_S = 5.0


def check_store(uri: str) -> None:
    """Fail in seconds, with one line, when a tracking server does not answer: before a stage
    trains for an hour and then cannot record it (a file or SQLite store needs no check)."""
    import urllib.error
    import urllib.request

    from mamlops.urls import redact, request

    if not uri.startswith(("http://", "https://")):
        return
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    health = uri.rstrip("/") + "/health"
    try:
        # user:password@ in the URI goes as Basic auth, as MLflow's client sends it
        with urllib.request.urlopen(request(health), timeout=HEALTH_TIMEOUT_S) as response:
            response.read(64)
    except urllib.error.HTTPError:
        return  # it answered (a proxy or auth in front of /health): the server is up
    except (OSError, ValueError) as exc:
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} does not answer ({redact(str(exc))}); start "
            "it, fix MLFLOW_TRACKING_URI, or unset it to use the local mlflow.db"
        ) from exc


def use_store() -> str:
    """Point MLflow's fluent API at this project's store (``tracking_uri``); returns it."""
    import mlflow

    uri = tracking_uri()
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(
    name: str = EXPERIMENT, uri: str | None = None, artifact_location: str | None = None
) -> str:
    """The experiment's id in the store ``uri`` (default: ``tracking_uri``), created on first
    use with the tags of its view in the UI (``mlflow_ui``) and its artifacts at
    ``artifact_location``, by default ``mlartifacts`` beside a SQLite store (MLflow's own
    default is ``./mlruns`` of whichever folder first created it)."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = artifact_location
        if location is None and uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            exp_id = client.create_experiment(name, artifact_location=location)
        except Exception:  # created by a concurrent stage (dvc queue workers) in between
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            exp_id = found.experiment_id
    else:
        exp_id = exp.experiment_id
    for key, value in EXPERIMENT_TAGS.items():
        if exp is None or exp.tags.get(key) != value:
            client.set_experiment_tag(exp_id, key, value)
    return exp_id


# the first failure of a tracking server during this process's run, once one happened
_LOST: list[str] = []


def _tolerant(fn):
    """Training goes on when a tracking *server* dies mid-run (decided: the DVC outputs are the
    record, MLflow a view of it): the first failed call prints one line, later calls are
    skipped. A local store (SQLite, files) failing is a real error (disk full) and raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _LOST:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            uri = tracking_uri()
            if not uri.startswith(("http://", "https://")):
                raise
            from mamlops.urls import redact

            _LOST.append(redact(str(exc))[:300])
            print(
                f"MLflow tracking server {redact(uri)} failed ({_LOST[0]}); going on without "
                "tracking: theta, metrics/ and plots/ are still written, the MLflow run is "
                "incomplete",
                file=sys.stderr,
            )
            return None

    return wrapper


@contextlib.contextmanager
def start_run(
    stage: str,
    params: Mapping[str, Any] | None = None,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
    system_metrics: bool = True,
    resume_run_id: str | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage execution; a run that raises is marked FAILED.

    ``resume_run_id``: the run an interrupted execution of the same stage left (KILLED, FAILED,
    or RUNNING after a kill -9); it is reopened and continued when this store has it, so a
    resumed training is one run with its whole history, not two halves.

    ``parent_run_id`` nests it under that run (evaluate and export under the training run):
    a failure here marks this run FAILED, never the training run. KeyboardInterrupt and SIGTERM
    (a stopped stage) mark it KILLED, so an interrupted run never stays RUNNING.
    """
    import mlflow

    uri = use_store()
    exp_id = experiment_id(uri=uri)
    resume = resume_run_id if resume_run_id and _run_in(resume_run_id, exp_id) else None
    if closed := close_dead_runs(uri, keep=resume):
        print(f"MLflow: marked KILLED the runs of dead processes {closed}", file=sys.stderr)
    with sigterm_as_interrupt():
        run = mlflow.start_run(
            run_id=resume,
            experiment_id=None if resume else exp_id,
            run_name=None if resume else run_name or stage,  # a resumed run keeps its name
            parent_run_id=parent_run_id,
            tags={**run_tags(stage), **(tags or {})},
            description=description,
            log_system_metrics=system_metrics,
        )
        try:
            if params:
                mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
            yield run
        except KeyboardInterrupt:
            _tolerant(mlflow.end_run)(status="KILLED")
            raise
        except BaseException:
            _tolerant(mlflow.end_run)(status="FAILED")
            raise
        else:
            _tolerant(mlflow.end_run)(status="FINISHED")


def close_dead_runs(uri: str | None = None, keep: str | None = None) -> list[str]:
    """Mark KILLED this project's RUNNING runs whose process, on this host, is gone.

    A ``kill -9`` skips ``start_run``'s ending, and a run that then starts from scratch (other
    params) left the killed one RUNNING forever. A run's host and pid are its tags
    (``run_tags``): runs of live processes, of other hosts, and older runs without the tags are
    left alone, as is ``keep`` (the run about to be resumed). Called as each stage starts its
    run and by ``mamlops check``; returns the ids it marked."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []  # no store yet, so nothing ran (and opening it would create it)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    query = f"attributes.status = 'RUNNING' and tags.`mamlops.host` = '{socket.gethostname()}'"
    closed = []
    for run in client.search_runs([exp.experiment_id], query, max_results=1000):
        pid = run.data.tags.get("mamlops.pid", "")
        if run.info.run_id != keep and pid.isdigit() and not process_alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def _run_in(run_id: str, exp_id: str) -> bool:
    """Whether this store holds the active run ``run_id`` in experiment ``exp_id``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        info = mlflow.MlflowClient(tracking_uri()).get_run(run_id).info
    except MlflowException:
        return False
    return info.experiment_id == exp_id and info.lifecycle_stage == "active"


# the training loop's row keys -> metric names grouped by prefix in the MLflow UI
TRAIN_METRICS = {
    "loss": "train/loss",
    "train_acc": "train/acc",
    "meta_lr": "train/meta_lr",
    "tasks_per_s": "train/tasks_per_s",
    "val_acc": "val/acc",
}


@_tolerant
def log_training_metrics(values: Mapping[str, float], step: int | None = None) -> None:
    """One row of the training loop (its ``on_metrics`` callback), under prefixed names."""
    import mlflow

    named = {TRAIN_METRICS.get(k, f"train/{k}"): shown(v) for k, v in values.items()}
    mlflow.log_metrics(named, step=step)


@_tolerant
def log_metrics(values: Mapping[str, float], step: int | None = None) -> None:
    """Numbers of the active run, names as given (callers prefix them)."""
    import mlflow

    mlflow.log_metrics({k: shown(v) for k, v in values.items()}, step=step)


def log_to_finished_run(run_id: str, values: Mapping[str, float]) -> None:
    """Summary numbers onto another (finished) run, e.g. test accuracy onto the training run,
    so the runs list compares training runs on it; the run's status and end time stay."""
    import mlflow
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    metrics = [Metric(k, shown(v), stamp, 0) for k, v in values.items()]
    mlflow.MlflowClient(tracking_uri=tracking_uri()).log_batch(run_id, metrics=metrics)


@_tolerant
def set_tags(tags: Mapping[str, str]) -> None:
    """Tags of the active run."""
    import mlflow

    mlflow.set_tags(dict(tags))


@_tolerant
def log_artifacts(artifacts: list[tuple[Path, str]]) -> None:
    """``(file, artifact folder)`` pairs on the active run."""
    import mlflow

    for path, folder in artifacts:
        mlflow.log_artifact(str(path), folder)


def dvc_hash(path: Path, lock: Path = Path("dvc.lock")) -> str | None:
    """The md5 DVC recorded in ``dvc.lock`` for the output ``path``, if any stage wrote it."""
    import yaml

    if not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return None
    want = Path(path).as_posix().rstrip("/")
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            if out.get("path") == want and out.get("md5"):
                return str(out["md5"])
    return None


@_tolerant
def log_dataset(folder: Path, name: str, context: str) -> None:
    """``log_input`` of a prepared data folder: its DVC hash (``dvc.lock``) as the digest, so
    the run's Datasets column says exactly which data it saw."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    folder = Path(folder)
    md5 = dvc_hash(folder)
    digest = md5.removesuffix(".dir") if md5 else folder_digest(folder)[:32]
    where = folder if folder.is_absolute() else repo_root() / folder  # not DVC's temp copy
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(where))
    mlflow.log_input(MetaDataset(source, name=name, digest=digest), context=context)
    if md5:
        mlflow.set_tag(f"dvc.md5.{folder.as_posix()}", md5)


def theta_tags(files: Mapping[str, Path]) -> dict[str, str]:
    """``{kind: theta file}`` -> the tags that let evaluate/export find this training run."""
    return {THETA_TAG.format(k): file_sha256(p) for k, p in files.items() if Path(p).is_file()}


def find_training_run(theta: Path, kind: str) -> str | None:
    """The latest finished training run that wrote ``theta`` (by its SHA-256), or None when
    this store never saw it (another store, or a model trained elsewhere)."""
    import mlflow

    exp_id = experiment_id(uri=use_store())
    tag = THETA_TAG.format(kind)
    runs = mlflow.search_runs(
        experiment_ids=[exp_id],
        filter_string=f"tags.`{tag}` = '{file_sha256(theta)}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None

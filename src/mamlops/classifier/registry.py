"""Put an exported ONNX classifier into the MLflow model registry under an alias.

Aliases (``models:/NAME@champion``) rather than stages, which MLflow 3 deprecates. The model is
a pyfunc (``mlflow_model.py``, logged from code) around the ONNX file, with a named signature
(input ``x``: float32 [-1, C, H, W]; outputs ``label``, ``probability``, ``p:<label>``) and a
one-image input example, so ``mlflow models serve -m models:/NAME@ALIAS --env-manager local``
accepts ``{"inputs": [[[[...]]]]}`` and answers
``{"predictions": [{"label": "...", "probability": 0.97, "p:<label>": ...}, ...]}``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec

from mamlops import tracking
from mamlops.errors import UserError

DEFAULT_ALIAS = "champion"
BETTER_TAG = "eval_acc_support"  # the number "alias only if better" compares


class RegistryError(UserError):
    """The model cannot be registered: a bad file or an MLflow store that does not answer."""


@contextlib.contextmanager
def _tracking_at(uri: str) -> Iterator[None]:
    """Point the fluent API at ``uri`` for the block only, so callers' settings survive."""
    previous = mlflow.get_tracking_uri()  # never "": that would mean a ./mlruns file store
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _example(meta: dict[str, str]) -> np.ndarray:
    """A blank image in model input layout; blank because the example is stored in the run."""
    c, s = int(meta["channels"]), int(meta["input_size"])
    return np.zeros((1, c, s, s), dtype=np.float32)


def _signature(input_name: str, shape: tuple[int, ...], labels: list[str]) -> ModelSignature:
    """Named: the tensor the ONNX graph takes, and the columns ``mlflow_model.py`` answers."""
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *shape[1:]), input_name)])
    columns = [ColSpec("string", "label"), ColSpec("double", "probability")]
    columns += [ColSpec("double", f"p:{label}") for label in labels]
    return ModelSignature(inputs=inputs, outputs=Schema(columns))


def _requirements() -> list[str]:
    """What the pyfunc imports, at this environment's versions."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "onnxruntime", "numpy", "pandas")]


def log_and_register(
    onnx_path: str | Path,
    model_name: str,
    alias: str | None = DEFAULT_ALIAS,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    experiment: str = tracking.EXPERIMENT,
    artifact_location: str | None = None,
) -> ModelVersion:
    """Log ``onnx_path`` to a run (``run_id`` or a new one), register it, point ``alias`` at it.

    ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI`` or ``sqlite:///<repo>/mlflow.db``;
    ``artifact_location`` only applies when the experiment has to be created (default: beside
    a SQLite store, as ``tracking.experiment_id`` does for the pipeline).
    Returns the new registered model version (with the alias set).
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise RegistryError(f"{onnx_path}: ONNX file not found; export one with `mamlops export`")
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf's DecodeError and friends, untyped
        raise RegistryError(f"{onnx_path}: not an ONNX file ({exc.__class__.__name__})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if "labels" not in meta:
        raise RegistryError(f"{onnx_path}: not a mamlops ONNX export (no 'labels' metadata)")
    import onnxruntime as ort

    example = _example(meta)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: example})  # it runs before it is logged
    signature = _signature(session.get_inputs()[0].name, example.shape, json.loads(meta["labels"]))
    uri = tracking_uri or tracking.tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        with _tracking_at(uri):
            active = mlflow.active_run()
            if active is not None and run_id in (None, active.info.run_id):
                ctx = contextlib.nullcontext(active)  # the export stage's run
            else:
                exp_id = (
                    None if run_id else tracking.experiment_id(experiment, uri, artifact_location)
                )
                ctx = mlflow.start_run(run_id=run_id, experiment_id=exp_id)
            with ctx as run:
                mlflow.set_tags(
                    {
                        "mamlops.labels": meta["labels"],
                        "mamlops.meta_model_sha256": meta.get("meta_model_sha256", ""),
                        "mamlops.dataset": meta.get("dataset", ""),
                    }
                )
                info = mlflow.pyfunc.log_model(
                    name="classifier",
                    python_model=Path(__file__).with_name("mlflow_model.py"),
                    artifacts={"onnx": str(onnx_path)},
                    signature=signature,
                    input_example=example,
                    pip_requirements=_requirements(),
                    registered_model_name=model_name,
                )
            version = str(info.registered_model_version)
            if alias:  # None: register only; the caller decides where the alias goes
                client.set_registered_model_alias(model_name, alias, version)
            tags = {
                "labels": meta["labels"],
                "source_file": str(onnx_path.resolve()),
                "run_id": run.info.run_id,
                "params": json.dumps(json.loads(meta.get("params", "{}"))),
            }
            for key, value in tags.items():
                client.set_model_version_tag(model_name, version, key, value)
            return client.get_model_version(model_name, version)
    # an unreachable server (OSError: refused, unknown host), a store MLflow cannot open
    except (MlflowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
        raise RegistryError(
            f"MLflow store {uri} did not take the model ({first}); check that it is reachable "
            "and writable, or point MLFLOW_TRACKING_URI at one that is"
        ) from None


def register_if_best(
    onnx_path: Path,
    model_name: str,
    alias: str,
    eval_acc: float | None,
    run_id: str | None = None,
) -> dict[str, int | str]:
    """Register a new version; move ``alias`` to it unless the version holding the alias has a
    better evaluated accuracy (tag ``eval_acc_support``), so a worse retrain never takes over
    what ``models:/NAME@ALIAS`` serves."""
    uri = tracking.tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        champion = client.get_model_version_by_alias(model_name, alias)
        previous = (champion.version, float(champion.tags.get(BETTER_TAG, "nan")))
    except MlflowException:  # no registered model or no alias yet: the new version takes it
        previous = None
    version = log_and_register(onnx_path, model_name, None, tracking_uri=uri, run_id=run_id)
    if eval_acc is not None:
        client.set_model_version_tag(model_name, version.version, BETTER_TAG, str(eval_acc))
    better_before = (
        previous is not None
        and eval_acc is not None
        and not np.isnan(previous[1])
        and previous[1] > eval_acc
    )
    holder = previous[0] if better_before else version.version
    client.set_registered_model_alias(model_name, alias, holder)
    return {
        "model": model_name,
        "version": int(version.version),
        "alias": alias,
        "alias_on": int(holder),
    }

"""The ``mamlops`` command line: every pipeline stage, plus adapt/predict/export/serve/register.

Stage commands call the same library functions as the DVC stage scripts in ``pipeline/``, with
the params file of ``--params`` (default ``params.yaml`` in the current folder) and the default
paths (``layout.Layout``, relative to the current folder): ``mamlops train omniglot-5w1s`` and
``dvc repro train@omniglot-5w1s`` read and write the same files. Nothing here needs a checkout.

Imports happen inside each command: ``mamlops predict model.onnx`` and ``mamlops serve`` run on
the ``serve`` extra alone (onnxruntime, no torch, DVC or MLflow), and a command whose extra is
not installed says which one to install. Every mistake a user can make ends in one line on
stderr and exit status 1: bad input (``errors.reported``) and bad usage (a missing argument, a
mistyped option) alike (``cli_errors``). ``--json`` prints a command's result as JSON, alone on
stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

import mamlops
from mamlops.cli_errors import OneLineErrors, check_registry_names, command, store_error
from mamlops.errors import UserError


def json_out(as_json: bool) -> contextlib.AbstractContextManager[Any]:
    """With ``--json``, whatever the library prints while working (progress, summaries) goes to
    stderr, so stdout holds the JSON alone."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


def echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


app = typer.Typer(
    cls=OneLineErrors,
    help="MAML few-shot image classification: DVC stages, MLflow tracking, ONNX serving.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

ParamsFile = Annotated[
    Path, typer.Option("--params", help="params file to read (default: ./params.yaml)")
]
PARAMS_DEFAULT = Path("params.yaml")
Json = Annotated[
    bool, typer.Option("--json", help="print the result as JSON (alone on stdout) for scripts")
]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mamlops {mamlops.version()}")
        raise typer.Exit()


@app.callback()
def _process_settings(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Process-wide settings, once, at entry (see malloc.py; no effect on results)."""
    from mamlops.malloc import keep_freed_memory

    keep_freed_memory()


@app.command()
def check(params_file: ParamsFile = PARAMS_DEFAULT) -> None:
    """Pre-flight before `dvc repro` deletes anything: params and presets against the schema, the
    trained settings, the MLflow store; releases DVC's lock of a killed dvc and removes the work
    folders a killed download or prepare left (make run runs it)."""
    with command("check"):
        from mamlops.cli_check import preflight

        lines = preflight(params_file)
    for line in lines:
        typer.echo(line)


@app.command()
def download(
    dest: Annotated[Path, typer.Option(help="where the verified Omniglot goes")] = Path(
        "data/raw/omniglot"
    ),
    mirror: Annotated[
        str | None,
        typer.Option(
            help="local folder or URL base with the zips; wins over MAMLOPS_DATA_MIRROR and "
            "data.mirror"
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="download again even if a verified copy is there")
    ] = False,
    params_file: ParamsFile = PARAMS_DEFAULT,
) -> None:
    """Fetch and verify Omniglot (official URLs, or a mirror), atomically."""
    with command("download"):
        from mamlops.config import DataConfig
        from mamlops.data.download import fetch_omniglot, resolve_mirror
        from mamlops.params import load_params

        params_mirror = None
        if mirror is None and params_file.is_file():
            params_mirror = DataConfig.from_params(load_params(params_file)).mirror
        summary = fetch_omniglot(dest, resolve_mirror(params_mirror, flag=mirror), force=force)
    echo_json({k: summary.get(k) for k in ("source", "counts", "skipped")})


@app.command()
def verify(root: Annotated[Path, typer.Argument(help="an extracted Omniglot folder")]) -> None:
    """Check an Omniglot folder by content (structure, PNG decoding, fingerprint)."""
    with command("verify"):
        from mamlops.data.download import verify_omniglot

        typer.echo(json.dumps(verify_omniglot(root), indent=2, default=str))


@app.command()
def prepare(
    dataset: Annotated[str, typer.Argument(help="omniglot or miniimagenet")] = "omniglot",
    params_file: ParamsFile = PARAMS_DEFAULT,
) -> None:
    """The prepare stage for one data set (as `dvc repro prepare@DATASET`)."""
    with command("prepare"):
        from mamlops.config import DataConfig, PrepareConfig
        from mamlops.data.prepare import prepare_stage
        from mamlops.layout import Layout
        from mamlops.params import load_params

        layout = Layout()
        params = load_params(params_file)
        cfg = PrepareConfig.from_params(params)
        source = DataConfig.from_params(params).source(dataset, layout.raw_omniglot)
        prepare_stage(cfg, dataset, source, layout.prepared(dataset))


@app.command()
def train(
    setting: Annotated[str, typer.Argument(help="a preset name (presets.yaml)")],
    params_file: ParamsFile = PARAMS_DEFAULT,
) -> None:
    """Meta-train one setting with MLflow tracking; resumes from its checkpoint."""
    with command("train"):
        from mamlops.config import TrainConfig
        from mamlops.layout import Layout
        from mamlops.meta.train_stage import train_stage
        from mamlops.params import load_params

        layout = Layout()
        cfg = TrainConfig.from_params(load_params(params_file), setting)
        train_stage(cfg, *layout.train_paths(setting, cfg.dataset))


@app.command()
def evaluate(
    setting: Annotated[str, typer.Argument(help="a trained setting (a preset name)")],
    params_file: ParamsFile = PARAMS_DEFAULT,
    as_json: Json = False,
) -> None:
    """Score a trained setting on its 600 fixed test episodes (both BatchNorm protocols)."""
    with command("evaluate"):
        from mamlops.config import EvaluateConfig, TrainConfig
        from mamlops.layout import Layout
        from mamlops.meta.evaluate import evaluate_stage
        from mamlops.params import load_params

        layout = Layout()
        params = load_params(params_file)
        cfg = TrainConfig.from_params(params, setting)
        with json_out(as_json):
            metrics = evaluate_stage(
                cfg,
                EvaluateConfig.from_params(params),
                *layout.evaluate_paths(setting, cfg.dataset),
            )
    if as_json:
        echo_json({"setting": setting, **metrics})


@app.command()
def publish(
    setting: Annotated[str, typer.Argument(help="a trained and evaluated setting")],
    params_file: ParamsFile = PARAMS_DEFAULT,
) -> None:
    """The export stage: adapt a demo classifier, export ONNX, check parity, register it."""
    with command("publish"):
        from mamlops.classifier.export import export_stage
        from mamlops.config import ExportConfig, TrainConfig
        from mamlops.layout import Layout
        from mamlops.params import load_params

        layout = Layout()
        params = load_params(params_file)
        cfg = TrainConfig.from_params(params, setting)
        export_stage(
            cfg, ExportConfig.from_params(params), *layout.export_paths(setting, cfg.dataset)
        )


@app.command()
def adapt(
    support_dir: Annotated[Path, typer.Argument(help="one subfolder per class with K images")],
    meta: Annotated[Path, typer.Option(help="meta-model: models/<setting>/theta_best.safetensors")],
    out: Annotated[Path, typer.Option(help="where the adapted classifier (.safetensors) goes")],
    steps: Annotated[int | None, typer.Option(help="inner steps (default: the model's)")] = None,
    lr: Annotated[float | None, typer.Option(help="inner lr (default: the model's)")] = None,
) -> None:
    """Adapt the base-learner to your own classes from a folder of a few images per class."""
    with command("adapt"):
        from mamlops.classifier.adapt import adapt_folder

        clf = adapt_folder(support_dir, meta, steps=steps, lr=lr)
        clf.save(out)
    typer.echo(f"adapted classifier for {len(clf.labels)} classes {clf.labels} -> {out}")


@app.command("evaluate-folder")
def evaluate_folder(
    classifier: Annotated[Path, typer.Argument(help="an adapted classifier (.safetensors)")],
    query_dir: Annotated[Path, typer.Argument(help="one subfolder per class, as for adapt")],
    as_json: Json = False,
) -> None:
    """Accuracy and a per-class table of an adapted classifier on labelled folders."""
    with command("evaluate-folder"):
        if classifier.suffix == ".onnx":
            raise UserError(
                f"{classifier}: evaluate-folder takes the adapted classifier (.safetensors), "
                "not its ONNX export"
            )
        from mamlops.classifier.adapt import evaluate_folder as run
        from mamlops.classifier.classifier import Classifier

        report = run(Classifier.load(classifier), query_dir)
    if as_json:
        echo_json({"classifier": str(classifier), **report})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"accuracy {100 * report['accuracy']:.1f}% on {report['n']} images")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("accuracy", justify="right")
    for label, row in report["per_class"].items():
        table.add_row(label, str(row["n"]), f"{100 * row['accuracy']:.1f}%")
    Console().print(table)


def check_images(images: Sequence[Path]) -> None:
    """Every image argument is an existing file; else one line naming the first that is not
    (before any decoding, whose message would suggest converting the file)."""
    for path in images:
        if not path.is_file():
            what = "not a file" if path.exists() else "no such file"
            raise UserError(f"image {path}: {what}; pass paths of existing image files")


def ranked_prediction(
    ranked: Sequence[tuple[str, float]], labels: Sequence[str], top_k: int
) -> dict[str, Any]:
    """One image's prediction from its full ranking, in the shape onnx_predict gives: best
    label and probability, every probability by label (in label order), the top k."""
    probs = dict(ranked)
    return {
        "label": ranked[0][0],
        "probability": ranked[0][1],
        "probabilities": {label: probs[label] for label in labels},
        "top_k": [{"label": lab, "probability": p} for lab, p in ranked[:top_k]],
    }


def _predict(model: Path, images: list[Path], top_k: int) -> list[dict[str, Any]]:
    """Predictions per image, from onnxruntime alone for .onnx, else from PyTorch."""
    if model.suffix == ".onnx":
        from mamlops.classifier.onnx_predict import OnnxClassifier

        onnx_clf = OnnxClassifier(model)
        check_images(images)
        preds = onnx_clf.predict_images([str(p) for p in images], top_k)
    else:
        from mamlops.classifier.adapt import predict_paths
        from mamlops.classifier.classifier import Classifier

        clf = Classifier.load(model)
        check_images(images)
        ranked = predict_paths(clf, images, len(clf.labels))
        preds = [ranked_prediction(r, clf.labels, top_k) for r in ranked]
    return [{"image": str(path), **pred} for path, pred in zip(images, preds, strict=True)]


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="an adapted classifier (.safetensors) or .onnx")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    top_k: Annotated[
        int, typer.Option(min=1, help="how many classes to list per image, most likely first")
    ] = 1,
    as_json: Json = False,
) -> None:
    """Per image: its path, then label and probability of the top-k classes, tab-separated
    (with --json: label, probability, every class's probability and the top k). ONNX models
    run on onnxruntime only (no torch)."""
    with command("predict"):
        preds = _predict(model, images, top_k)
    if as_json:
        echo_json({"model": str(model), "predictions": preds})
        return
    for pred in preds:
        classes = [f"{t['label']}\t{t['probability']:.4f}" for t in pred["top_k"]]
        typer.echo("\t".join([pred["image"], *classes]))


@app.command()
def export(
    classifier: Annotated[Path, typer.Argument(help="an adapted classifier (.safetensors)")],
    out: Annotated[Path, typer.Option(help="the .onnx file to write")],
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's)")] = None,
) -> None:
    """Export an adapted classifier to ONNX (BatchNorm folded, labels in the metadata)."""
    with command("export"):
        from mamlops.classifier.classifier import Classifier
        from mamlops.classifier.onnx_export import export_onnx
        from mamlops.config import DEFAULT_OPSET

        path = export_onnx(Classifier.load(classifier), out, opset or DEFAULT_OPSET)
    typer.echo(f"wrote {path}")


@app.command()
def serve(
    model: Annotated[
        Path | None,
        typer.Argument(help="an .onnx file, or a folder of them (optional with --meta)"),
    ] = None,
    meta: Annotated[
        Path | None,
        typer.Option(help="a meta-model (theta .safetensors) to teach new classifiers from"),
    ] = None,
    store: Annotated[Path, typer.Option(help="where taught classifiers are kept")] = Path(
        "classifiers"
    ),
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one, named at start)")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="largest accepted request body")] = 10.0,
    max_shots: Annotated[int, typer.Option(help="images per class when teaching")] = 10,
    max_teaching: Annotated[int, typer.Option(help="adaptations at once, then 429")] = 2,
) -> None:
    """Serve ONNX classifiers over HTTP: /predict, /health, /models, /metadata, /docs; with
    --meta, also teach new ones: POST /classifiers, and a page to draw and teach at /."""
    with command("serve"):
        if not max_upload_mb > 0:
            raise UserError(f"--max-upload-mb must be above 0, got {max_upload_mb}")
        from mamlops.classifier.teach import TeachLimits
        from mamlops.serving.serve import serve as run

        limits = TeachLimits(max_shots=max_shots, max_teaching=max_teaching)
        run(
            model,
            host=host,
            port=port,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
            meta_path=meta,
            store=store,
            limits=limits,
        )


@app.command()
def register(
    onnx_model: Annotated[Path, typer.Argument(help="an exported .onnx file")],
    name: Annotated[str, typer.Option(help="registered model name")] = "mamlops-classifier",
    alias: Annotated[str, typer.Option(help="alias to point at the new version")] = "champion",
    as_json: Json = False,
) -> None:
    """Log an ONNX classifier to MLflow (MLFLOW_TRACKING_URI, else ./mlflow.db), register it
    and point an alias at it."""
    with command("register"):
        from mlflow.exceptions import MlflowException

        from mamlops import tracking
        from mamlops.classifier.registry import log_and_register

        check_registry_names(name, alias)
        try:
            with json_out(as_json):
                version = log_and_register(onnx_model, name, alias)
        except MlflowException as exc:
            raise UserError(store_error(tracking.tracking_uri(), exc)) from None
    result = {
        "name": name,
        "version": int(version.version),
        "alias": alias,
        "model_uri": f"models:/{name}@{alias}",
        "run_id": version.run_id,
    }
    if as_json:
        echo_json(result)
        return
    typer.echo(f"registered {name} version {version.version} as @{alias}")


@app.command()
def report(
    readme: Annotated[
        Path | None, typer.Option(help="rewrite this file's results section instead of printing")
    ] = None,
    metrics: Annotated[Path, typer.Option(help="folder with eval/ and train/")] = Path("metrics"),
    also: Annotated[
        list[Path] | None,
        typer.Option(
            help="a folder of runs made elsewhere (its metrics/ and results/); repeatable"
        ),
    ] = None,
) -> None:
    """The results table (this project's accuracies beside the MAML paper's and MAML++'s)."""
    with command("report"):
        from mamlops.report import load_all, render_table, update_readme

        table = render_table(load_all(metrics, also or []))
        if readme is None:
            typer.echo(table)
            return
        update_readme(readme, table)
    typer.echo(f"updated {readme}")

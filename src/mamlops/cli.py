"""The ``mamlops`` command line: every pipeline stage, plus adapt/predict/export/serve/register.

Stage commands call the same library functions as the DVC stage scripts in ``pipeline/``, with
the params file of ``--params`` (default ``params.yaml`` in the current folder) and the default
paths (``config.Layout``, relative to the current folder): ``mamlops train omniglot-5w1s`` and
``dvc repro train@omniglot-5w1s`` read and write the same files. Nothing here needs a checkout.

Imports happen inside each command: ``mamlops predict model.onnx`` and ``mamlops serve`` run on
onnxruntime alone and must not pay for (or require) torch. Bad input ends in a one-line message
and exit status 1 (``errors.reported``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mamlops.errors import reported

app = typer.Typer(
    help="MAML few-shot image classification: DVC stages, MLflow tracking, ONNX serving.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

ParamsFile = Annotated[
    Path, typer.Option("--params", help="params file to read (default: ./params.yaml)")
]
PARAMS_DEFAULT = Path("params.yaml")


@app.callback()
def _process_settings() -> None:
    """Process-wide settings, once, at entry (see malloc.py; no effect on results)."""
    from mamlops.malloc import keep_freed_memory

    keep_freed_memory()


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
    from mamlops.config import DataConfig, load_params
    from mamlops.download import fetch_omniglot, resolve_mirror

    with reported("download"):
        params_mirror = None
        if mirror is None and params_file.is_file():
            params_mirror = DataConfig.from_params(load_params(params_file)).mirror
        summary = fetch_omniglot(dest, resolve_mirror(params_mirror, flag=mirror), force=force)
    typer.echo(json.dumps({k: summary.get(k) for k in ("source", "counts", "skipped")}, indent=2))


@app.command()
def verify(root: Annotated[Path, typer.Argument(help="an extracted Omniglot folder")]) -> None:
    """Check an Omniglot folder by content (structure, PNG decoding, fingerprint)."""
    from mamlops.download import verify_omniglot

    with reported("verify"):
        typer.echo(json.dumps(verify_omniglot(root), indent=2, default=str))


@app.command()
def prepare(
    dataset: Annotated[str, typer.Argument(help="omniglot or miniimagenet")] = "omniglot",
    params_file: ParamsFile = PARAMS_DEFAULT,
) -> None:
    """The prepare stage for one data set (as `dvc repro prepare@DATASET`)."""
    from mamlops.config import DataConfig, Layout, PrepareConfig, load_params
    from mamlops.prepare import prepare_stage

    layout = Layout()
    with reported("prepare"):
        params = load_params(params_file)
        cfg = PrepareConfig.from_params(params)
        source = DataConfig.from_params(params).source(dataset, layout.raw_omniglot)
        prepare_stage(cfg, dataset, source, layout.prepared(dataset))


@app.command()
def train(
    setting: Annotated[str, typer.Argument(help="a key of train.presets in the params file")],
    params_file: ParamsFile = PARAMS_DEFAULT,
) -> None:
    """Meta-train one setting with MLflow tracking; resumes from its checkpoint."""
    from mamlops.config import Layout, TrainConfig, load_params
    from mamlops.train import train_stage

    layout = Layout()
    with reported("train"):
        cfg = TrainConfig.from_params(load_params(params_file), setting)
        train_stage(
            cfg,
            layout.prepared(cfg.dataset),
            layout.model_dir(setting),
            layout.checkpoint_dir(setting),
            layout.metrics("train", setting),
            layout.train_plot(setting),
        )


@app.command()
def evaluate(
    setting: Annotated[str, typer.Argument(help="a trained setting (key of train.presets)")],
    params_file: ParamsFile = PARAMS_DEFAULT,
) -> None:
    """Score a trained setting on its 600 fixed test episodes (both BatchNorm protocols)."""
    from mamlops.config import EvaluateConfig, Layout, TrainConfig, load_params
    from mamlops.evaluate import evaluate_stage

    layout = Layout()
    with reported("evaluate"):
        params = load_params(params_file)
        cfg = TrainConfig.from_params(params, setting)
        evaluate_stage(
            cfg,
            EvaluateConfig.from_params(params),
            layout.prepared(cfg.dataset),
            layout.model_dir(setting),
            layout.metrics("eval", setting),
            layout.eval_steps_plot(setting),
            layout.episodes_plot(setting),
        )


@app.command()
def publish(
    setting: Annotated[str, typer.Argument(help="a trained and evaluated setting")],
    params_file: ParamsFile = PARAMS_DEFAULT,
) -> None:
    """The export stage: adapt a demo classifier, export ONNX, check parity, register it."""
    from mamlops.config import ExportConfig, Layout, TrainConfig, load_params
    from mamlops.export import export_stage

    layout = Layout()
    with reported("publish"):
        params = load_params(params_file)
        cfg = TrainConfig.from_params(params, setting)
        export_stage(
            cfg,
            ExportConfig.from_params(params),
            layout.prepared(cfg.dataset),
            layout.model_dir(setting),
            layout.metrics("eval", setting),
            layout.metrics("export", setting),
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
    from mamlops.adapt import adapt_folder

    with reported("adapt"):
        clf = adapt_folder(support_dir, meta, steps=steps, lr=lr)
        clf.save(out)
    typer.echo(f"adapted classifier for {len(clf.labels)} classes {clf.labels} -> {out}")


@app.command("evaluate-folder")
def evaluate_folder(
    classifier: Annotated[Path, typer.Argument(help="an adapted classifier (.safetensors)")],
    query_dir: Annotated[Path, typer.Argument(help="one subfolder per class, as for adapt")],
) -> None:
    """Accuracy and a per-class table of an adapted classifier on labelled folders."""
    from rich.console import Console
    from rich.table import Table

    from mamlops.adapt import evaluate_folder as run
    from mamlops.classifier import Classifier

    with reported("evaluate-folder"):
        report = run(Classifier.load(classifier), query_dir)
    table = Table(title=f"accuracy {100 * report['accuracy']:.1f}% on {report['n']} images")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("accuracy", justify="right")
    for label, row in report["per_class"].items():
        table.add_row(label, str(row["n"]), f"{100 * row['accuracy']:.1f}%")
    Console().print(table)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="an adapted classifier (.safetensors) or .onnx")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    top_k: Annotated[
        int, typer.Option(min=1, help="how many classes to list per image, most likely first")
    ] = 1,
) -> None:
    """Per image: its path, then label and probability of the top-k classes, tab-separated.
    ONNX models run on onnxruntime only (no torch)."""
    with reported("predict"):
        if model.suffix == ".onnx":
            from mamlops.onnx_predict import OnnxClassifier

            preds = OnnxClassifier(model).predict_images([str(p) for p in images], top_k)
            ranked = [[(t["label"], t["probability"]) for t in p["top_k"]] for p in preds]
        else:
            from mamlops.adapt import predict_paths
            from mamlops.classifier import Classifier

            ranked = predict_paths(Classifier.load(model), images, top_k)
    for path, classes in zip(images, ranked, strict=True):
        typer.echo("\t".join([str(path), *(f"{label}\t{p:.4f}" for label, p in classes)]))


@app.command()
def export(
    classifier: Annotated[Path, typer.Argument(help="an adapted classifier (.safetensors)")],
    out: Annotated[Path, typer.Option(help="the .onnx file to write")],
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's)")] = None,
) -> None:
    """Export an adapted classifier to ONNX (BatchNorm folded, labels in the metadata)."""
    from mamlops.classifier import Classifier
    from mamlops.export import DEFAULT_OPSET, export_onnx

    with reported("export"):
        path = export_onnx(Classifier.load(classifier), out, opset or DEFAULT_OPSET)
    typer.echo(f"wrote {path}")


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="an .onnx file, or a folder of them")],
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="largest accepted request body")] = 10.0,
) -> None:
    """Serve ONNX classifiers over HTTP: /health, /metadata, /predict (onnxruntime only)."""
    from mamlops.serve import serve as run

    with reported("serve"):
        run(model, host=host, port=port, max_upload_bytes=int(max_upload_mb * 1024 * 1024))


@app.command()
def register(
    onnx_model: Annotated[Path, typer.Argument(help="an exported .onnx file")],
    name: Annotated[str, typer.Option(help="registered model name")] = "mamlops-classifier",
    alias: Annotated[str, typer.Option(help="alias to point at the new version")] = "champion",
) -> None:
    """Log an ONNX classifier to MLflow (MLFLOW_TRACKING_URI, else ./mlflow.db), register it
    and point an alias at it."""
    from mamlops.registry import log_and_register

    with reported("register"):
        version = log_and_register(onnx_model, name, alias)
    typer.echo(f"registered {name} version {version.version} as @{alias}")


@app.command()
def report(
    readme: Annotated[
        Path | None, typer.Option(help="rewrite this file's results section instead of printing")
    ] = None,
    metrics: Annotated[Path, typer.Option(help="folder with eval/ and train/")] = Path("metrics"),
) -> None:
    """The results table (this project's accuracies beside the MAML paper's) from metrics/."""
    from mamlops.report import load_results, render_table, update_readme

    with reported("report"):
        table = render_table(load_results(metrics))
        if readme is None:
            typer.echo(table)
            return
        update_readme(readme, table)
    typer.echo(f"updated {readme}")

"""The ``mamlops`` command line: every pipeline stage plus adapt/predict/export/serve.

Imports happen inside each command: ``mamlops predict model.onnx`` and ``mamlops serve`` run on
onnxruntime alone and must not pay for (or require) torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="MAML few-shot image classification: DVC stages, MLflow tracking, ONNX serving.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg="red", err=True)
    raise typer.Exit(1)


@app.command()
def download(
    dest: Annotated[Path, typer.Option(help="where the verified Omniglot goes")] = Path(
        "data/raw/omniglot"
    ),
    mirror: Annotated[
        str | None,
        typer.Option(help="local folder or URL base with the zips (default: MAMLOPS_DATA_MIRROR)"),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="download again even if a verified copy is there")
    ] = False,
) -> None:
    """Fetch and verify Omniglot (official URLs, or a mirror), atomically."""
    from .download import DataError, fetch_omniglot, resolve_mirror

    try:
        summary = fetch_omniglot(dest, resolve_mirror(mirror), force=force)
    except DataError as exc:
        _fail(exc)
    typer.echo(json.dumps({k: summary[k] for k in ("source", "counts")}, indent=2))


@app.command()
def verify(root: Annotated[Path, typer.Argument(help="an extracted Omniglot folder")]) -> None:
    """Check an Omniglot folder by content (structure, PNG decoding, fingerprint)."""
    from .download import DataError, verify_omniglot

    try:
        typer.echo(json.dumps(verify_omniglot(root), indent=2, default=str))
    except DataError as exc:
        _fail(exc)


@app.command()
def prepare(
    dataset: Annotated[str, typer.Argument(help="omniglot or miniimagenet")] = "omniglot",
    params_file: Annotated[Path, typer.Option("--params")] = Path("params.yaml"),
) -> None:
    """Run the prepare stage for one dataset with params.yaml (same as `dvc repro prepare`)."""
    _run_stage("prepare", [dataset], params_file)


@app.command()
def train(
    setting: Annotated[str, typer.Argument(help="a key of train.presets in params.yaml")],
    params_file: Annotated[Path, typer.Option("--params")] = Path("params.yaml"),
) -> None:
    """Meta-train one setting with MLflow tracking; resumes from its checkpoint."""
    _run_stage("train", [setting], params_file)


@app.command()
def evaluate(
    setting: Annotated[str, typer.Argument(help="a trained setting (key of train.presets)")],
    params_file: Annotated[Path, typer.Option("--params")] = Path("params.yaml"),
) -> None:
    """Score a trained setting on its 600 fixed test episodes (both BatchNorm protocols)."""
    _run_stage("evaluate", [setting], params_file)


def _run_stage(name: str, args: list[str], params_file: Path) -> None:
    """Run a pipeline stage script in-process, from the folder holding params.yaml."""
    import os
    import runpy

    root = params_file.resolve().parent
    script = root / "pipeline" / f"{name}.py"
    if not script.is_file():
        _fail(FileNotFoundError(f"{script}: run from a mamlops checkout (pipeline/ missing)"))
    os.chdir(root)
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise typer.Exit(exc.code if isinstance(exc.code, int) else 1) from None


@app.command()
def adapt(
    support_dir: Annotated[Path, typer.Argument(help="one subfolder per class with K images")],
    meta: Annotated[Path, typer.Option(help="meta-model: models/<setting>/theta_best.safetensors")],
    out: Annotated[Path, typer.Option(help="where the adapted classifier (.safetensors) goes")],
    steps: Annotated[int | None, typer.Option(help="inner steps (default: the model's)")] = None,
    lr: Annotated[float | None, typer.Option(help="inner lr (default: the model's)")] = None,
) -> None:
    """Adapt the base-learner to your own classes from a folder of a few images per class."""
    from .adapt import adapt_folder

    try:
        clf = adapt_folder(support_dir, meta, steps=steps, lr=lr)
        clf.save(out)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(f"adapted classifier for {len(clf.labels)} classes {clf.labels} -> {out}")


@app.command("evaluate-folder")
def evaluate_folder(
    classifier: Annotated[Path, typer.Argument(help="an adapted classifier (.safetensors)")],
    query_dir: Annotated[Path, typer.Argument(help="one subfolder per class, as for adapt")],
) -> None:
    """Accuracy and a per-class table of an adapted classifier on labelled folders."""
    from .adapt import evaluate_folder as run
    from .classifier import Classifier

    try:
        report = run(Classifier.load(classifier), query_dir)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    _print_folder_report(report)


def _print_folder_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

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
    top_k: Annotated[int, typer.Option(help="how many classes to list per image")] = 1,
) -> None:
    """Label and probability per image; ONNX models run on onnxruntime only (no torch)."""
    try:
        if model.suffix == ".onnx":
            from .onnx_predict import OnnxClassifier, OnnxModelError

            try:
                preds = OnnxClassifier(model).predict_images([str(p) for p in images], top_k)
            except OnnxModelError as exc:
                _fail(exc)
            for path, pred in zip(images, preds, strict=True):
                typer.echo(f"{path}\t{pred['label']}\t{pred['probability']:.4f}")
            return
        from .adapt import predict_paths
        from .classifier import Classifier

        for path, (label, prob) in zip(
            images, predict_paths(Classifier.load(model), images), strict=True
        ):
            typer.echo(f"{path}\t{label}\t{prob:.4f}")
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)


@app.command()
def export(
    classifier: Annotated[Path, typer.Argument(help="an adapted classifier (.safetensors)")],
    out: Annotated[Path, typer.Option(help="the .onnx file to write")],
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's)")] = None,
) -> None:
    """Export an adapted classifier to ONNX (BatchNorm folded, labels in the metadata)."""
    from .classifier import Classifier
    from .export import DEFAULT_OPSET, export_onnx

    try:
        path = export_onnx(Classifier.load(classifier), out, opset or DEFAULT_OPSET)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(f"wrote {path}")


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="an .onnx file, or a folder of them")],
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="largest accepted request body")] = 10.0,
) -> None:
    """Serve ONNX classifiers over HTTP: /health, /metadata, /predict (onnxruntime only)."""
    from .serve import serve as run

    run(model, host=host, port=port, max_upload_bytes=int(max_upload_mb * 1024 * 1024))


@app.command()
def register(
    onnx_model: Annotated[Path, typer.Argument(help="an exported .onnx file")],
    name: Annotated[str, typer.Option(help="registered model name")] = "mamlops-classifier",
    alias: Annotated[str, typer.Option(help="alias to point at the new version")] = "champion",
) -> None:
    """Log an ONNX classifier to MLflow, register it and set an alias."""
    from .registry import log_and_register

    version = log_and_register(onnx_model, name, alias)
    typer.echo(f"registered {name} version {version.version} as @{alias}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()

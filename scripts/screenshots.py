"""Screenshots for the docs: DVC's plots page, the MLflow UI and the teaching page, as PNGs
under docs/img/.

Run from the repository root after a pipeline run (``dvc repro``), in the project's venv:

    python scripts/screenshots.py                 # all of them
    python scripts/screenshots.py --only mlflow   # or: --only dvc, --only teach

Needs Debian's ``chromium`` and ``chromium-driver`` (apt-get install chromium chromium-driver)
and, once, npm (for Vega, see dvc_plots_offline.py). Nothing is fetched from the internet.

* ``dvc-plots.png``: ``dvc plots show`` rendered offline (dvc_plots_offline.py), the whole page.
* ``mlflow-runs.png``, ``mlflow-runs-charts.png``: experiment "mamlops", its runs as a table
  (metric and param columns) and as charts comparing the runs.
* ``mlflow-run.png``: the latest training run's model metrics (charts).
* ``mlflow-model.png``: the registered model (the latest ``mamlops-*`` one) with its versions.
* ``teach.png``: the page of ``mamlops serve --meta models/omniglot-5w1s/theta_best.safetensors``
  (a temporary store) after teaching five Omniglot characters of images_evaluation.zip, one
  drawing each (two drawn with the pointer, three uploaded), then classifying held-out drawings
  (uploaded, and one drawn on the test pad).

``mlflow ui`` is started on a free port against ``sqlite:///<repo>/mlflow.db`` (telemetry off)
and stopped at the end. Pages are opened with ``?workflowType=machine_learning``: MLflow 3.17
otherwise shows the GenAI view (traces) of an experiment, whatever its tags say; the runs table
at the address ``make mlflow-ui`` prints (``mlflow_ui.runs_page``: the key columns), as a user
opens it.

Chromium is driven through chromedriver's W3C WebDriver HTTP API with urllib (webdriver.py)
rather than ``chromium --headless --screenshot``: that one can wait for JavaScript
(``--virtual-time-budget``), but it cannot close MLflow's assistant panel (in localStorage),
wait for a given text, size a full-page shot, or draw
and upload on the teaching page; and talking HTTP to chromedriver keeps selenium out of the
project's dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules beside this file
import dvc_plots_offline  # noqa: E402
from teach_page import TeachPage  # noqa: E402
from webdriver import BrowserError, WebDriver, browser, free_port, process  # noqa: E402

from mamlops import mlflow_ui, tracking  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "mamlops"
MODEL_PREFIX = "mamlops-"
# charts shown (by MLflow's chart search, a regex), those present: the runs compared on test and
# validation accuracy; the training run's curves
COMPARE_CHARTS = ("eval/acc_transductive", "eval/acc_support", "val/best_acc")
RUN_CHARTS = ("train/loss", "train/acc", "val/acc", "train/tasks_per_s")
# the teaching page: its meta-model, the characters taught (the first of five alphabets of
# Omniglot's evaluation set, labelled by alphabet; alphabets of the Vinyals test split, so
# characters `make run`'s meta-model never saw), how many of them are drawn with the pointer
# rather than uploaded, and the held-out drawings classified
TEACH_META = ROOT / "models" / "omniglot-5w1s" / "theta_best.safetensors"
TEACH_ZIP = ROOT.parent / "shared" / "data" / "omniglot" / "images_evaluation.zip"
TEACH_ALPHABETS = ("Kannada", "Keble", "Malayalam", "Tengwar", "Tibetan")
TEACH_DRAWN = 2
TEACH_HELD_OUT = 1
TEACH_SIZE = (1280, 900)


def shoot_dvc(web: WebDriver, out: Path) -> None:
    page = dvc_plots_offline.render()
    web.get(page.as_uri())
    charts = "document.querySelectorAll('div[id] > script').length"
    drawn = "document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks').length"
    web.wait(f"return {drawn} >= {charts}", what="every Vega chart drawn")
    web.wait("return [...document.images].every(i => i.complete && i.naturalWidth > 0)",
             what="every image loaded")  # fmt: skip
    time.sleep(0.5)
    web.screenshot(out / "dvc-plots.png", full_page=True)


def _mlflow_ids(uri: str) -> dict[str, Any]:
    """Experiment id, runs, the latest training run and registered model, from the store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise SystemExit(f'{uri} has no experiment "{EXPERIMENT}": run the pipeline first')
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    training = [r for r in runs if r.data.tags.get("dvc.stage", "").startswith("train")]
    if not training:
        raise SystemExit(f'no training run in experiment "{EXPERIMENT}" of {uri}')
    models = client.search_registered_models(f"name LIKE '{MODEL_PREFIX}%'")
    models.sort(key=lambda m: m.last_updated_timestamp or 0, reverse=True)
    return {
        "experiment": tracking.experiment_id(uri=uri),  # its tags as the current code sets them
        "run": training[0],
        # top-level runs only: evaluate/export are child rows, collapsed in the list
        "run_names": [r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags],
        "model": models[0] if models else None,
        "metrics": {k for r in runs for k in r.data.metrics},
    }


def _prepare_storage(web: WebDriver, base: str) -> None:
    """localStorage of the MLflow origin: the assistant panel closed (it covers the table)."""
    web.get(f"{base}/health")  # any page of the origin, without the app
    items = {
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        "mlflow.workflowType_v1": json.dumps("machine_learning"),
    }
    web.js("for (const [k, v] of Object.entries(arguments[0])) localStorage.setItem(k, v)", items)


def _charts(web: WebDriver, names: list[str]) -> None:
    """Show only the charts of metrics ``names`` (all of them when empty) and wait for them."""
    if names:
        pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
        web.type_into('input[placeholder="Search metric charts"]', pattern)
    web.wait_text(*names)


def shoot_mlflow(web: WebDriver, out: Path, db: Path) -> None:
    uri = f"sqlite:///{db.resolve()}"
    ids = _mlflow_ids(uri)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    args = [str(mlflow) if mlflow.exists() else "mlflow", "ui", "--backend-store-uri", uri,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    log = Path(tempfile.gettempdir()) / "screenshots-mlflow-ui.log"  # kept if the UI fails
    with log.open("wb") as fh, process(args, f"{base}/health", 120, stdout=fh, stderr=fh, env=env):
        _prepare_storage(web, base)
        exp, run = ids["experiment"], ids["run"]
        ml = "workflowType=machine_learning"

        web.get(f"{base}/{mlflow_ui.runs_page(exp)}")
        shown = [m for m in mlflow_ui.RUNS_COLUMNS["metrics"] if m in ids["metrics"]]
        web.wait_text("Runs", *ids["run_names"][:3], *shown[:1])  # the view's columns applied
        web.screenshot(out / "mlflow-runs.png")

        # the table's chart switch, as a user clicks it (a new address inside the page, without
        # the shared view's key, leaves MLflow 3.17 loading forever)
        web.js("document.querySelector('input[value=CHART]').click()")  # a hidden radio
        web.wait_text("Model metrics", *ids["run_names"][:3])
        _charts(web, [m for m in COMPARE_CHARTS if m in ids["metrics"]])
        web.screenshot(out / "mlflow-runs-charts.png")

        web.get("about:blank")  # then a fresh load of the app (see above)
        web.get(f"{base}/#/experiments/{exp}/runs/{run.info.run_id}/model-metrics?{ml}")
        web.wait_text(run.info.run_name, "Model metrics")
        _charts(web, [m for m in RUN_CHARTS if m in run.data.metrics])
        web.screenshot(out / "mlflow-run.png")

        model = ids["model"]
        if model is None:
            print(f"no registered model {MODEL_PREFIX}*: mlflow-model.png not taken")
        else:
            web.get(f"{base}/#/models/{model.name}")
            versions = [f"Version {v.version}" for v in model.latest_versions]
            web.wait_text(model.name, *versions[-1:])
            web.screenshot(out / "mlflow-model.png")
    log.unlink(missing_ok=True)


def omniglot_drawings(zip_path: Path, alphabets: tuple[str, ...], n: int) -> dict[str, list]:
    """``{alphabet: [(file name, PNG bytes)] * n}``: the first character of each alphabet,
    drawn by its first ``n`` people."""
    if not zip_path.is_file():
        raise SystemExit(f"{zip_path} not found: the Omniglot mirror (shared/data/omniglot)")
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(zf.namelist())
        out = {}
        for alphabet in alphabets:
            first = f"images_evaluation/{alphabet}/character01/"
            files = [name for name in names if name.startswith(first) and name.endswith(".png")]
            if len(files) < n:
                raise SystemExit(f"{zip_path}: {first} has {len(files)} drawings, not {n}")
            out[alphabet] = [(Path(f).name, zf.read(f)) for f in files[:n]]
    return out


def shoot_teach(out: Path) -> None:
    """The teaching page with a classifier taught, its support set and predictions shown."""
    drawings = omniglot_drawings(TEACH_ZIP, TEACH_ALPHABETS, 1 + TEACH_HELD_OUT)
    with tempfile.TemporaryDirectory(prefix="screenshots-teach-") as tmp:
        files = Path(tmp) / "images"
        files.mkdir()
        for shots in drawings.values():
            for name, png in shots:
                (files / name).write_bytes(png)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "mamlops", "serve", "--meta", str(TEACH_META),
                "--store", f"{tmp}/store", "--port", str(port)]  # fmt: skip
        with (
            process(args, f"{base}/health", 120, stdout=subprocess.DEVNULL),
            browser(*TEACH_SIZE) as web,
        ):
            page = TeachPage(web, f"{base}/")
            page.open()
            page.set_classes(list(drawings))
            for i, shots in enumerate(drawings.values()):
                name, png = shots[0]
                if i < TEACH_DRAWN:
                    page.draw_shot(i, page.strokes(png, ".class-card canvas.draw"))
                else:
                    page.upload(i, [files / name])
            page.teach()
            held_out = [files / name for shots in drawings.values() for name, _ in shots[1:]]
            page.classify_files(held_out)
            last = drawings[TEACH_ALPHABETS[-1]][-1][1]
            page.draw_test(page.strokes(last, "#test-canvas"))
            web.js("document.activeElement.blur(); window.scrollTo(0, 0)")  # as first shown
            time.sleep(0.3)
            web.screenshot(out / "teach.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("dvc", "mlflow", "teach"), help="one of them")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="PNG folder")
    parser.add_argument("--mlflow-db", type=Path, default=ROOT / "mlflow.db", help="SQLite store")
    args = parser.parse_args()
    out = args.out.resolve()
    try:
        if args.only in (None, "dvc", "mlflow"):
            with browser() as web:
                if args.only in (None, "dvc"):
                    shoot_dvc(web, out)
                if args.only in (None, "mlflow"):
                    shoot_mlflow(web, out, args.mlflow_db)
        if args.only in (None, "teach"):
            shoot_teach(out)
    except BrowserError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()

"""Screenshots for the docs: DVC's plots page and the MLflow UI, as PNGs under docs/img/.

Run from the repository root after a pipeline run (``dvc repro``), in the project's venv:

    python scripts/screenshots.py                 # all of them
    python scripts/screenshots.py --only mlflow   # or: --only dvc

Needs Debian's ``chromium`` and ``chromium-driver`` (apt-get install chromium chromium-driver)
and, once, npm (for Vega, see dvc_plots_offline.py). Nothing is fetched from the internet.

* ``dvc-plots.png``: ``dvc plots show`` rendered offline (dvc_plots_offline.py), the whole page.
* ``mlflow-runs.png``, ``mlflow-runs-charts.png``: experiment "mamlops", its runs as a table
  (metric and param columns) and as charts comparing the runs.
* ``mlflow-run.png``: the latest training run's model metrics (charts).
* ``mlflow-model.png``: the registered model (the latest ``mamlops-*`` one) with its versions.

``mlflow ui`` is started on a free port against ``sqlite:///<repo>/mlflow.db`` (telemetry off)
and stopped at the end. Pages are opened with ``?workflowType=machine_learning``: MLflow 3.17
otherwise shows the GenAI view (traces) of an experiment, whatever its tags say.

Chromium is driven through chromedriver's W3C WebDriver HTTP API with urllib (``WebDriver``
below, about 60 lines) rather than ``chromium --headless --screenshot``: that one can wait for
JavaScript (``--virtual-time-budget``), but it cannot close MLflow's assistant panel or pick the
runs table's columns (both in localStorage), wait for a given text, or size a full-page shot;
and talking HTTP to chromedriver keeps selenium out of the project's dependencies.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dvc_plots_offline beside this file
import dvc_plots_offline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1600, 1000
EXPERIMENT = "mamlops"
MODEL_PREFIX = "mamlops-"
# runs-table columns, those present are shown (MLflow's own default is Source/Models/Dataset)
METRIC_COLUMNS = ("eval/acc_transductive", "eval/acc_support", "val/best_acc", "train/tasks_per_s")
PARAM_COLUMNS = ("setting", "train.inner_lr", "train.meta_batch", "train.iterations")
# charts shown (by MLflow's chart search, a regex), those present: the runs compared on test and
# validation accuracy; the training run's curves
COMPARE_CHARTS = ("eval/acc_transductive", "eval/acc_support", "val/best_acc")
RUN_CHARTS = ("train/loss", "train/acc", "val/acc", "train/tasks_per_s")
# JavaScript: true once the page shows no loading indicator
IDLE_JS = """return !document.querySelector(
    '[role="progressbar"], [aria-busy="true"], [data-testid*="spinner" i], [class*="spinner" i]')"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited ({proc.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (OSError, urllib.error.URLError):
            time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s")


@contextlib.contextmanager
def process(args: list[str], ready_url: str, seconds: float, **kw: Any) -> Iterator[None]:
    """Run ``args`` in its own process group until the block ends; wait for ``ready_url``."""
    proc = subprocess.Popen(args, start_new_session=True, **kw)
    try:
        wait_http(ready_url, seconds, proc)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group: mlflow ui starts worker processes
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class WebDriver:
    """A headless Chromium session through chromedriver's W3C WebDriver HTTP API."""

    def __init__(self, base: str) -> None:
        self.base = base
        args = ["--headless=new", "--disable-gpu", "--hide-scrollbars", "--lang=en-US"]
        args += [f"--window-size={WIDTH},{HEIGHT}", "--force-device-scale-factor=1"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        options: dict[str, Any] = {"args": args}
        binary = shutil.which("chromium")
        if binary:
            options["binary"] = binary
        caps = {"browserName": "chrome", "goog:chromeOptions": options}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        self.sid = self.session["sessionId"]
        self.cdp("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                 deviceScaleFactor=1, mobile=False)  # fmt: skip

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data, {"Content-Type": "application/json"}, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"WebDriver {method} {path}: {err.read()[:400]!r}") from None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.sid}{path}", body)

    def cdp(self, cmd: str, **params: Any) -> Any:
        """A Chrome DevTools Protocol command (chromedriver's ``goog/cdp/execute``)."""
        return self.call("POST", "/goog/cdp/execute", {"cmd": cmd, "params": params})

    def get(self, url: str) -> None:
        self.call("POST", "/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        return self.call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def type_into(self, css: str, text: str) -> None:
        """Type ``text`` into the element ``css`` (real key events, as React expects)."""
        found = self.call("POST", "/element", {"using": "css selector", "value": css})
        element = next(iter(found.values()))
        self.call("POST", f"/element/{element}/value", {"text": text})

    def poll(self, script: str, seconds: float) -> bool:
        """Whether ``script`` returns something truthy within ``seconds``."""
        deadline = time.monotonic() + seconds
        while not self.js(script):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    def wait(self, script: str, seconds: float = 60, what: str = "") -> None:
        """Poll until ``script`` returns something truthy; on a timeout, keep what was shown."""
        if not self.poll(script, seconds):
            shot = self.screenshot(Path(tempfile.gettempdir()) / "screenshots-timeout.png")
            raise SystemExit(f"timed out after {seconds:.0f} s waiting for {what or script}"
                             f" (the page then: {shot})")  # fmt: skip

    def wait_text(self, *texts: str, seconds: float = 90) -> None:
        """Wait until the page shows every one of ``texts`` and no loading indicator."""
        shown = "const t = document.body ? document.body.innerText : '';"
        every = f"return {json.dumps(texts)}.every(s => t.includes(s))"
        self.wait(f"{shown} {every}", seconds, f"the texts {texts}")
        self.poll(IDLE_JS, 20)  # a spinner that never goes away: shoot anyway
        time.sleep(1.5)  # chart transitions

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """The viewport (or the whole page) as a PNG, written atomically."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.cdp("Page.getLayoutMetrics")["cssContentSize"]
            width = max(WIDTH, int(size["width"]))
            params |= {
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": int(size["height"]), "scale": 1},
            }
        data = base64.b64decode(self.cdp("Page.captureScreenshot", **params)["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        return path

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.call("DELETE", "")


@contextlib.contextmanager
def browser() -> Iterator[WebDriver]:
    driver = shutil.which("chromedriver")
    if driver is None:
        raise SystemExit("chromedriver not found: apt-get install chromium chromium-driver")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with process([driver, f"--port={port}"], f"{base}/status", 30,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):  # fmt: skip
        web = WebDriver(base)
        try:
            yield web
        finally:
            web.quit()


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
    metrics = {k for r in runs for k in r.data.metrics}
    params = {k for r in runs for k in r.data.params}
    columns = [f"metrics.`{k}`" for k in METRIC_COLUMNS if k in metrics]
    columns += [f"params.`{k}`" for k in PARAM_COLUMNS if k in params]
    return {
        "experiment": exp.experiment_id,
        "run": training[0],
        # top-level runs only: evaluate/export are child rows, collapsed in the list
        "run_names": [r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags],
        "model": models[0] if models else None,
        "columns": columns,
        "metrics": metrics,
    }


def _prepare_storage(web: WebDriver, base: str, ids: dict[str, Any]) -> None:
    """localStorage of the MLflow origin: assistant panel closed, the runs table's columns."""
    web.get(f"{base}/health")  # any page of the origin, without the app
    state = {  # MLflow's ExperimentPage state, its defaults but the columns
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": ["attributes.`Source`", "attributes.`Models`", *ids["columns"]],
    }
    items = {
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        "mlflow.workflowType_v1": json.dumps("machine_learning"),
        f'MLflowLocalStorage-1.1-ExperimentPage-["{ids["experiment"]}"]-ReactComponentState': (
            json.dumps(state)
        ),
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
        _prepare_storage(web, base, ids)
        exp, run = ids["experiment"], ids["run"]
        ml = "workflowType=machine_learning"

        web.get(f"{base}/#/experiments/{exp}/runs?{ml}")
        web.wait_text("Runs", *ids["run_names"][:3])
        web.screenshot(out / "mlflow-runs.png")

        web.get(f"{base}/#/experiments/{exp}/runs?{ml}&compareRunsMode=CHART")
        web.wait_text("Model metrics", *ids["run_names"][:3])
        _charts(web, [m for m in COMPARE_CHARTS if m in ids["metrics"]])
        web.screenshot(out / "mlflow-runs-charts.png")

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("dvc", "mlflow"), help="one of the two")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="PNG folder")
    parser.add_argument("--mlflow-db", type=Path, default=ROOT / "mlflow.db", help="SQLite store")
    args = parser.parse_args()
    out = args.out.resolve()
    with browser() as web:
        if args.only in (None, "dvc"):
            shoot_dvc(web, out)
        if args.only in (None, "mlflow"):
            shoot_mlflow(web, out, args.mlflow_db)


if __name__ == "__main__":
    main()

"""benchmarks/time_to_accuracy.py's report: read recipes' runs back from a real MLflow store.

The ``run`` half is `dvc exp run --queue` + `dvc queue start`, which test_pipeline's experiment
loop already drives; here two runs are logged the way ``train_stage`` logs them (run name
``<setting> tta-<recipe>``, ``train.*`` params, ``val/acc`` per step) with known timestamps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from mamlops import tracking

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import time_to_accuracy as tta  # noqa: E402


def log_run(client, exp_id, name, meta_batch, val, test=None):
    """A finished training run: ``val`` is [(step, seconds after the start, accuracy)]."""
    run = client.create_run(exp_id, run_name=f"omniglot-5w1s tta-{name}", start_time=1_000_000)
    rid = run.info.run_id
    params = [Param("train.meta_batch", str(meta_batch)), Param("train.iterations", "40")]
    metrics = [Metric("val/acc", a, 1_000_000 + int(1000 * s), step) for step, s, a in val]
    metrics.append(Metric("train/seconds", 40 * meta_batch / 12.5, 1_000_000, 0))
    if test:
        metrics += [Metric("eval/acc_transductive", test[0], 1, 0)]
        metrics += [Metric("eval/acc_support", test[1], 1, 0)]
    client.log_batch(rid, metrics=metrics, params=params)
    client.set_terminated(rid, end_time=1_000_000 + 120_000)


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tta, "RESULTS", tmp_path / "results")
    client = MlflowClient(uri)
    exp_id = client.create_experiment(tracking.EXPERIMENT)
    log_run(client, exp_id, "slow", 32, [(20, 30.0, 0.90), (40, 61.0, 0.955)], (0.96, 0.94))
    log_run(client, exp_id, "fast", 16, [(20, 10.0, 0.951), (40, 22.0, 0.97)])
    return client


def test_report_reads_runs_and_times_the_threshold(store: MlflowClient) -> None:
    rows = tta.collect("omniglot-5w1s", ["slow", "fast", "missing"])
    assert [r["recipe"] for r in rows] == ["slow", "fast"]  # "missing" has no run: skipped
    slow = rows[0]
    assert slow["val"][1] == (40, 61.0, 40 * 32, 0.955)  # (step, seconds, tasks, acc)
    assert slow["minutes"] == pytest.approx(2.0)

    md = tta.table(rows, "omniglot-5w1s", {"slow": {}, "fast": {"meta_batch": 16}}, 0.95)
    lines = md.splitlines()
    assert "s to val ≥ 95%" in lines[0]
    slow_line, fast_line = lines[2], lines[3]
    # first val >= 95%: step 40 at 61 s for slow, step 20 at 10 s for fast
    assert "| 61 | 95.50 | 96.00 / 94.00 |" in slow_line and "(preset)" in slow_line
    assert "| 10 | 97.00 | – |" in fast_line and "meta_batch=16" in fast_line
    assert "| 40 × 16 | 2.0 | 12.5 |" in fast_line  # run minutes, whole-run tasks/s


def test_report_writes_the_table_and_plot(store: MlflowClient, capsys) -> None:
    recipes = tta.RECIPES
    try:
        tta.RECIPES = tta.RESULTS.parent / "recipes.yaml"
        tta.RECIPES.parent.mkdir(parents=True, exist_ok=True)
        tta.RECIPES.write_text("omniglot-5w1s:\n  slow: {}\n  fast: {meta_batch: 16}\n")
        tta.report(tta.argparse.Namespace(setting="omniglot-5w1s", recipes=None, threshold=0.95))
    finally:
        tta.RECIPES = recipes
    png = tta.RESULTS / "omniglot-5w1s.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "fast" in (tta.RESULTS / "omniglot-5w1s.md").read_text()
    with pytest.raises(SystemExit, match="no recipes for 'omniglot-20w1s'"):
        tta.load_recipes("omniglot-20w1s", None)
    with pytest.raises(SystemExit, match="unknown recipe"):
        tta.load_recipes("omniglot-5w1s", ["nope"])

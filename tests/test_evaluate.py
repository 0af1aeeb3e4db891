"""Meta-test on a briefly trained model: accuracy, CI, both BN protocols, determinism, figures."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from PIL import Image
from typer.testing import CliRunner

from mamlops.cli import app
from mamlops.data.episodes import episode_tasks, load_episodes
from mamlops.meta.checkpoint import load_theta
from mamlops.meta.evaluate import evaluate_setting, mean_ci95, predict_tasks
from mamlops.meta.figures import episode_grid, steps_rows, write_steps_csv

N_EPISODES = 100


def test_ci95_is_paper_formula_with_population_std() -> None:
    mean, ci = mean_ci95([0.0, 1.0])
    assert mean == pytest.approx(0.5)
    assert ci == pytest.approx(1.96 * 0.5 / math.sqrt(2))  # population std of {0, 1} is 0.5
    accs = np.random.default_rng(0).uniform(0.6, 1.0, size=600)
    mean, ci = mean_ci95(accs.tolist())
    assert mean == pytest.approx(accs.mean())
    assert ci == pytest.approx(1.96 * np.std(accs) / math.sqrt(600))  # np.std: ddof=0
    assert mean_ci95([0.7] * 5) == (pytest.approx(0.7), 0.0)
    with pytest.raises(ValueError):
        mean_ci95([])


@pytest.fixture(scope="module")
def theta(trained_theta):
    params, _ = load_theta(trained_theta.path)
    return params


@pytest.fixture(scope="module")
def result(theta, trained_theta) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: one thread is faster on a busy 2-core machine
    try:
        return evaluate_setting(theta, trained_theta.cfg, trained_theta.prepared, limit=N_EPISODES)
    finally:
        torch.set_num_threads(threads)


def test_beats_chance_on_real_test_episodes(result: dict, trained_theta) -> None:
    steps = trained_theta.cfg.test_inner_steps
    assert result["n"] == N_EPISODES and result["steps"] == steps
    for protocol in ("transductive", "support"):
        r = result[protocol]
        assert r["acc"] > 0.5, (protocol, r)  # chance is 0.2 for 5-way
        assert 0 < r["ci95"] < 0.1
        assert len(r["curve"]) == steps + 1
        assert r["curve"][-1] == pytest.approx(r["acc"])
        assert r["curve"][0] < 0.35  # before adaptation the head knows no labels


def test_both_protocols_differ(result: dict) -> None:
    trans, supp = result["transductive"], result["support"]
    assert trans["curve"] != supp["curve"]
    assert abs(trans["acc"] - supp["acc"]) < 0.15  # different statistics, same model


def test_deterministic(theta, trained_theta) -> None:
    a = evaluate_setting(theta, trained_theta.cfg, trained_theta.prepared, limit=4, batch=2)
    b = evaluate_setting(theta, trained_theta.cfg, trained_theta.prepared, limit=4, batch=2)
    assert a == b


def test_episode_grid_and_steps_csv(theta, trained_theta, result: dict, tmp_path) -> None:
    cfg = trained_theta.cfg
    episodes = load_episodes(trained_theta.prepared, "test", cfg.ways, cfg.shots)
    tasks = episode_tasks(trained_theta.prepared, episodes, 0, 3)
    model_cfg = cfg.network
    preds = predict_tasks(theta, tasks, model_cfg, cfg.test_inner_steps, cfg.inner_lr)
    assert preds.shape == tasks.yq.shape
    assert (preds == tasks.yq).float().mean() > 0.4
    png = episode_grid(tasks, preds, tmp_path / "grid.png", episodes=2, title="test")
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.width > 300 and im.height > 300

    path = write_steps_csv(steps_rows(result), tmp_path / "steps.csv")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(cfg.test_inner_steps + 1))
    assert float(rows[-1]["acc_support"]) == pytest.approx(result["support"]["acc"], abs=1e-6)


def _write_metrics(root, setting: str, **extra) -> None:
    import json

    """metrics/eval/<setting>.json (numbers) and results/<setting>.json (facts) beside it."""
    metrics = {
        "acc_transductive": 0.951,
        "ci95_transductive": 0.006,
        "acc_support": 0.94,
        "ci95_support": 0.007,
    }
    facts = {
        "episodes": 600,
        "steps": 10,
        "iterations": 2250,
        "train_iterations": 2500,
        "dataset": "omniglot",
        "ways": 5,
        "shots": 1,
        "hardware": "CPU test",
        **extra,
    }
    (root / "eval").mkdir(parents=True, exist_ok=True)
    (root / "eval" / f"{setting}.json").write_text(json.dumps(metrics))
    (root.parent / "results").mkdir(parents=True, exist_ok=True)
    (root.parent / "results" / f"{setting}.json").write_text(json.dumps(facts))


def test_report_table_and_readme(tmp_path) -> None:
    from typer.testing import CliRunner

    from mamlops import report
    from mamlops.cli import app

    def cli(*args: str) -> int:
        return CliRunner().invoke(app, ["report", *args]).exit_code

    metrics = tmp_path / "metrics"
    _write_metrics(metrics, "omniglot-5w1s")
    (metrics / "train").mkdir()
    (metrics / "train" / "omniglot-5w1s.json").write_text('{"train_seconds": 1200}')
    table = report.render_table(report.load_results(metrics))
    row = next(line for line in table.splitlines() if line.startswith("| omniglot-5w1s"))
    assert "95.10 ± 0.60" in row and "94.00 ± 0.70" in row and "98.70 ± 0.40" in row
    assert "2250 of 2500 (best val)" in row and "20 min" in row and "CPU test" in row

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.START}\nold\n{report.END}\ntail\n")
    assert cli("--metrics", str(metrics), "--readme", str(readme)) == 0
    text = readme.read_text()
    assert "old" not in text and "95.10 ± 0.60" in text and text.endswith(f"{report.END}\ntail\n")
    assert cli("--metrics", str(metrics), "--readme", str(readme)) == 0
    assert readme.read_text() == text  # idempotent

    # rows trained elsewhere (benchmarks/omniglot_rows.py collects them): added, sorted by
    # ways and shots, beside MAML++'s figure; the pipeline's own row wins on a shared setting
    elsewhere = tmp_path / "rows"
    _write_metrics(elsewhere / "metrics", "omniglot-20w1s", ways=20)
    _write_metrics(elsewhere / "metrics", "omniglot-5w1s", hardware="elsewhere")
    assert cli("--metrics", str(metrics), "--readme", str(readme), "--also", str(elsewhere)) == 0
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| omniglot")]
    assert [r.split(" | ")[0] for r in rows] == ["| omniglot-5w1s", "| omniglot-20w1s"]
    assert "CPU test" in rows[0] and "| 99.47 |" in rows[0]
    assert "95.80 ± 0.30" in rows[1] and "| 97.65 |" in rows[1]
    result = CliRunner().invoke(app, ["report", "--also", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no metrics/eval/ folder" in result.output

    readme.write_text("# no markers\n")
    with pytest.raises(report.ReportError, match="markers"):
        report.update_readme(readme, table)
    assert cli("--metrics", str(metrics), "--readme", str(readme)) == 1
    assert readme.read_text() == "# no markers\n"


def test_k_query_protocol_scores_the_first_k_queries(theta, trained_theta, result) -> None:
    """``query=K``: the paper's protocol (K query images per class); the support-BN protocol
    adapts on the same support set whatever the query size, so its per-episode accuracies
    are those of the full query set restricted to fewer images: same mean within sampling,
    and the transductive batch is smaller, so its numbers change."""
    cfg = trained_theta.cfg
    short = evaluate_setting(
        theta, cfg, trained_theta.prepared, limit=N_EPISODES, query=cfg.shots, curve=False
    )
    assert short["n"] == N_EPISODES
    for protocol in ("transductive", "support"):
        assert len(short[protocol]["curve"]) == 1  # the final step only
        assert short[protocol]["curve"][0] == pytest.approx(short[protocol]["acc"])
        per = short[protocol]["per_episode"]
        assert all(
            round(a * cfg.ways * cfg.shots) == pytest.approx(a * cfg.ways * cfg.shots) for a in per
        )  # K*N queries per episode
    assert short["transductive"]["per_episode"] != result["transductive"]["per_episode"]
    with pytest.raises(ValueError, match="query must be"):
        evaluate_setting(theta, cfg, trained_theta.prepared, limit=2, query=10_000)


def test_a_theta_is_scored_as_it_was_trained(trained_theta, capsys) -> None:
    """A preset whose split or loss changed since its theta was trained (the paper presets
    adopted the reference code's) must not score that theta on characters it trained on, nor
    adapt it with another inner lr than it was meta-trained for."""
    from mamlops.meta.evaluate import on_trained_config

    _, meta = load_theta(trained_theta.path)
    cfg = trained_theta.cfg
    changed = dataclasses.replace(
        cfg,
        split="random",
        maml=dataclasses.replace(cfg.maml, inner_lr=0.38, label_smoothing=0.05),
    )
    scored = on_trained_config(changed, meta, trained_theta.path)
    assert scored.split == meta["train_config"].get("split") == cfg.split
    assert scored.maml.inner_lr == cfg.maml.inner_lr and scored.maml.label_smoothing == 0.0
    assert "scored as it was trained" in capsys.readouterr().out
    assert on_trained_config(cfg, meta, trained_theta.path) is cfg


def test_a_killed_evaluate_leaves_the_earlier_outputs_whole(
    trained_theta, tmp_path, monkeypatch
) -> None:
    """Issue 25 #9: ``kill -9`` of the evaluate stage after its metrics, results and CSV were
    written, before the episode PNG, left the new three beside the old picture. The real stage
    script is killed where the picture is drawn: all four outputs stay the earlier run's, and
    ``mamlops check`` removes the temporary files the kill left."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"].update(steps=0, grid_episodes=1, within_alphabet=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPO / "presets.yaml", tmp_path / "presets.yaml")
    model_dir = tmp_path / "models" / "omniglot-5w1s"
    model_dir.mkdir(parents=True)
    shutil.copy(trained_theta.path, model_dir / "theta_best.safetensors")
    outs = [
        tmp_path / "metrics" / "eval" / "omniglot-5w1s.json",
        tmp_path / "results" / "omniglot-5w1s.json",
        tmp_path / "plots" / "eval" / "omniglot-5w1s.csv",
        tmp_path / "plots" / "episodes" / "omniglot-5w1s.png",
    ]
    for path in outs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"the earlier run's {path.name}")
    killed_at_the_picture = (
        "import functools, os, runpy, signal, sys\n"
        "import mamlops.meta.evaluate as ev\n"
        "ev.episode_grid = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "ev.test_metrics = functools.partial(ev.test_metrics, limit=50)  # the writes matter\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    args = [str(REPO / "pipeline" / "evaluate.py"), "omniglot-5w1s", str(trained_theta.prepared)]
    args += [str(model_dir), *map(str, outs)]
    proc = subprocess.run(
        [sys.executable, "-c", killed_at_the_picture, *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert [p.read_text() for p in outs] == [f"the earlier run's {p.name}" for p in outs]
    left = [p for d in ("metrics", "plots", "results") for p in (tmp_path / d).rglob(".*.tmp")]
    assert left  # the new outputs, still temporaries when the kill came

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    result = CliRunner().invoke(app, ["check", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert not [p for p in left if p.exists()]

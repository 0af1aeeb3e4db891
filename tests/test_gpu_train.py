"""benchmarks/gpu_train.py, the script a GPU rental runs, end to end in small on the CPU.

It runs the library's training loop (``mamlops.meta.train.train``; on CUDA the captured graph of
``graph_step``, which needs a GPU: docs/performance.md); here the same script must train,
validate, write the project's theta format, time an execution in a child process (and report
one that cannot run here), stop on its budget, resume from its checkpoint and score the test
episodes on its device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from mamlops.meta.checkpoint import load_theta

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_train.py"


def run(prepared: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--prepared", str(prepared)]
    cmd += ["--out", str(out), "--log-every", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_gpu_train_writes_theta_history_and_resumes(omniglot_prepared: Path, tmp_path: Path):
    out = tmp_path / "gpu-run"
    run(
        omniglot_prepared,
        out,
        "--iterations",
        "4",
        "--minutes",
        "1",
        "--bench",
        "batched",
        "graph",
        "--bench-iters",
        "20",
        "--evaluate",
        "--eval-limit",
        "10",
    )
    summary = json.loads((out / "summary.json").read_text())
    bench = {row["strategy"]: row for row in summary["bench"]}
    assert bench["batched"]["ms_per_iter"] > 0 and bench["batched"]["execution"] == "batched"
    assert "CUDA graph" in bench["graph"]["error"]  # no CUDA here: reported, not fatal
    assert summary["train"]["iterations_done"] == 4 and summary["train"]["execution"] != "graph"
    assert summary["train"]["stopped_by"] == "iterations"
    # scored where it trained: the evaluate stage's numbers, both protocols and the paper's
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated == summary["eval"] and evaluated["episodes"] > 0
    assert 0.2 < evaluated["acc_transductive"] <= 1 and 0.2 < evaluated["acc_support"] <= 1
    assert "acc_k_query_transductive" in evaluated

    params, meta = load_theta(out / "theta.safetensors")
    assert meta["step"] == 4 and meta["train_config"]["iterations"] == 4
    assert all(torch.isfinite(v).all() for v in params.values())
    rows = [line.split("\t") for line in (out / "history.tsv").read_text().splitlines()]
    assert rows[0] == ["step", "loss", "train_acc", "val_acc", "tasks_per_s"]
    assert [int(r[0]) for r in rows[1:]] == [2, 4]
    assert float(rows[-1][3]) > 0.2 and float(rows[-1][4]) > 0

    # the same config again resumes at the checkpoint's step and trains nothing more
    run(omniglot_prepared, out, "--iterations", "4", "--minutes", "1")
    assert json.loads((out / "summary.json").read_text())["train"]["resumed_from"] == 4


def test_gpu_train_stops_on_its_budget_and_the_next_call_goes_on(
    omniglot_prepared: Path, tmp_path: Path
):
    out = tmp_path / "budget"
    run(omniglot_prepared, out, "--iterations", "1000", "--minutes", "0.0001")
    train = json.loads((out / "summary.json").read_text())["train"]
    # the budget is checked at the first logging point, which then validates and saves theta
    assert train["iterations_done"] == 2 and train["stopped_by"].startswith("budget")
    assert train["best_step"] == 2
    assert load_theta(out / "theta_best.safetensors")[1]["step"] == 2
    # the next slot: the same command continues the run, and its history is one
    run(omniglot_prepared, out, "--iterations", "1000", "--minutes", "0.0001")
    train = json.loads((out / "summary.json").read_text())["train"]
    assert train["resumed_from"] == 2 and train["iterations_done"] == 4
    steps = [line.split("\t")[0] for line in (out / "history.tsv").read_text().splitlines()]
    assert steps == ["step", "2", "4"]

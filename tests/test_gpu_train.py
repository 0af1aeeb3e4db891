"""benchmarks/gpu_train.py, the script a GPU rental runs, end to end in small on the CPU.

The CUDA-only parts (graph capture, the CUDA generator) ran on an H200 (docs/performance.md);
here the same script must train, validate, write the project's theta format, time a variant in
a child process, stop on its budget and resume from its checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from mamlops.checkpoint import load_theta

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_train.py"


def run(prepared: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--prepared", str(prepared)]
    cmd += ["--out", str(out), "--no-grad-check", "--log-every", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_gpu_train_writes_theta_history_and_resumes(omniglot_prepared: Path, tmp_path: Path):
    out = tmp_path / "gpu-run"
    first = run(
        omniglot_prepared,
        out,
        "--iterations",
        "4",
        "--minutes",
        "1",
        "--bench",
        "batched",
        "batched-graph",
        "--bench-iters",
        "1",
        "--variant",
        "auto",
    )
    summary = json.loads((out / "summary.json").read_text())
    bench = {row["variant"]: row for row in summary["bench"]}
    assert bench["batched"]["ms_per_iter"] > 0
    assert "error" in bench["batched-graph"]  # no CUDA here: reported, not fatal
    assert "--variant auto: batched" in first.stdout
    assert summary["train"]["iterations_done"] == 4
    assert summary["train"]["stopped_by"] == "iterations"

    params, meta = load_theta(out / "theta.safetensors")
    assert meta["step"] == 4 and meta["train_config"]["iterations"] == 4
    assert all(torch.isfinite(v).all() for v in params.values())
    rows = [line.split("\t") for line in (out / "history.tsv").read_text().splitlines()]
    assert rows[0] == ["step", "seconds", "tasks", "loss", "train_acc", "val_acc"]
    assert [int(r[0]) for r in rows[1:]] == [2, 4]
    assert rows[-1][2] == str(4 * summary["config"]["meta_batch"]) and float(rows[-1][5]) > 0.2

    # the same config again resumes at the checkpoint's step and trains nothing more
    again = run(omniglot_prepared, out, "--iterations", "4", "--minutes", "1")
    assert "resuming" in again.stdout
    assert json.loads((out / "summary.json").read_text())["train"]["resumed_from"] == 4


def test_gpu_train_stops_on_its_budget(omniglot_prepared: Path, tmp_path: Path):
    out = tmp_path / "budget"
    run(omniglot_prepared, out, "--iterations", "1000", "--minutes", "0.0001")
    train = json.loads((out / "summary.json").read_text())["train"]
    # the budget is checked at the first logging point, which then validates and saves theta
    assert train["iterations_done"] == 2 and train["stopped_by"].startswith("budget")
    assert train["best_step"] == 2
    assert load_theta(out / "theta_best.safetensors")[1]["step"] == 2

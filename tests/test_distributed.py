"""Meta-training under torchrun (gloo, 2 CPU processes) against the one-process run.

Tolerance: the two processes compute the same tasks as one process (each its half of every
meta-batch) and average their mean gradients, which is the one-process mean up to the order of
float additions; Adam then carries those rounding differences on. After a few iterations the
update theta - theta_0 agrees to a relative 1e-6 (measured), so the tests ask for 1e-4: tight
enough that a shard computed twice, a missing average or another task draw fails by orders of
magnitude (those give relative differences near 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mamlops.config import TrainConfig
from mamlops.data.episodes import TaskSampler, load_bank
from mamlops.meta import distributed, mamlpp
from mamlops.meta.train import train

TINY = {
    "dataset": "omniglot", "ways": 5, "shots": 1, "query": 2, "meta_batch": 4,
    "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 1, "meta_lr": 0.001,
    "iterations": 6, "val_every": 3, "val_episodes": 4, "checkpoint_every": 3, "log_every": 1,
    "device": "cpu",
}  # fmt: skip
TOLERANCE = 1e-4


def params_for(processes: int) -> dict:
    return {"train": {"common": {"seed": 3}, "presets": {"tiny": {**TINY, "processes": processes}}}}


def relative_update_difference(a: Path, b: Path, cfg: TrainConfig) -> float:
    """|| (theta_a - theta_0) - (theta_b - theta_0) || / || theta_b - theta_0 ||."""
    init = mamlpp.init_meta_params(cfg.network, cfg.maml, torch.Generator().manual_seed(3))
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() == init.keys()
    da = torch.cat([(ta[k] - init[k]).flatten() for k in init])
    db = torch.cat([(tb[k] - init[k]).flatten() for k in init])
    return float((da - db).norm() / db.norm())


def env_without_tracking() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def mamlops_train(cwd: Path, params_file: str) -> subprocess.CompletedProcess:
    """`mamlops train tiny --params params_file` in ``cwd``, logging to ``cwd/mlflow.db``."""
    return subprocess.run(
        ["mamlops", "train", "tiny", "--params", params_file],
        cwd=cwd,
        env=env_without_tracking(),
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_a_shard_is_the_slice_of_the_whole_draw(omniglot_prepared: Path) -> None:
    """Each process draws the whole meta-batch's random numbers and keeps its slice: the same
    tasks as one process, and the generator ends in the same state."""
    bank = load_bank(omniglot_prepared, "train")
    whole = TaskSampler(bank, 5, 1, 2, seed=7, dataset="omniglot")
    half = TaskSampler(bank, 5, 1, 2, seed=7, dataset="omniglot")
    world = distributed.World(rank=1, size=2)
    a, b = whole.sample(8), half.sample(8, world.shard(8))
    assert len(b) == 4
    for x, y in ((a.xs, b.xs), (a.ys, b.ys), (a.xq, b.xq), (a.yq, b.yq)):
        assert torch.equal(x[4:], y)
    assert torch.equal(whole.generator.get_state(), half.generator.get_state())
    with pytest.raises(Exception, match="meta_batch 6 does not split over 4 processes"):
        distributed.World(rank=0, size=4).shard(6)


@pytest.mark.timeout(300)
def test_two_processes_under_torchrun_match_one(omniglot_prepared: Path, tmp_path: Path) -> None:
    """`processes: 2` makes `mamlops train` run itself in 2 processes (torchrun's launcher):
    rank 0 alone writes theta, the checkpoint and one MLflow run; theta matches one process's;
    a failure in both (a diverged loss) is one line, printed once."""
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(params_for(2)))
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "omniglot").symlink_to(omniglot_prepared)
    proc = mamlops_train(tmp_path, "mine.yaml")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("tiny: best val acc") == 1, proc.stdout  # rank 0 only
    metrics = json.loads((tmp_path / "metrics" / "train" / "tiny.json").read_text())
    assert metrics["best_step"] in (3, 6)

    cfg = TrainConfig.from_params(params_for(1), "tiny")
    one = train(cfg, omniglot_prepared, tmp_path / "one", tmp_path / "ck1", progress=False)
    assert metrics["best_val_acc"] == pytest.approx(one.best_val_acc, abs=0.051)
    diff = relative_update_difference(
        tmp_path / "models" / "tiny" / "theta.safetensors",
        tmp_path / "one" / "theta.safetensors",
        cfg,
    )
    assert diff < TOLERANCE, diff

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mamlops").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["mamlops.processes"] == "2"
    assert runs[0].data.params["train.processes"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == 6

    diverged = params_for(2)
    diverged["train"]["presets"]["tiny"]["inner_lr"] = 1e30
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(diverged))
    proc = mamlops_train(tmp_path, "nan.yaml")
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 2 and "meta-loss is nan at iteration 1" in errors[0], errors
    assert "the training in 2 processes stopped" in errors[1], errors


RUNNER = """
import json, sys
from pathlib import Path
import torch
from mamlops.config import TrainConfig
from mamlops.meta import distributed
from mamlops.meta.train import train
cfg = TrainConfig.from_params(json.loads(sys.argv[1]), "tiny")
with distributed.process_group(torch.device("cpu")) as (world, device):
    train(
        cfg, Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), progress=False,
        stop_after=3, world=world, device=device,
    )
"""


@pytest.mark.timeout(300)
def test_a_two_process_checkpoint_resumes_in_one_process(
    omniglot_prepared: Path, tmp_path: Path
) -> None:
    """Two processes stop after 3 of 6 iterations; one process resumes their checkpoint (the
    sampler's state is the same whatever the world size) and ends where a one-process run
    ends, within the tolerance."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    ck = tmp_path / "ck"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + [str(runner), json.dumps(params_for(2)), str(omniglot_prepared)]
        + [str(tmp_path / "two"), str(ck)],
        env=env_without_tracking(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert torch.load(ck / "checkpoint.pt", weights_only=True)["step"] == 3

    cfg = TrainConfig.from_params(params_for(1), "tiny")
    resumed = train(cfg, omniglot_prepared, tmp_path / "two", ck, progress=False)
    assert resumed.resumed_from == 3
    train(cfg, omniglot_prepared, tmp_path / "one", tmp_path / "ck1", progress=False)
    diff = relative_update_difference(
        tmp_path / "two" / "theta.safetensors", tmp_path / "one" / "theta.safetensors", cfg
    )
    assert diff < TOLERANCE, diff

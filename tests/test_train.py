"""Meta-training loop: params checks, determinism, a real kill + bitwise resume, NaN handling."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mamlops import tracking
from mamlops.config import TrainConfig
from mamlops.errors import ParamsError
from mamlops.meta import maml
from mamlops.meta import train as train_mod
from mamlops.meta.checkpoint import THETA_FILES
from mamlops.meta.train import NonFiniteLossError, train
from mamlops.meta.train_stage import TRAIN_COLUMNS, VAL_COLUMNS, write_history

TINY = {
    "dataset": "omniglot",
    "ways": 5,
    "shots": 1,
    "query": 2,
    "meta_batch": 2,
    "inner_lr": 0.4,
    "inner_steps": 1,
    "test_inner_steps": 2,
    "meta_lr": 0.001,
    "iterations": 12,
    "val_every": 6,
    "val_episodes": 4,
    "checkpoint_every": 3,
    "log_every": 3,
    "device": "cpu",
}


def tiny_params(**overrides) -> dict:
    return {"train": {"common": {"seed": 3}, "presets": {"tiny": {**TINY, **overrides}}}}


def tiny_cfg(**overrides) -> TrainConfig:
    return TrainConfig.from_params(tiny_params(**overrides), "tiny")


def test_params_errors_name_the_key() -> None:
    with pytest.raises(ParamsError, match="presets.yaml has no setting 'nope'"):
        TrainConfig.from_params(tiny_params(), "nope")
    with pytest.raises(ParamsError, match="did you mean 'tiny'"):
        TrainConfig.from_params(tiny_params(), "tinny")
    with pytest.raises(ParamsError, match=r"tiny\.ways must be >= 2"):
        tiny_cfg(ways=0)
    with pytest.raises(ParamsError, match=r"tiny\.meta_lr must be a positive number"):
        tiny_cfg(meta_lr=-1.0)
    with pytest.raises(
        ParamsError, match=r"tiny\.metabatch: unknown key; did you mean 'meta_batch'"
    ):
        tiny_cfg(metabatch=3)
    with pytest.raises(ParamsError, match=r"tiny\.dataset must be one of"):
        tiny_cfg(dataset="cifar")
    params = tiny_params()
    del params["train"]["presets"]["tiny"]["iterations"]
    with pytest.raises(ParamsError, match=r"tiny\.iterations is missing"):
        TrainConfig.from_params(params, "tiny")


def test_repo_presets_are_valid(repo_params: dict) -> None:
    presets = repo_params["presets.yaml"]
    assert "presets" not in repo_params["train"], "presets live in presets.yaml"
    for name in presets:
        cfg = TrainConfig.from_params(repo_params, name)
        assert cfg.name == name
    for name in repo_params["train"]["settings"]:
        assert name in presets


def test_same_seed_same_theta(omniglot_prepared: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(iterations=6)
    a = train(cfg, omniglot_prepared, tmp_path / "a", tmp_path / "ca", progress=False)
    b = train(cfg, omniglot_prepared, tmp_path / "b", tmp_path / "cb", progress=False)
    ta = load_file(str(tmp_path / "a" / "theta.safetensors"))
    tb = load_file(str(tmp_path / "b" / "theta.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)

    def strip(history):  # throughput is wall-clock, everything else must repeat exactly
        return [{k: v for k, v in r.items() if k != "tasks_per_s"} for r in history]

    assert strip(a.history) == strip(b.history)
    c = train(
        tiny_cfg(iterations=6, seed=4),
        omniglot_prepared,
        tmp_path / "c",
        tmp_path / "cc",
        progress=False,
    )
    tc = load_file(str(tmp_path / "c" / "theta.safetensors"))
    assert not torch.equal(ta["head.weight"], tc["head.weight"])
    assert c.step == 6


def test_history_tsv_for_dvc_plots(omniglot_prepared: Path, tmp_path: Path) -> None:
    result = train(
        tiny_cfg(iterations=6), omniglot_prepared, tmp_path, tmp_path / "ck", progress=False
    )
    write_history(result.history, tmp_path / "t.tsv", TRAIN_COLUMNS)
    write_history(result.history, tmp_path / "v.tsv", VAL_COLUMNS)

    def rows(name: str) -> list[dict[str, str]]:
        head, *lines = (tmp_path / name).read_text().splitlines()
        return [dict(zip(head.split("\t"), line.split("\t"), strict=True)) for line in lines]

    assert (tmp_path / "t.tsv").read_text().split("\n")[0] == "step\tloss\ttrain_acc\tmeta_lr"
    train_rows, val_rows = rows("t.tsv"), rows("v.tsv")
    assert [r["step"] for r in train_rows] == ["3", "6"] and float(train_rows[0]["loss"]) > 0
    # validation every 6 iterations: its own file, one row per check, no blank cells
    assert [r["step"] for r in val_rows] == ["6"] and 0.0 <= float(val_rows[0]["val_acc"]) <= 1
    assert all(v != "" for r in train_rows + val_rows for v in r.values())


RUNNER = """
import sys, json
from pathlib import Path
import torch
from mamlops.config import TrainConfig
from mamlops.meta.train import train
torch.set_num_threads(int(sys.argv[5]))  # bitwise equality needs the same reduction order
params = json.loads(sys.argv[1])
cfg = TrainConfig.from_params(params, "tiny")
train(cfg, Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), progress=False)
"""


def test_killed_run_resumes_to_the_same_theta(omniglot_prepared: Path, tmp_path: Path) -> None:
    """SIGKILL a real training process after its first checkpoint, rerun, compare bitwise.
    The theta files of the run before it stay as they were, as a pair (issue 25 #3: a new best
    theta used to be written at each better validation, beside the old final one)."""
    params = tiny_params(iterations=60, checkpoint_every=5, val_every=5, log_every=5)
    cfg = TrainConfig.from_params(params, "tiny")
    ck = tmp_path / "ck"
    earlier = {name: f"the earlier run's {name}".encode() for name in THETA_FILES.values()}
    (tmp_path / "killed").mkdir()
    for name, data in earlier.items():
        (tmp_path / "killed" / name).write_bytes(data)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUNNER,
            json.dumps(params),
            str(omniglot_prepared),
            str(tmp_path / "killed"),
            str(ck),
            str(torch.get_num_threads()),
        ],
    )
    deadline = time.monotonic() + 120
    while not (ck / train_mod.CHECKPOINT).exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = torch.load(ck / train_mod.CHECKPOINT, weights_only=True)["step"]
    assert 0 < killed_at < 60
    state = torch.load(ck / train_mod.CHECKPOINT, weights_only=True)
    assert state["best_step"] > 0  # a best was found before the kill
    assert {n: (tmp_path / "killed" / n).read_bytes() for n in earlier} == earlier

    # a checkpoint write the kill interrupted (issue 25 #8): the next run removes it
    left = ck / f".checkpoint.pt.{socket.gethostname()}-{proc.pid}-x.tmp"
    left.write_bytes(b"")
    resumed = train(cfg, omniglot_prepared, tmp_path / "killed", ck, progress=False)
    assert resumed.resumed_from == killed_at
    assert not left.exists() and not list(ck.glob(".*.tmp"))
    straight = train(
        cfg, omniglot_prepared, tmp_path / "straight", tmp_path / "ck2", progress=False
    )
    a = load_file(str(tmp_path / "killed" / "theta.safetensors"))
    b = load_file(str(tmp_path / "straight" / "theta.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert resumed.best_val_acc == straight.best_val_acc


def test_a_killed_run_resumes_into_the_same_mlflow_run(
    omniglot_prepared: Path, tmp_path: Path
) -> None:
    """kill -9 of `mamlops train` leaves its MLflow run RUNNING; `mamlops check` marks it KILLED;
    the rerun that resumes from the checkpoint reopens that run: one run, FINISHED, whose
    history spans both sessions."""
    import mlflow

    params = tiny_params(iterations=40, checkpoint_every=5, val_every=10, log_every=5)
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "omniglot").symlink_to(omniglot_prepared)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mamlops", "train", "tiny", "--params", "params.yaml"]
    ck = tmp_path / "checkpoints" / "tiny" / train_mod.CHECKPOINT
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ck.exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = torch.load(ck, weights_only=True)["step"]
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs(client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id)
    assert run.info.status == "RUNNING"  # what kill -9 leaves
    # `mamlops check` (what `make run` runs first) marks it KILLED (issue 25 #4)
    check = [sys.executable, "-m", "mamlops", "check", "--params", "params.yaml"]
    out = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"marked KILLED the MLflow runs of dead processes: {run.info.run_id}" in out.stdout
    assert client.get_run(run.info.run_id).info.status == "KILLED"

    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    runs = client.search_runs(run.info.experiment_id)
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    resumed = runs[0]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["mamlops.resumed_from"] == str(killed_at) and killed_at < 40
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "val/acc")}
    assert steps == {10, 20, 30, 40}


def test_other_params_start_from_scratch(omniglot_prepared: Path, tmp_path: Path, capsys) -> None:
    """A finished run's checkpoint is not resumed by a run with other params (what `dvc exp run
    -S ...` does after `dvc repro`): that run starts fresh, says so, and ends where a run from
    an empty checkpoint folder ends (same process, threads and shapes: bitwise)."""
    train(
        tiny_cfg(iterations=3), omniglot_prepared, tmp_path / "a", tmp_path / "ck", progress=False
    )
    other = tiny_cfg(iterations=3, inner_lr=0.3)
    result = train(other, omniglot_prepared, tmp_path / "a", tmp_path / "ck", progress=False)
    assert "other train params: starting from scratch" in capsys.readouterr().out
    assert result.resumed_from == 0 and result.step == 3
    fresh = train(other, omniglot_prepared, tmp_path / "b", tmp_path / "ck-b", progress=False)

    def numbers(history: list[dict]) -> list[dict]:  # all but the timing
        return [{k: v for k, v in row.items() if k != "tasks_per_s"} for row in history]

    assert numbers(result.history) == numbers(fresh.history)
    a = load_file(tmp_path / "a" / "theta.safetensors")
    b = load_file(tmp_path / "b" / "theta.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = train(other, omniglot_prepared, tmp_path / "a", tmp_path / "ck", progress=False)
    assert again.resumed_from == 3  # the replaced checkpoint now belongs to these params


def test_non_finite_loss_stops_and_keeps_checkpoint(
    omniglot_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg(iterations=9)
    ck = tmp_path / "ck"
    train(cfg, omniglot_prepared, tmp_path, ck, progress=False, stop_after=3)
    before = torch.load(ck / train_mod.CHECKPOINT, weights_only=True)
    assert before["step"] == 3

    real = maml.meta_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        nan = loss * float("nan")
        return nan, {**metrics, "loss": nan.detach()}

    monkeypatch.setattr(train_mod.maml, "meta_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="iteration 4.*last good checkpoint"):
        train(cfg, omniglot_prepared, tmp_path, ck, progress=False)
    after = torch.load(ck / train_mod.CHECKPOINT, weights_only=True)
    assert after["step"] == 3
    for k, v in before["params"].items():
        assert torch.equal(v, after["params"][k])
        assert torch.isfinite(after["params"][k]).all()


def test_maml_plus_plus_switches_train_and_track_inner_lrs(
    omniglot_prepared: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg(
        iterations=3,
        inner_steps=2,
        learn_inner_lr=True,
        per_step_bn=True,
        multi_step_loss=True,
        multi_step_anneal_iters=2,
        first_order_iters=2,
        cosine_meta_lr=True,
        grad_clip=1.0,
    )
    result = train(cfg, omniglot_prepared, tmp_path, tmp_path / "ck", progress=False)
    row = result.history[-1]
    assert row["inner_lr/conv0.weight/step1"] != cfg.inner_lr  # learned, so it moved
    assert row["meta_lr"] < cfg.meta_lr  # cosine annealing
    theta = load_file(str(tmp_path / "theta.safetensors"))
    assert theta["bn0.weight"].shape == (3, 64)  # per-step BN: inner_steps + 1 rows


def test_a_finished_run_rewrites_both_theta_files(omniglot_prepared: Path, tmp_path: Path):
    """DVC deletes a stage's outputs before it runs it (`dvc repro -f`, a kill after the last
    checkpoint): the resume finds the run done and must still write theta and theta_best,
    byte-identical, from the checkpoint (it keeps the best theta and its step)."""
    cfg = tiny_cfg(iterations=4, val_every=2, checkpoint_every=2)
    out, ck = tmp_path / "m", tmp_path / "ck"
    first = train(cfg, omniglot_prepared, out, ck, progress=False)
    before = {w: (out / f"{w}.safetensors").read_bytes() for w in ("theta", "theta_best")}
    for name in before:
        (out / f"{name}.safetensors").unlink()
    again = train(cfg, omniglot_prepared, out, ck, progress=False)
    assert again.resumed_from == 4 and again.best_step == first.best_step
    for name, data in before.items():
        assert (out / f"{name}.safetensors").read_bytes() == data, name
    # the whole run's time, not the resume's fraction of a second
    assert again.seconds > 0.5 * first.seconds and again.tasks_per_s < 2 * first.tasks_per_s
    assert again.final_loss == first.final_loss  # the last logged loss, from the checkpoint


def test_other_prepared_data_or_code_start_from_scratch(
    omniglot_prepared: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint continues only the run that wrote it: same config, same prepared data
    (here one pixel differs), same training code (here a module is edited)."""
    import shutil

    cfg = tiny_cfg(iterations=2)
    out, ck = tmp_path / "m", tmp_path / "ck"
    train(cfg, omniglot_prepared, out, ck, progress=False)
    other = tmp_path / "prepared"
    shutil.copytree(omniglot_prepared, other)
    images = other / "images.npy"
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF
    images.write_bytes(bytes(data))
    result = train(cfg, other, out, ck, progress=False)
    assert "other prepared data: starting from scratch" in capsys.readouterr().out
    assert result.resumed_from == 0

    from mamlops.meta import checkpoint as ckpt_mod

    package = tmp_path / "package"
    package.mkdir()
    copies = [Path(shutil.copy(f, package / f.name)) for f in ckpt_mod.training_code()]
    (package / "maml.py").write_text((package / "maml.py").read_text() + "\n# a fix\n")
    monkeypatch.setattr(ckpt_mod, "training_code", lambda: copies)
    result = train(cfg, other, out, ck, progress=False)
    assert "other training code: starting from scratch" in capsys.readouterr().out
    assert result.resumed_from == 0


def test_the_training_code_is_the_import_closure_of_train() -> None:
    """Derived, not hand-kept: what train.py runs decides resumption (splits.py, which
    training uses through load_bank, was missing from the old list)."""
    from mamlops.meta import checkpoint as ckpt_mod

    names = {f.name for f in ckpt_mod.training_code()}
    assert {"train.py", "maml.py", "model.py", "splits.py", "episodes.py", "graph_step.py"} <= names
    assert {"checkpoint.py", "config.py", "distributed.py"} <= names
    assert not names & {"tracking.py", "files.py", "errors.py", "cli.py", "serve.py", "export.py"}

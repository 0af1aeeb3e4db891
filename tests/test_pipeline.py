"""The real pipeline: `dvc repro` in a fresh copy of the repository, on the Omniglot mirror.

One module-scoped run of the whole pipeline (with a tiny training budget written into the copy's
params.yaml) serves every test here; it is the slowest part of the suite (a few minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import OMNIGLOT_ZIPS, REPO, free_port, mlflow_models_serve, omniglot_mirror

from mamlops import tracking

SETTING = "omniglot-5w1s"


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{tail}"
    return proc.stdout


def fresh_copy(dest: Path) -> Path:
    """What a clean clone would hold: tracked and untracked-not-ignored files, committed."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "fresh"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def pipeline_env() -> dict[str, str]:
    mirror = omniglot_mirror()
    if not all((mirror / n).is_file() for n in OMNIGLOT_ZIPS):
        pytest.skip(f"Omniglot mirror not found at {mirror}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MAMLOPS_DATA_MIRROR"] = str(mirror.resolve())
    return env


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, pipeline_env: dict[str, str]) -> Path:
    """A fresh copy after `dvc repro` with a tiny training budget."""
    root = fresh_copy(tmp_path_factory.mktemp("clone"))
    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["train"]["presets"][SETTING].update(
        iterations=20,
        meta_batch=4,
        query=5,
        val_every=10,
        val_episodes=10,
        checkpoint_every=10,
        log_every=5,
    )
    params["evaluate"]["steps"] = 3  # 600 episodes x 3 steps keeps the suite short
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["dvc", "repro"], root, pipeline_env)
    return root


def test_prepare_outputs(repo: Path) -> None:
    prepared = repo / "data" / "prepared" / "omniglot"
    assert (prepared / "images.npy").is_file()
    splits = json.loads((prepared / "splits.json").read_text())
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (4112, 688, 1692)
    assert (prepared / "episodes" / "test_5w1s.npz").is_file()


def test_status_clean_after_repro(repo: Path, pipeline_env: dict[str, str]) -> None:
    out = _run(["dvc", "status"], repo, pipeline_env)
    assert "up to date" in out, out


def test_train_metrics_and_plots(repo: Path, pipeline_env: dict[str, str]) -> None:
    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, pipeline_env))
    flat = json.dumps(metrics)
    assert "best_val_acc" in flat
    train_metrics = json.loads((repo / "metrics" / "train" / f"{SETTING}.json").read_text())
    assert train_metrics["iterations"] == 20
    assert 0.2 < train_metrics["best_val_acc"] <= 1.0  # 5-way: chance is 0.2
    assert (repo / "models" / SETTING / "theta.safetensors").is_file()
    _run(["dvc", "plots", "show", "-o", "dvc_plots"], repo, pipeline_env)
    assert (repo / "dvc_plots" / "index.html").is_file()


def test_mlflow_run_recorded(repo: Path) -> None:
    db = repo / "mlflow.db"
    assert db.is_file(), "the default store is sqlite:///<repo root>/mlflow.db"
    con = sqlite3.connect(db)
    try:
        runs = con.execute("select run_uuid, status, name from runs").fetchall()
        train_runs = [r for r in runs if r[2] == f"train-{SETTING}"]
        assert train_runs and train_runs[0][1] == "FINISHED"
        run_id = train_runs[0][0]
        params = dict(con.execute("select key, value from params where run_uuid=?", (run_id,)))
        assert params["ways"] == "5" and params["inner_lr"] == "0.4"
        keys = {k for (k,) in con.execute("select key from metrics where run_uuid=?", (run_id,))}
        assert {"loss", "train_acc", "val_acc", "tasks_per_s"} <= keys
        tags = dict(con.execute("select key, value from tags where run_uuid=?", (run_id,)))
        assert tags["dvc.stage"] == f"train@{SETTING}"
        assert len(tags["mlflow.source.git.commit"]) == 40
        # 5-way 1-shot with 5 query/class is 30 images per task: past the CPU batched limit
        assert tags["mamlops.strategy"] == "loop"
    finally:
        con.close()


def test_repo_root_sees_through_dvc_experiment_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    inner = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc"
    inner.mkdir(parents=True)
    assert tracking.repo_root(inner) == tmp_path / "proj"
    assert tracking.tracking_uri(inner) == f"sqlite:///{tmp_path / 'proj' / 'mlflow.db'}"


def test_evaluate_metrics(repo: Path, pipeline_env: dict[str, str]) -> None:
    ev = json.loads((repo / "metrics" / "eval" / f"{SETTING}.json").read_text())
    assert ev["n"] == 600 and ev["steps"] == 3
    for protocol in ("transductive", "support"):
        assert 0.2 < ev[f"acc_{protocol}"] <= 1.0
        assert 0.0 < ev[f"ci95_{protocol}"] < 0.05
    shown = _run(["dvc", "metrics", "show"], repo, pipeline_env)
    assert "acc_transductive" in shown and "ci95_support" in shown
    steps_csv = (repo / "plots" / "eval" / f"{SETTING}_steps.csv").read_text().splitlines()
    assert steps_csv[0].split(",")[:3] == ["step", "acc_transductive", "acc_support"]
    assert len(steps_csv) == 1 + 4  # steps 0..3
    assert (repo / "plots" / "episodes" / f"{SETTING}.png").stat().st_size > 1000


def test_export_onnx_and_registry(repo: Path) -> None:
    import onnx
    from mlflow import MlflowClient

    onnx_path = repo / "models" / SETTING / "model.onnx"
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert len(json.loads(meta["labels"])) == 5
    ex = json.loads((repo / "metrics" / "export" / f"{SETTING}.json").read_text())
    assert ex["parity_max_abs_diff"] < 1e-5
    assert ex["registry"]["alias_on"] == ex["registry"]["version"] == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    version = client.get_model_version_by_alias(f"mamlops-{SETTING}", "champion")
    assert str(version.version) == "1"


def query_images(repo: Path, labels: list[str], dest: Path, per_class: int = 3) -> list[Path]:
    """Real drawings of the exported classes as PNG files, rotated as the class says."""
    from PIL import Image

    paths = []
    for i, label in enumerate(labels):
        alphabet, character, rot = label.split("/")
        files = sorted((repo / "data" / "raw" / "omniglot").glob(f"*/{alphabet}/{character}/*.png"))
        assert len(files) == 20, label
        for f in files[-per_class:]:
            path = dest / f"{i}_{f.name}"
            Image.open(f).rotate(int(rot[3:])).save(path)  # PIL rotates counter-clockwise
            paths.append(path)
    return paths


def test_cli_predict_and_http_serve_agree_on_real_images(
    repo: Path, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    import httpx
    import onnx

    onnx_path = repo / "models" / SETTING / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    labels = json.loads(meta["labels"])
    paths = query_images(repo, labels, tmp_path)
    truth = [label for label in labels for _ in range(3)]
    mamlops = str(Path(sys.executable).parent / "mamlops")

    out = _run([mamlops, "predict", str(onnx_path), *map(str, paths)], repo, pipeline_env)
    cli = [line.split("\t")[1] for line in out.strip().splitlines()]
    assert len(cli) == len(paths)
    torch_out = _run(
        [
            mamlops,
            "predict",
            str(repo / "models" / SETTING / "classifier.safetensors"),
            *map(str, paths),
        ],
        repo,
        pipeline_env,
    )
    assert [line.split("\t")[1] for line in torch_out.strip().splitlines()] == cli

    port = free_port()
    server = subprocess.Popen(
        [mamlops, "serve", str(onnx_path), "--host", "127.0.0.1", "--port", str(port)],
        cwd=repo,
        env=pipeline_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("mamlops serve did not come up")
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
        reply = httpx.post(f"{base}/predict", files=files, timeout=30)
        assert reply.status_code == 200, reply.text
        served = [p["label"] for p in reply.json()["predictions"]]
        assert served == cli
        assert sum(a == b for a, b in zip(served, truth, strict=True)) / len(truth) > 0.2
        bad = httpx.post(f"{base}/predict", files=[("files", ("x.png", b"not an image"))])
        assert bad.status_code == 400
        assert httpx.get(f"{base}/health").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_cli_adapt_to_own_classes_then_export(
    repo: Path, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    """A user's folder of a few images per class -> adapted classifier -> ONNX -> predictions."""
    raw = repo / "data" / "raw" / "omniglot" / "images_evaluation"
    characters = sorted(raw.glob("*/character01"))[:5]
    support, query = tmp_path / "support", tmp_path / "query"
    for char in characters:
        files = sorted(char.glob("*.png"))
        label = char.parent.name
        for folder, chosen in ((support, files[:1]), (query, files[10:14])):
            (folder / label).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, folder / label / f.name)
    mamlops = str(Path(sys.executable).parent / "mamlops")
    clf = tmp_path / "mine.safetensors"
    theta = repo / "models" / SETTING / "theta_best.safetensors"
    _run(
        [mamlops, "adapt", str(support), "--meta", str(theta), "--out", str(clf)],
        repo,
        pipeline_env,
    )
    report = _run([mamlops, "evaluate-folder", str(clf), str(query)], repo, pipeline_env)
    assert "accuracy" in report and characters[0].parent.name in report
    onnx_path = tmp_path / "mine.onnx"
    _run([mamlops, "export", str(clf), "--out", str(onnx_path)], repo, pipeline_env)
    images = sorted(query.glob("*/*.png"))
    out = _run([mamlops, "predict", str(onnx_path), *map(str, images)], repo, pipeline_env)
    predicted = [line.split("\t")[1] for line in out.strip().splitlines()]
    truth = [p.parent.name for p in images]
    assert set(predicted) <= set(truth)
    assert sum(a == b for a, b in zip(predicted, truth, strict=True)) / len(truth) > 0.2

    empty = tmp_path / "bad"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    proc = subprocess.run(
        [mamlops, "adapt", str(empty), "--meta", str(theta), "--out", str(tmp_path / "x.st")],
        cwd=repo,
        env=pipeline_env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "no images" in proc.stderr
    assert not (tmp_path / "x.st").exists()


@pytest.mark.timeout(300)
def test_mlflow_models_serve_answers_for_the_champion(repo: Path, tmp_path: Path) -> None:
    """The registered champion, served by MLflow, classifies real Omniglot drawings like
    onnxruntime does on the exported file."""
    import httpx
    import numpy as np
    import onnx

    from mamlops.onnx_predict import OnnxClassifier

    onnx_path = repo / "models" / SETTING / "model.onnx"
    labels = json.loads(
        {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["labels"]
    )
    local = OnnxClassifier(onnx_path)
    x = local.preprocess([str(p) for p in query_images(repo, labels, tmp_path)])
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    with mlflow_models_serve(f"models:/mamlops-{SETTING}@champion", uri) as url:
        resp = httpx.post(f"{url}/invocations", json={"inputs": x.tolist()}, timeout=60)
    assert resp.status_code == 200, resp.text
    got = np.array(resp.json()["predictions"]["probabilities"], dtype=np.float32)
    np.testing.assert_allclose(got, local.predict_array(x), atol=1e-6, rtol=0)
    truth = np.repeat(np.arange(len(labels)), 3)
    assert (got.argmax(1) == truth).mean() > 0.2


@pytest.mark.timeout(600)
def test_exp_run_after_a_finished_run(repo: Path, pipeline_env: dict[str, str]) -> None:
    """The README's next step after `dvc repro`: change a param as a DVC experiment. The
    persisted checkpoint of the finished run must not block it (it used to fail at once with
    'written with other train params'): the new params train from scratch. Runs last here: it
    changes the workspace that the tests above read."""
    out = _run(
        # evaluate.steps=1 only keeps the suite short
        ["dvc", "exp", "run", "-n", "mb2", "-S", f"train.presets.{SETTING}.meta_batch=2"]
        + ["-S", "evaluate.steps=1"],
        repo,
        pipeline_env,
    )
    assert "other train params: starting from scratch" in out
    train = json.loads((repo / "metrics" / "train" / f"{SETTING}.json").read_text())
    assert train["iterations"] == 20 and train["resumed_from"] == 0
    shown = _run(["dvc", "exp", "show", "--json"], repo, pipeline_env)
    assert '"mb2"' in shown and '"meta_batch": 2' in shown

"""The real pipeline: `dvc repro` in a fresh copy of the repository, on the Omniglot mirror.

One module-scoped run of the whole pipeline (with a tiny training budget written into the copy's
params.yaml) serves every test here; it is the slowest part of the suite (a few minutes).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import OMNIGLOT_ZIPS, REPO, free_port, mlflow_models_serve, omniglot_mirror

from mamlops import mlflow_ui, tracking

SETTING = "omniglot-5w1s"
TEST_EPISODES = 100  # fixed test episodes per setting in the tiny repository


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
    params_path, presets_path = root / "params.yaml", root / "presets.yaml"
    params, presets = (
        yaml.safe_load(params_path.read_text()),
        yaml.safe_load(presets_path.read_text()),
    )
    presets[SETTING].update(
        iterations=20,
        meta_batch=4,
        query=5,
        val_every=10,
        val_episodes=10,
        checkpoint_every=10,
        log_every=5,
    )
    # 100 test episodes x 1 step keeps the suite short (evaluate ran 600 in about 35 s, five
    # times: the fixture, three experiments and the paper preset)
    params["prepare"]["episodes"]["count"] = TEST_EPISODES
    params["evaluate"]["steps"] = 1
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    presets_path.write_text(yaml.safe_dump(presets, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "commit", "-qam", "tiny budget"], cwd=root, check=True)
    _run(["dvc", "repro"], root, pipeline_env)
    return root


def test_prepare_outputs(repo: Path) -> None:
    prepared = repo / "data" / "prepared" / "omniglot"
    assert (prepared / "images.npy").is_file()
    splits = json.loads((prepared / "splits" / "vinyals.json").read_text())
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (4112, 688, 1692)
    assert json.loads((prepared / "meta.json").read_text())["splits"][0] == "vinyals"
    for scheme in ("vinyals", "random", "official"):
        assert (prepared / "episodes" / scheme / "test_5w1s.npz").is_file()
        assert (prepared / "episodes" / scheme / "test_alphabet_5w1s.npz").is_file()


def test_status_clean_after_repro(repo: Path, pipeline_env: dict[str, str]) -> None:
    out = _run(["dvc", "status"], repo, pipeline_env)
    assert "up to date" in out, out
    # git sees only what the run is meant to update: dvc.lock and the git-tracked
    # metrics, plots and results (README.md and the rest untouched; data, models,
    # checkpoints, the MLflow store and its artifacts ignored)
    changed = _run(["git", "status", "--porcelain", "-uall"], repo, pipeline_env).splitlines()
    paths = [line[3:] for line in changed]
    allowed = ("dvc.lock", "metrics/", "plots/", "results/")
    assert paths and all(p.startswith(allowed) for p in paths), paths


def test_train_metrics_and_plots(repo: Path, pipeline_env: dict[str, str]) -> None:
    train_metrics = json.loads((repo / "metrics" / "train" / f"{SETTING}.json").read_text())
    assert 0.2 < train_metrics["best_val_acc"] <= 1.0  # 5-way: chance is 0.2
    assert train_metrics["best_step"] in (10, 20)
    assert (repo / "models" / SETTING / "theta.safetensors").is_file()
    # validation points in their own file, one row per check: nothing drawn as a blank/0
    val = (repo / "plots" / "val" / f"{SETTING}.tsv").read_text().split()
    assert val[:2] == ["step", "val_acc"] and val[2::2] == ["10", "20"]
    plots = json.loads(_run(["dvc", "plots", "show", "--json"], repo, pipeline_env))
    assert not plots.get("errors"), plots.get("errors")
    charts = plots["data"]
    # every chart once: the five files of dvc.yaml's top-level plots, nothing else
    assert sorted(charts) == sorted(
        f"plots/{kind}/{SETTING}.{ext}"
        for kind, ext in (("train", "tsv"), ("val", "tsv"), ("eval", "csv"))
        + (("curves", "png"), ("episodes", "png"))
    )
    for name, (chart,) in charts.items():
        if chart["type"] != "vega":
            continue
        spec = chart["content"]
        # each chart titled with its file, which names the setting: with two settings, one
        # title for both charts said neither (issue 25)
        assert spec["title"]["text"] == name
        assert spec["encoding"]["x"]["field"] == "step" and spec["encoding"]["x"]["title"] != "x"
        y = spec["layer"][0]["encoding"]["y"]
        assert y["title"] not in ("y", ""), name
        if "/train/" not in name:  # accuracy: the axis reaches 1, a lone point has room
            assert y["scale"]["domain"] == {"unionWith": [1]} and y["scale"]["padding"] > 0
    _run(["dvc", "plots", "show", "-o", "dvc_plots"], repo, pipeline_env)
    page = (repo / "dvc_plots" / "index.html").read_text()
    # DVC's page loads Vega from a CDN; offline it left the charts out without a word: the
    # repository's template (.dvc/config) says so and points to `make plots` (issue 25)
    assert "cdn.jsdelivr.net" in page and "vegaEmbed" in page
    assert 'id="offline" hidden' in page and "make plots" in page


def test_metrics_are_numbers_only(repo: Path, pipeline_env: dict[str, str]) -> None:
    """`dvc metrics show/diff` is a readable table: no strings or dicts in metrics files, and
    each number visible at DVC's default precision (5 decimals)."""
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, pipeline_env))
    files = shown[""]["data"] if "" in shown else next(iter(shown.values()))["data"]
    values = {k: v for f in files.values() for k, v in f["data"].items()}
    assert len(files) == 3 and len(values) <= 16, sorted(values)
    for key, value in values.items():
        assert isinstance(value, int | float) and not isinstance(value, bool), key
    assert values["parity_ppm"] < 10  # |ORT - torch| < 1e-5
    assert 0.2 < values["acc_k_query_transductive"] <= 1.0  # the paper's K-query protocol
    results = json.loads((repo / "results" / f"{SETTING}.json").read_text())
    assert results["dataset"] == "omniglot" and results["episodes"] == TEST_EPISODES
    assert results["hardware"].startswith(("CPU", "GPU"))


def test_mlflow_run_recorded(repo: Path) -> None:
    from mlflow import MlflowClient

    db = repo / "mlflow.db"
    assert db.is_file(), "the default store is sqlite:///<repo root>/mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("mamlops")
    # artifacts beside the store, not in ./mlruns of whichever folder created the experiment
    assert exp.artifact_location == (repo / "mlartifacts").as_uri()
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], f"tags.`dvc.stage` = 'train@{SETTING}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.info.run_name.startswith(f"{SETTING} ")
    assert run.data.params["train.ways"] == "5" and run.data.params["train.inner_lr"] == "0.4"
    assert {"train/loss", "train/acc", "val/acc", "train/tasks_per_s"} <= set(run.data.metrics)
    assert not {k for k in run.data.metrics if "/" not in k}, "every metric key has a prefix"
    # the saved runs-table view (make mlflow-ui's address) shows keys the training row has: a
    # renamed metric or param would leave its column empty; values logged as printed
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{mlflow_ui.RUNS_VIEW}"])
    keys = {f"metrics.`{k}`" for k in run.data.metrics} | {f"params.`{k}`" for k in run.data.params}
    assert set(view["selectedColumns"]) <= keys, set(view["selectedColumns"]) - keys
    assert all(v == mlflow_ui.shown(v) for v in run.data.metrics.values())
    tags = run.data.tags
    assert tags["dvc.stage"] == f"train@{SETTING}" and len(tags["mlflow.source.git.commit"]) == 40
    assert tags["mlflow.note.content"].startswith(f"Meta-training {SETTING}")
    # 5-way 1-shot with 5 query/class is 30 images per task: past the CPU batched limit
    assert tags["mamlops.strategy"] == "loop"
    (dataset,) = run.inputs.dataset_inputs
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    (out,) = lock["stages"]["prepare@omniglot"]["outs"]
    assert dataset.dataset.digest == out["md5"].removesuffix(".dir")
    # evaluate and export are child runs of the training run, each with its own status
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    )
    stages = {c.data.tags["dvc.stage"]: c for c in children}
    assert set(stages) == {f"evaluate@{SETTING}", f"export@{SETTING}"}
    assert all(c.info.status == "FINISHED" for c in children)
    ev = stages[f"evaluate@{SETTING}"].data
    assert 0.2 < ev.metrics["eval/acc_transductive"] <= 1 and ev.params["evaluate.steps"] == "1"
    assert not {k for k in ev.metrics if not k.startswith("eval/")}


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
    for protocol in ("transductive", "support"):
        assert 0.2 < ev[f"acc_{protocol}"] <= 1.0
        assert 0.0 < ev[f"ci95_{protocol}"] < 0.05
    shown = _run(["dvc", "metrics", "show"], repo, pipeline_env)
    assert "acc_transductive" in shown and "ci95_support" in shown
    steps_csv = (repo / "plots" / "eval" / f"{SETTING}.csv").read_text().splitlines()
    assert steps_csv[0].split(",")[:3] == ["step", "acc_transductive", "acc_support"]
    assert len(steps_csv) == 1 + 2  # steps 0..1
    assert (repo / "plots" / "episodes" / f"{SETTING}.png").stat().st_size > 1000


def test_export_onnx_and_registry(repo: Path) -> None:
    import mlflow
    import onnx
    from mlflow import MlflowClient

    onnx_path = repo / "models" / SETTING / "model.onnx"
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert len(json.loads(meta["labels"])) == 5
    ex = json.loads((repo / "metrics" / "export" / f"{SETTING}.json").read_text())
    assert ex["parity_ppm"] < 10
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    version = client.get_model_version_by_alias(f"mamlops-{SETTING}", "champion")
    assert str(version.version) == "1"
    # a named signature: the ONNX input, and label/probability columns out
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        info = mlflow.models.get_model_info(f"models:/mamlops-{SETTING}@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    assert [spec.name for spec in info.signature.inputs.inputs] == ["x"]
    assert [spec.name for spec in info.signature.outputs.inputs][:2] == ["label", "probability"]


def test_forced_train_rerun_rewrites_its_outputs(repo: Path, pipeline_env: dict[str, str]):
    """`dvc repro -f` deletes train's outputs, then the stage finds its checkpoint at the final
    step: it must write both theta files again (byte-identical), so the pipeline stays whole."""
    model = repo / "models" / SETTING
    before = {p.name: p.read_bytes() for p in model.glob("theta*.safetensors")}
    assert sorted(before) == ["theta.safetensors", "theta_best.safetensors"]
    out = _run(["dvc", "repro", "-f", "-s", f"train@{SETTING}"], repo, pipeline_env)
    assert "Running stage 'train@" in out
    assert {p.name: p.read_bytes() for p in model.glob("theta*.safetensors")} == before
    assert "up to date" in _run(["dvc", "status"], repo, pipeline_env)
    metrics = json.loads((repo / "metrics" / "train" / f"{SETTING}.json").read_text())
    assert metrics["train_seconds"] > 0.5 and metrics["best_step"] in (10, 20)


def _snapshot(paths: list[Path]) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in paths}


def test_a_failed_stage_keeps_the_earlier_outputs(repo: Path, pipeline_env: dict[str, str]):
    """DVC deletes a stage's outputs before it runs it; a stage that then fails used to leave
    nothing (a dead mirror: no data/raw; a dead tracking server: no theta, and the uncached
    metrics and plots gone for good). With `persist: true` and atomic writes, everything from
    the last good run is still there, byte for byte, and `dvc status` is clean."""
    raw = repo / "data" / "raw" / "omniglot"
    raw_files = sorted(str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file())
    env = {**pipeline_env, "MAMLOPS_DATA_MIRROR": str(repo / "no-such-mirror")}
    proc = subprocess.run(
        ["dvc", "repro", "-f", "-s", "download"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "kept (already verified)" in proc.stdout, proc.stderr
    assert sorted(str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file()) == raw_files

    outs = [
        repo / "models" / SETTING / "theta.safetensors",
        repo / "models" / SETTING / "theta_best.safetensors",
        repo / "metrics" / "train" / f"{SETTING}.json",
        *(repo / "plots" / kind / f"{SETTING}.tsv" for kind in ("train", "val")),
        repo / "plots" / "curves" / f"{SETTING}.png",
    ]
    before = _snapshot(outs)
    env = {**pipeline_env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # nothing listens
    proc = subprocess.run(
        ["dvc", "repro", "-f", "-s", f"train@{SETTING}"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "does not answer" in proc.stdout + proc.stderr, proc.stderr
    assert _snapshot(outs) == before
    assert "up to date" in _run(["dvc", "status"], repo, pipeline_env)


def _kill_dvc_repro(
    repo: Path,
    env: dict[str, str],
    stage: str,
    *,
    started: Callable[[], bool],
    what: str,
    timeout: float,
    delay: float,
) -> bool:
    """`dvc repro -f -s stage` in a process group of its own, killed with SIGKILL (DVC and the
    stage under it) ``delay`` seconds after ``started()`` first holds, unless it ended by then.
    Whether it was killed."""
    proc = subprocess.Popen(
        ["dvc", "repro", "-f", "-s", stage],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while not started():
        assert proc.poll() is None, f"{stage} ended before {what}"
        assert time.monotonic() < deadline, f"{stage}: no {what} within {timeout:.0f} s"
        time.sleep(0.01)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def test_kill_9_of_dvc_repro_mid_training_then_repro_is_bitwise_equal(
    repo: Path, pipeline_env: dict[str, str]
):
    """`kill -9` of `dvc repro` (its whole process group: DVC and the training under it) at a
    seeded random point of a training from scratch; `mamlops check` then `dvc repro` (what make
    run does) resume from the checkpoint and end with theta byte-identical to the uninterrupted
    run (same machine, threads and shapes), and `dvc status` is clean."""
    model, ck = repo / "models" / SETTING, repo / "checkpoints" / SETTING
    before = {p.name: p.read_bytes() for p in model.glob("theta*.safetensors")}
    rng = random.Random(12)  # one random point per suite run: each costs a training
    shutil.rmtree(ck)  # from scratch: the kill lands in the middle of the run
    killed = _kill_dvc_repro(
        repo,
        pipeline_env,
        f"train@{SETTING}",
        started=(ck / "checkpoint.pt").exists,
        what="its first checkpoint",
        timeout=240,
        delay=rng.uniform(0.0, 1.0),  # during a step, a validation or a checkpoint write
    )
    # DVC left its pid in .dvc/tmp/rwlock: a plain `dvc repro` refuses to run until it is
    # gone; `mamlops check` (make run's first step) releases the locks of dead processes
    checked = _run(["mamlops", "check"], repo, pipeline_env)
    assert not killed or "released DVC's lock" in checked, checked
    out = _run(["dvc", "repro"], repo, pipeline_env)
    assert not killed or "Running stage 'train@" in out, out
    assert {p.name: p.read_bytes() for p in model.glob("theta*.safetensors")} == before
    assert "up to date" in _run(["dvc", "status"], repo, pipeline_env)


@pytest.mark.parametrize(
    ("stage", "out", "seed"),
    [("download", "data/raw/omniglot", 3), ("prepare@omniglot", "data/prepared/omniglot", 4)],
)
def test_kill_9_of_dvc_repro_in_download_or_prepare_then_repro_is_bitwise_equal(
    repo: Path, pipeline_env: dict[str, str], stage: str, out: str, seed: int
):
    """`kill -9` of `dvc repro` (DVC and the stage under it) at a seeded random point after the
    stage made its work folder: fetching, extracting or verifying the zips, decoding the images
    or writing the episodes. `mamlops check` then `dvc repro` (make run) redo that stage alone
    (prepare comes back from DVC's run-cache), end with the same files byte for byte (nothing
    downstream reruns: their inputs hash the same) and leave no work folder of the killed
    process behind."""
    from mamlops.files import folder_digest

    dest = repo / out
    before = folder_digest(dest)
    pattern = f".{dest.name}-tmp-*"
    if stage == "download":
        shutil.rmtree(dest)  # a first download: with a verified copy the stage only re-checks it
    _kill_dvc_repro(
        repo,
        pipeline_env,
        stage,
        started=lambda: bool(list(dest.parent.glob(pattern))),
        what="its work folder",
        timeout=120,
        delay=random.Random(seed).uniform(0.0, 8.0),  # the stage takes about 10 s here
    )
    left = list(dest.parent.glob(pattern))
    # DVC restores a prepared folder from its run-cache without running prepare, so the stage
    # itself would never sweep what the killed one left: `mamlops check` does
    checked = _run(["mamlops", "check"], repo, pipeline_env)
    assert not left or "removed the work folders of killed stages" in checked, checked
    ran = _run(["dvc", "repro"], repo, pipeline_env)
    assert "Running stage 'train@" not in ran and "Running stage 'evaluate" not in ran, ran
    assert folder_digest(dest) == before
    assert not list(dest.parent.glob(pattern)), "the killed run's work folder is still there"
    assert "up to date" in _run(["dvc", "status"], repo, pipeline_env)


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

    from mamlops.classifier.onnx_predict import OnnxClassifier

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
    rows = resp.json()["predictions"]  # one row per image: label, probability, p:<label>
    got = np.array([[r[f"p:{label}"] for label in labels] for r in rows], dtype=np.float32)
    want = local.predict_array(x)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert [r["label"] for r in rows] == [labels[i] for i in want.argmax(1)]
    truth = [label for label in labels for _ in range(3)]
    assert np.mean([r["label"] == t for r, t in zip(rows, truth, strict=True)]) > 0.2


def _wait_for_queue(repo: Path, env: dict[str, str], timeout: float = 600) -> str:
    """`dvc queue start` returns at once; poll `dvc queue status` until nothing is left."""
    deadline = time.monotonic() + timeout
    while True:
        status = _run(["dvc", "queue", "status"], repo, env)
        if not any(w in status for w in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout} s:\n{status}"
        time.sleep(5)


@pytest.mark.timeout(600)
def test_a_second_clone_reproduces_from_a_dvc_remote_without_retraining(
    repo: Path, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    """`dvc push` of everything the pipeline made (data, prepared data, theta, checkpoints,
    classifiers) to a remote (here a local folder), then a `git clone` elsewhere and
    `dvc repro --pull`: every output comes from the remote, no stage runs, `dvc status` is
    clean, and theta is byte-identical. No MLflow store travels: nothing is run to need one."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    remote = tmp_path / "remote"
    _run(
        ["dvc", "remote", "add", "--force", "--default", "storage", str(remote)], repo, pipeline_env
    )
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "--allow-empty", "-qm", "remote"], cwd=repo, check=True)
    _run(["dvc", "push"], repo, pipeline_env)

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    env = {**pipeline_env, "MAMLOPS_DATA_MIRROR": str(tmp_path / "no-mirror")}  # no download
    out = _run(["dvc", "repro", "--pull"], clone, env)
    assert "Running stage" not in out, out
    assert "up to date" in _run(["dvc", "status"], clone, env)
    for rel in ("theta.safetensors", "theta_best.safetensors", "model.onnx"):
        path = Path("models") / SETTING / rel
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    ck = Path("checkpoints") / SETTING / "checkpoint.pt"
    assert (clone / ck).read_bytes() == (repo / ck).read_bytes()


@pytest.mark.timeout(900)
def test_the_experiment_loop(repo: Path, pipeline_env: dict[str, str]) -> None:
    """What a user does after `dvc repro`, as the README says it: change a param as a workspace
    experiment, queue a variant and run the queue, compare them with `dvc exp show
    --only-changed` and `dvc metrics diff`, and run a paper preset through its make target.
    The persisted checkpoint of the finished run must not block any of it (it used to fail at
    once with 'written with other train params'). Runs last here: it changes the workspace."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)  # what the README says to do
    subprocess.run(
        [*git, "commit", "--allow-empty", "-qm", "the tiny run's results"], cwd=repo, check=True
    )
    out = _run(
        # evaluate.steps=1 only keeps the suite short; processes=2: the stage runs itself
        # under torchrun (tests/test_distributed.py compares that with one process)
        ["dvc", "exp", "run", "-n", "mb2", "-S", f"presets.yaml:{SETTING}.meta_batch=2"]
        + ["-S", "train.common.processes=2", "-S", "evaluate.steps=1"],
        repo,
        pipeline_env,
    )
    assert "other train params: starting from scratch" in out
    assert out.count(f"{SETTING}: best val acc") == 1, out  # rank 0 alone reports and writes
    assert json.loads((repo / "metrics" / "train" / f"{SETTING}.json").read_text())

    # one queued variant (two took 40 s more and showed nothing more of the queue)
    _run(
        ["dvc", "exp", "run", "--queue", "-n", "lr-a"]
        + ["-S", f"presets.yaml:{SETTING}.inner_lr=0.2", "-S", "evaluate.steps=1"],
        repo,
        pipeline_env,
    )
    _run(["dvc", "queue", "start", "-j", "1"], repo, pipeline_env)
    status = _wait_for_queue(repo, pipeline_env)
    assert "Failed" not in status, status
    assert status.count("Success") >= 1, status

    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo, pipeline_env))
    exps = {
        e["name"]: e["revs"][0]["data"]
        for rev in shown
        for e in (rev.get("experiments") or [])
        if e.get("name")
    }
    assert {"mb2", "lr-a"} <= set(exps), sorted(exps)
    data = exps["lr-a"]
    assert data["params"]["presets.yaml"]["data"][SETTING]["inner_lr"] == 0.2
    acc = data["metrics"][f"metrics/eval/{SETTING}.json"]["data"]["acc_support"]
    assert 0.2 < acc <= 1.0
    # the queued runs logged to the repo's store (not a throwaway copy), named after the exp
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("mamlops").experiment_id
    runs = client.search_runs([exp_id], max_results=200)
    names = {r.info.run_name for r in runs}
    assert {f"{SETTING} lr-a", f"{SETTING} mb2"} <= names, names
    mb2 = [r.data.tags.get("mamlops.processes") for r in runs if r.info.run_name.endswith("mb2")]
    assert mb2 == ["2"], mb2  # one training run, from rank 0

    # readable: the params that differ and the metrics, no dependency hashes, no strings
    # (the README's compact view; plain --only-changed adds the hashes of outputs used as deps)
    drop = "Created|Executor|ci95_.*|acc_k_query.*|models/|metrics/"
    compact = ["--only-changed", "--drop", drop]
    table = _run(["dvc", "exp", "show", *compact, "--md"], repo, pipeline_env)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert {"best_val_acc", "acc_support", f"{SETTING}.inner_lr"} <= set(header), header
    assert len(header) <= 14 and not [c for c in header if "/" in c or "ci95" in c], header
    assert "lr-a" in table and "mb2" in table
    diff = _run(["dvc", "metrics", "diff", "HEAD"], repo, pipeline_env)
    assert "acc_support" in diff

    # the paper preset's make target with a tiny budget (its workspace run replaces the
    # settings `dvc repro` trains; the install step is the running venv's)
    venv = Path(sys.executable).parent.parent
    make = ["make", f"VENV={venv}", "-o", f"{venv}/bin/mamlops", "paper-omniglot-5w1s"]
    _run(make + ["ITERATIONS=4", "EXP_ARGS=-S evaluate.steps=1"], repo, pipeline_env)
    paper = json.loads((repo / "metrics" / "eval" / "paper-omniglot-5w1s.json").read_text())
    assert 0.2 < paper["acc_support"] <= 1.0
    results = json.loads((repo / "results" / "paper-omniglot-5w1s.json").read_text())
    assert results["train_iterations"] == 4

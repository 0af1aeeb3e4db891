"""The typer CLI: every command documents itself; bad input exits non-zero with a clear message."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, build_classifier, free_port
from typer.testing import CliRunner

from mamlops.cli import app
from mamlops.files import atomic_write

COMMANDS = [
    "check",
    "download",
    "verify",
    "prepare",
    "train",
    "evaluate",
    "publish",
    "adapt",
    "evaluate-folder",
    "predict",
    "export",
    "serve",
    "register",
    "report",
]
runner = CliRunner()


def test_every_command_is_listed() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_help(name: str) -> None:
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mamlops", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "predict" in out


def test_missing_model_is_a_clear_error(tmp_path) -> None:
    result = runner.invoke(app, ["predict", str(tmp_path / "nope.onnx"), str(tmp_path / "a.png")])
    assert result.exit_code == 1
    assert "nope.onnx" in result.output


def test_verify_names_what_is_wrong(tmp_path) -> None:
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1
    assert "images_background" in result.output


def _one_line_error(result, *names: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], lines
    for name in names:
        assert name in lines[0], (name, lines[0])


# ------------------------------------------------------------------------ --params FILE


def test_params_option_is_read(tmp_path, monkeypatch) -> None:
    """`--params FILE` is the file read, not params.yaml beside it (nor the current folder's)."""
    repo = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(repo))  # a valid one in the folder
    bad = {**repo, "prepare": {**repo["prepare"], "datasets": ["cifar"]}}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(bad))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["prepare", "--params", "other.yaml"])
    assert result.exit_code == 1 and "prepare.datasets" in result.output
    assert not (tmp_path / "data").exists()


@pytest.mark.slow  # the evaluation runs all 600 test episodes (about 25 s on 2 busy cores)
def test_train_with_another_params_file(omniglot_prepared: Path, tmp_path, monkeypatch) -> None:
    """A preset that exists only in FILE trains, through the same library call as the stage,
    and `evaluate --json` scores it (0 test-time steps: the forward passes alone)."""
    tiny = {
        "dataset": "omniglot", "ways": 5, "shots": 1, "query": 2, "meta_batch": 2,
        "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 1, "meta_lr": 0.001,
        "iterations": 4, "val_every": 2, "val_episodes": 2, "checkpoint_every": 2,
        "log_every": 2, "device": "cpu",
    }  # fmt: skip
    evaluate = {"checkpoint": "best", "steps": 0, "batch": 25, "grid_episodes": 1}
    mine = {"train": {"presets": {"only-here": tiny}}, "evaluate": evaluate}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "omniglot").symlink_to(omniglot_prepared)
    # code lying beside a params file never runs (it once ran DIR/pipeline/train.py)
    marker = tmp_path / "ran"
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "train.py").write_text(f"open({str(marker)!r}, 'w')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["train", "only-here", "--params", "mine.yaml"])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    metrics = yaml.safe_load((tmp_path / "metrics" / "train" / "only-here.json").read_text())
    assert 0 <= metrics["best_step"] <= 4 and 0.0 <= metrics["best_val_acc"] <= 1.0
    assert (tmp_path / "models" / "only-here" / "theta_best.safetensors").is_file()
    missing = runner.invoke(app, ["train", "only-here"])  # no ./params.yaml: said so, one line
    _one_line_error(missing, "params.yaml", "--params")

    # `evaluate --json`: the stage's metrics, alone on stdout (its summary line goes to stderr)
    result = runner.invoke(app, ["evaluate", "only-here", "--params", "mine.yaml", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["setting"] == "only-here"
    for key in ("acc_transductive", "acc_support"):
        assert 0.0 <= out[key] <= 1.0 and out[key.replace("acc", "ci95")] >= 0.0
    written = json.loads((tmp_path / "metrics" / "eval" / "only-here.json").read_text())
    assert {k: out[k] for k in written} == written


# ------------------------------------------------------------------------ predict --top-k


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A classifier file, its ONNX export and query images written as PNG files."""
    from mamlops.classifier.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("cli-model")
    clf, queries = build_classifier()
    clf.save(root / "clf.safetensors")
    export_onnx(clf, root / "clf.onnx")
    images = []
    for i, png in enumerate(queries):
        images.append(root / f"q{i}.png")
        images[-1].write_bytes(png)
    per_class = len(queries) // len(clf.labels)  # build_classifier: queries grouped by class
    return {
        "safetensors": root / "clf.safetensors",
        "onnx": root / "clf.onnx",
        "images": images[:3],
        "all_images": images,
        "truth": [clf.labels[i // per_class] for i in range(len(queries))],
        "labels": clf.labels,
    }


def _ranked(output: str) -> list[list[tuple[str, float]]]:
    rows = []
    for line in output.strip().splitlines():
        _, *fields = line.split("\t")
        rows.append([(fields[i], float(fields[i + 1])) for i in range(0, len(fields), 2)])
    return rows


@pytest.mark.parametrize("top_k", [1, 3, 99])
def test_predict_top_k(exported: dict, top_k: int) -> None:
    """`--top-k K` lists K classes per image, most likely first, from PyTorch and ONNX alike."""
    args = [str(p) for p in exported["images"]]
    by_kind = {}
    for kind in ("safetensors", "onnx"):
        result = runner.invoke(app, ["predict", str(exported[kind]), *args, "--top-k", str(top_k)])
        assert result.exit_code == 0, result.output
        rows = _ranked(result.output)
        assert len(rows) == len(args)
        for row in rows:
            assert len(row) == min(top_k, 5)  # a 5-way classifier has 5 classes to list
            probs = [p for _, p in row]
            assert probs == sorted(probs, reverse=True)
            assert len({label for label, _ in row}) == len(row)
        by_kind[kind] = rows
    # onnxruntime and PyTorch: same ranking, probabilities to printed precision (1e-4)
    for torch_row, onnx_row in zip(by_kind["safetensors"], by_kind["onnx"], strict=True):
        assert [label for label, _ in torch_row] == [label for label, _ in onnx_row]
        for (_, a), (_, b) in zip(torch_row, onnx_row, strict=True):
            assert a == pytest.approx(b, abs=2e-4)


# ------------------------------------------------------------------------ register errors


def test_adapt_on_a_meta_model_of_random_bytes_is_one_line(tmp_path) -> None:
    meta = tmp_path / "theta.safetensors"
    meta.write_bytes(np.random.default_rng(0).bytes(5000))
    for label in ("a", "b"):
        (tmp_path / "support" / label).mkdir(parents=True)
    out = tmp_path / "clf.safetensors"
    args = ["adapt", str(tmp_path / "support"), "--meta", str(meta), "--out", str(out)]
    _one_line_error(runner.invoke(app, args), str(meta), "not a safetensors file")
    assert not out.exists()


def test_a_full_disk_is_one_line_and_keeps_the_earlier_file(
    exported: dict, tmp_path, monkeypatch
) -> None:
    """`mamlops export` onto a disk that fills up mid-write (the writer patched to fail as a
    full disk does): one line naming the file, the earlier file intact, no temporary left."""
    import errno
    import pathlib

    out = tmp_path / "clf.onnx"
    out.write_bytes(b"the earlier export")

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    result = runner.invoke(app, ["export", str(exported["safetensors"]), "--out", str(out)])
    _one_line_error(result, f"cannot write {out}", "no space left on the device")
    assert out.read_bytes() == b"the earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf.onnx"]


@pytest.mark.parametrize("kind", ["safetensors", "onnx"])
def test_predict_on_a_non_image_is_one_line(exported: dict, kind: str) -> None:
    result = runner.invoke(app, ["predict", str(exported[kind]), str(REPO / "README.md")])
    _one_line_error(result, "README.md", "cannot read image")


def test_register_bad_paths_are_one_line(tmp_path) -> None:
    _one_line_error(runner.invoke(app, ["register", str(tmp_path / "nope.onnx")]), "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    _one_line_error(runner.invoke(app, ["register", str(junk)]), "junk.onnx", "not an ONNX")


def test_register_unreachable_store_is_one_line(exported: dict, monkeypatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    result = runner.invoke(app, ["register", str(exported["onnx"])])
    _one_line_error(result, url, "MLFLOW_TRACKING_URI")


# ------------------------------------------------------------------------ one-line errors


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["serve"], ["serve: error", "nothing to serve", "--meta"]),
        (["register"], ["mamlops register", "Missing argument 'onnx_model'"]),
        (["predict"], ["mamlops predict", "Missing argument"]),
        (["train"], ["mamlops train", "Missing argument 'setting'"]),
        (["--bogus"], ["No such option: --bogus"]),
        (["predict", "x.onnx", "a.png", "--top-k", "0"], ["--top-k"]),
        (["serve", "m.onnx", "--port", "abc"], ["--port"]),
    ],
)
def test_usage_errors_are_one_line(args: list[str], names: list[str]) -> None:
    """typer's usage errors: one line and exit 1, like every other user error."""
    _one_line_error(runner.invoke(app, args, prog_name="mamlops"), *names)


def test_bare_command_shows_help() -> None:
    result = runner.invoke(app, [])
    assert result.exit_code == 2  # typer's usual status for help instead of a command
    assert "Usage" in result.output and "predict" in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"mamlops {importlib.metadata.version('mamlops')}"


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["serve"], ["nothing to serve", "--meta"]),
        (["register"], ["Missing argument 'onnx_model'"]),
        (["train", "omniglot-5w1z"], ["'omniglot-5w1z'", "did you mean 'omniglot-5w1s'"]),
        (["predict", "x.onnx", "README.md"], ["x.onnx", "not found"]),
    ],
)
def test_entry_point_errors_are_one_line(args: list[str], names: list[str]) -> None:
    """The installed `mamlops` script, in the repository (its params.yaml and presets): one line
    on stderr, nothing on stdout, exit status 1."""
    mamlops = Path(sys.executable).parent / "mamlops"
    proc = subprocess.run(
        [str(mamlops), *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], lines
    for name in names:
        assert name in lines[0], (name, lines[0])


BAD_PARAMS = [  # (dotted key, value, what the one line must say): the cases of issue 12, item 5
    ("train.common.grad_clip", "high", "train.common.grad_clip must be a number, got 'high'"),
    ("train.common.log_every", 0, "train.common.log_every must be a positive integer, got 0"),
    ("train.common.seed", "abc", "train.common.seed must be an integer, got 'abc'"),
    ("train.common.device", 5, "train.common.device must be a string, got 5"),
    ("train.common.amp_bf16", "no", "train.common.amp_bf16 must be true or false, got 'no'"),
    ("train.common.meta_lr", float("nan"), "train.common.meta_lr must be a finite number"),
    ("evaluate.chekpoint", "best", "evaluate.chekpoint: unknown key; did you mean 'checkpoint'?"),
    ("export.checkpont", "best", "export.checkpont: unknown key; did you mean 'checkpoint'?"),
    ("export.opset", 7, "export.opset must be >= 18, got 7"),
    ("prepare.omniglot.rotation", True, "prepare.omniglot.rotation: unknown key; did you mean"),
    ("prepare.episodes.cuont", 5, "prepare.episodes.cuont: unknown key; did you mean 'count'?"),
    ("prepare.episodes.settings.1.shots", "5", "prepare.episodes.settings[1].shots must be an"),
    ("evalute.steps", 3, "unknown section(s) ['evalute']; did you mean 'evaluate'"),
]


@pytest.mark.parametrize(("key", "value", "says"), BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_params_are_one_line_naming_the_key(tmp_path, key: str, value, says: str) -> None:
    """A bad value or a typo anywhere in params.yaml stops any command before work starts, in
    one line that names the key (``train`` here: a typo in ``export`` must not cost a training)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "presets.yaml").write_text((REPO / "presets.yaml").read_text())
    result = runner.invoke(
        app, ["train", "omniglot-5w1s", "--params", str(tmp_path / "params.yaml")]
    )
    _one_line_error(result, says)


def test_check_is_the_preflight(tmp_path, monkeypatch) -> None:
    """`mamlops check` (make run's first line): valid repo params pass; a setting without a
    preset, or a tracking server that does not answer, is one line, in seconds."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ok = runner.invoke(app, ["check", "--params", str(REPO / "params.yaml")])
    assert ok.exit_code == 0 and "are valid; trains omniglot-5w1s" in ok.output, ok.output
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["settings"]["omniglot-5w1z"] = "omniglot"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "presets.yaml").write_text((REPO / "presets.yaml").read_text())
    typo = runner.invoke(app, ["check", "--params", str(tmp_path / "params.yaml")])
    _one_line_error(typo, "'omniglot-5w1z'", "did you mean 'omniglot-5w1s'")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    dead = runner.invoke(app, ["check", "--params", str(REPO / "params.yaml")])
    _one_line_error(dead, "does not answer")


def test_check_judges_the_presets_that_will_run(tmp_path, monkeypatch) -> None:
    """Issue 25 #6: ``processes: 16`` fits the trained omniglot-5w1s (meta_batch 32); the
    untrained omniglot-20w1s (meta_batch 8) does not matter until a run picks it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["common"]["processes"] = 16
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "presets.yaml").write_text((REPO / "presets.yaml").read_text())
    ok = runner.invoke(app, ["check", "--params", str(tmp_path / "params.yaml")])
    assert ok.exit_code == 0 and "trains omniglot-5w1s" in ok.output, ok.output
    picked = runner.invoke(
        app, ["train", "omniglot-20w1s", "--params", str(tmp_path / "params.yaml")]
    )
    _one_line_error(picked, "omniglot-20w1s", "meta_batch 8 does not split over 16")


def test_check_removes_the_temporary_files_a_killed_write_left(tmp_path, monkeypatch) -> None:
    """Issue 25 #8: kill -9 in the middle of a checkpoint write left a 0-byte
    ``.checkpoint.pt.*.tmp`` that DVC then tracked and pushed. A real process is killed inside
    ``atomic_write``; ``mamlops check`` removes its file, and only the files of dead writers."""
    import signal
    import socket
    import time

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("params.yaml", "presets.yaml"):
        (tmp_path / name).write_text((REPO / name).read_text())
    ck = tmp_path / "checkpoints" / "omniglot-5w1s"
    ready = tmp_path / "writing"
    writer = (
        "import sys, time; from pathlib import Path; from mamlops.files import atomic_write\n"
        "def write(tmp):\n    Path(sys.argv[2]).touch(); time.sleep(60)\n"
        "atomic_write(Path(sys.argv[1]) / 'checkpoint.pt', write)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(ck), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    (left,) = ck.glob(".checkpoint.pt.*.tmp")  # what the kill left, host and pid in its name
    assert f".{socket.gethostname()}-{proc.pid}-" in left.name
    plots = tmp_path / "plots" / "eval"
    plots.mkdir(parents=True)
    dead_plot = plots / f".omniglot-5w1s.csv.{socket.gethostname()}-{proc.pid}-x1.tmp"
    other_host = ck / f".checkpoint.pt.elsewhere-{proc.pid}-x3.tmp"  # young: may be starting
    for path in (dead_plot, other_host):
        path.write_bytes(b"")
    with atomic_written(ck / "theta.safetensors") as live:  # a live writer's, held by its lock
        result = runner.invoke(app, ["check", "--params", str(tmp_path / "params.yaml")])
        assert result.exit_code == 0, result.output
        assert "removed the temporary files of killed writes" in result.output
        assert not left.exists() and not dead_plot.exists()
        assert live.exists() and other_host.exists()


@contextlib.contextmanager
def atomic_written(path: Path) -> Iterator[Path]:
    """The temporary file of an ``atomic_write`` of ``path`` in progress in this process."""
    started, finish = threading.Event(), threading.Event()
    tmp: list[Path] = []

    def write(name: str) -> None:
        tmp.append(Path(name))
        started.set()
        finish.wait(60)

    thread = threading.Thread(target=atomic_write, args=(path, write))
    thread.start()
    started.wait(60)
    try:
        yield tmp[0]
    finally:
        finish.set()
        thread.join()


def test_params_that_are_not_utf8_are_one_line(tmp_path) -> None:
    """Issue 25 #7: a params.yaml saved in Latin-1 was a Rich traceback (UnicodeDecodeError)."""
    text = (REPO / "params.yaml").read_text() + "# r\u00e9glages\n"
    (tmp_path / "params.yaml").write_bytes(text.encode("latin-1"))
    result = runner.invoke(app, ["check", "--params", str(tmp_path / "params.yaml")])
    _one_line_error(result, str(tmp_path / "params.yaml"), "not UTF-8", "save it as UTF-8")


def test_check_reaches_a_tracking_server_behind_basic_auth(tmp_path, monkeypatch) -> None:
    """Issue 25 #5: ``http://user:password@host`` was resolved with the userinfo as the host
    name (``Name or service not known``); MLflow's client sends it as Basic auth, and so does
    the health check now. The password is never printed."""
    import base64
    import http.server
    import threading

    seen: list[str | None] = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            good = "Basic " + base64.b64encode(b"me:pa ss").decode()
            authorized = self.headers.get("Authorization") == good
            body = b"OK"
            if not authorized:
                self.send_response(401)
            elif self.path == "/health":
                self.send_response(200)
            else:  # the runs API of an empty server: `check` looks for runs left RUNNING
                self.send_response(404)
                body = b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "none"}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://me:pa%20ss@127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        ok = runner.invoke(app, ["check", "--params", str(REPO / "params.yaml")])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert ok.exit_code == 0, ok.output
    assert "tracking store http://***@127.0.0.1" in ok.output
    assert "pa ss" not in ok.output and "pa%20ss" not in ok.output
    assert seen and set(seen) == {"Basic " + base64.b64encode(b"me:pa ss").decode()}
    assert "could not look for" not in ok.output


def test_unknown_preset_names_the_known_ones(tmp_path) -> None:
    preset = yaml.safe_load((REPO / "presets.yaml").read_text())["omniglot-5w1s"]
    presets = {name: preset for name in ("omniglot-5w1s", "omniglot-20w5s")}
    params = tmp_path / "mine.yaml"
    params.write_text(yaml.safe_dump({"train": {"presets": presets, "common": {"meta_lr": 1e-3}}}))
    typo = runner.invoke(app, ["train", "omniglot-20w5", "--params", str(params)])
    _one_line_error(typo, "'omniglot-20w5'", "did you mean 'omniglot-20w5s'")
    unknown = runner.invoke(app, ["train", "nonexist-preset", "--params", str(params)])
    _one_line_error(unknown, "'nonexist-preset'", "omniglot-5w1s", "omniglot-20w5s")
    assert "did you mean" not in unknown.output


@pytest.mark.timeout(60)
def test_serve_errors_are_one_line(exported: dict, tmp_path) -> None:
    """Nothing is served: each mistake is caught before uvicorn starts."""
    onnx = str(exported["onnx"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = runner.invoke(app, ["serve", onnx, "--port", str(port)])
    _one_line_error(taken, f"127.0.0.1:{port}", "another --port")
    _one_line_error(runner.invoke(app, ["serve", onnx, "--port", "70000"]), "70000", "--port")
    _one_line_error(runner.invoke(app, ["serve", str(tmp_path)]), "no .onnx files")
    _one_line_error(runner.invoke(app, ["serve", onnx, "--max-upload-mb", "0"]), "--max-upload-mb")
    no_meta = runner.invoke(app, ["serve", "--meta", str(tmp_path / "theta.safetensors")])
    _one_line_error(no_meta, "theta.safetensors", "no meta-model here")
    _one_line_error(runner.invoke(app, ["serve", onnx, "--max-shots", "0"]), "--max-shots")
    _one_line_error(runner.invoke(app, ["serve", onnx, "--max-teaching", "0"]), "--max-teaching")


def test_predict_missing_image_is_one_line(exported: dict, tmp_path) -> None:
    for kind in ("safetensors", "onnx"):
        result = runner.invoke(app, ["predict", str(exported[kind]), str(tmp_path / "no.png")])
        _one_line_error(result, "no.png", "no such file")
        result = runner.invoke(app, ["predict", str(exported[kind]), str(tmp_path)])
        _one_line_error(result, str(tmp_path), "not a file")


def test_evaluate_folder_on_onnx_is_one_line(exported: dict, tmp_path) -> None:
    result = runner.invoke(app, ["evaluate-folder", str(exported["onnx"]), str(tmp_path)])
    _one_line_error(result, "clf.onnx", ".safetensors")


@pytest.mark.parametrize(
    ("option", "value", "phrase"),
    [("--alias", "bad alias!", "Invalid alias name"), ("--alias", "v3", "reserved"),
     ("--name", "a/b", "Invalid model name")],
)  # fmt: skip
def test_register_bad_names_are_one_line(exported: dict, option, value, phrase) -> None:
    result = runner.invoke(app, ["register", str(exported["onnx"]), option, value])
    _one_line_error(result, f"{option} {value!r}", phrase)


@pytest.mark.parametrize("uri", ["bogus://store", "/no/such/folder/mlruns"])
def test_register_unusable_store_is_one_line(exported: dict, monkeypatch, uri: str) -> None:
    """An unsupported URI, or MLflow's retired file store: MLflow raises before any request."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = runner.invoke(app, ["register", str(exported["onnx"])])
    _one_line_error(result, uri, "MLFLOW_TRACKING_URI")


# ------------------------------------------------------------------------ --json


def test_predict_json(exported: dict) -> None:
    """Both kinds of model: every image, its best label, all probabilities, the top k; the
    same labels from PyTorch and onnxruntime; JSON alone on stdout."""
    args = [str(p) for p in exported["images"]]
    answers = {}
    for kind in ("safetensors", "onnx"):
        result = runner.invoke(
            app, ["predict", str(exported[kind]), *args, "--top-k", "2", "--json"]
        )
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert out["model"] == str(exported[kind])
        assert [p["image"] for p in out["predictions"]] == args
        for p in out["predictions"]:
            probs = p["probabilities"]
            assert list(probs) == exported["labels"]
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
            ranked = sorted(probs, key=probs.get, reverse=True)
            assert [t["label"] for t in p["top_k"]] == ranked[:2]
            assert p["label"] == ranked[0] and p["probability"] == probs[ranked[0]]
        answers[kind] = out["predictions"]
    for a, b in zip(answers["safetensors"], answers["onnx"], strict=True):
        assert a["label"] == b["label"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_evaluate_folder_json(exported: dict, tmp_path) -> None:
    """The per-class report, checked against `predict --json` on the same images."""
    query, files = tmp_path / "query", []
    for path, label in zip(exported["all_images"], exported["truth"], strict=True):
        files.append(query / label / path.name)
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        files[-1].write_bytes(path.read_bytes())
    clf = str(exported["safetensors"])
    result = runner.invoke(app, ["evaluate-folder", clf, str(query), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["classifier"] == clf and out["n"] == len(exported["truth"])
    assert set(out["per_class"]) == set(exported["labels"])
    assert sum(row["n"] for row in out["per_class"].values()) == out["n"]
    assert out["accuracy"] == pytest.approx(out["correct"] / out["n"])

    pred = runner.invoke(app, ["predict", clf, *map(str, files), "--json"])
    labels = [p["label"] for p in json.loads(pred.stdout)["predictions"]]
    hits = [guess == truth for guess, truth in zip(labels, exported["truth"], strict=True)]
    assert out["correct"] == sum(hits)
    for label, row in out["per_class"].items():
        mine = [hit for hit, truth in zip(hits, exported["truth"], strict=True) if truth == label]
        assert (row["n"], row["correct"]) == (len(mine), sum(mine))


@pytest.mark.timeout(180)
def test_register_json(exported: dict, tmp_path, monkeypatch) -> None:
    """A real SQLite store: the JSON names the version the registry holds under the alias."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the run's artifacts land beside the store
    args = ["register", str(exported["onnx"]), "--name", "cli-json", "--alias", "prod", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {k: out[k] for k in ("name", "version", "alias", "model_uri")} == {
        "name": "cli-json",
        "version": 1,
        "alias": "prod",
        "model_uri": "models:/cli-json@prod",
    }
    held = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        "cli-json", "prod"
    )
    assert str(held.version) == "1" and held.run_id == out["run_id"]

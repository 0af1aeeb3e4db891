"""The typer CLI: every command documents itself; bad input exits non-zero with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, build_classifier, free_port
from typer.testing import CliRunner

from mamlops.cli import app

COMMANDS = [
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


def test_train_with_another_params_file(omniglot_prepared: Path, tmp_path, monkeypatch) -> None:
    """A preset that exists only in FILE trains, through the same library call as the stage."""
    tiny = {
        "dataset": "omniglot", "ways": 5, "shots": 1, "query": 2, "meta_batch": 2,
        "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 1, "meta_lr": 0.001,
        "iterations": 4, "val_every": 2, "val_episodes": 2, "checkpoint_every": 2,
        "log_every": 2, "device": "cpu",
    }  # fmt: skip
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"train": {"presets": {"only-here": tiny}}}))
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "omniglot").symlink_to(omniglot_prepared)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["train", "only-here", "--params", "mine.yaml"])
    assert result.exit_code == 0, result.output
    metrics = yaml.safe_load((tmp_path / "metrics" / "train" / "only-here.json").read_text())
    assert metrics["iterations"] == 4 and 0.0 <= metrics["best_val_acc"] <= 1.0
    assert (tmp_path / "models" / "only-here" / "theta_best.safetensors").is_file()
    missing = runner.invoke(app, ["train", "only-here"])  # no ./params.yaml: said so, one line
    _one_line_error(missing, "params.yaml", "--params")


# ------------------------------------------------------------------------ predict --top-k


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A classifier file, its ONNX export and query images written as PNG files."""
    from mamlops.export import export_onnx

    root = tmp_path_factory.mktemp("cli-model")
    clf, queries = build_classifier()
    clf.save(root / "clf.safetensors")
    export_onnx(clf, root / "clf.onnx")
    images = []
    for i, png in enumerate(queries[:3]):
        images.append(root / f"q{i}.png")
        images[-1].write_bytes(png)
    return {"safetensors": root / "clf.safetensors", "onnx": root / "clf.onnx", "images": images}


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

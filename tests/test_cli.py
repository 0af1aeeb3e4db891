"""The typer CLI: every command documents itself; bad input exits non-zero with a clear message."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mamlops.cli import app

COMMANDS = [
    "download",
    "verify",
    "prepare",
    "train",
    "evaluate",
    "adapt",
    "evaluate-folder",
    "predict",
    "export",
    "serve",
    "register",
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

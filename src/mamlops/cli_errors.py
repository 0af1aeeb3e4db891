"""How the ``mamlops`` command fails: one line on stderr and exit status 1, never a traceback
for something the user can fix.

Three sources of such failures, each turned into one line here so that ``cli`` holds only the
commands: a command's own errors and a missing optional extra (``command``), typer's usage
errors (``OneLineErrors``), and MLflow's rules and stores for ``register``
(``check_registry_names``, ``store_error``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import typer
from typer.core import TyperGroup

from mamlops.errors import UserError, reported

# the extra that provides each optional top-level module (pyproject.toml), for the hint a
# command gives when run in an install without it
PIPELINE_MODULES = "torch torchvision yaml dvc mlflow onnx safetensors matplotlib"
SERVE_MODULES = "onnxruntime fastapi starlette pydantic uvicorn multipart python_multipart"
EXTRA_OF_MODULE = {
    **dict.fromkeys(PIPELINE_MODULES.split(), "pipeline"),
    **dict.fromkeys(SERVE_MODULES.split(), "serve"),
}


def missing_extra(module: str | None) -> str | None:
    """The extra to install for a ``ModuleNotFoundError`` on ``module``; None when the module is
    not an optional dependency (then the error is a bug and keeps its traceback)."""
    return EXTRA_OF_MODULE.get((module or "").split(".")[0])


@contextlib.contextmanager
def command(prog: str) -> Iterator[None]:
    """``errors.reported`` plus one case: an optional dependency this command imports is not
    installed, which in a serving install is the normal state; name the extra that has it."""
    with reported(prog):
        try:
            yield
        except ModuleNotFoundError as exc:
            extra = missing_extra(exc.name)
            if extra is None:
                raise
            raise UserError(
                f"`mamlops {prog}` needs the {extra} extra ({exc.name} is not installed): "
                f"pip install 'mamlops[{extra}]'"
            ) from None


def usage_line(exc: typer.TyperException) -> str:
    """typer's usage errors (a missing argument, an unknown option, a bad value) as one line:
    ``mamlops serve: error: Missing argument 'model'; see 'mamlops serve --help'``."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "mamlops"
    format_message = getattr(exc, "format_message", lambda: str(exc))
    message = " ".join(format_message().split()).rstrip(".")
    return f"{where}: error: {message}; see '{where} --help'"


class OneLineErrors(TyperGroup):
    """typer's group, but a usage error is one line and exit status 1, like every other user
    error here, instead of typer's usage block and framed panel (exit status 2).

    typer 0.29 carries its own copy of click, whose exceptions all derive from the public
    ``typer.TyperException``; the ``click`` package is neither needed nor the right class.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `mamlops`: help was printed
                sys.exit(2)
            typer.echo(usage_line(exc), err=True)
            sys.exit(1)
        except typer.Abort:
            typer.echo("mamlops: aborted", err=True)
            sys.exit(1)
        # non-standalone, typer returns the status of an explicit Exit (--help, --version: 0)
        sys.exit(code if isinstance(code, int) else 0)


def check_registry_names(name: str, alias: str) -> None:
    """MLflow's own rules for model and alias names, checked before anything is logged (a bad
    alias found afterwards would leave a registered version without it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
        _validate_model_name,
    )

    checks = [
        ("--name", name, [_validate_model_name]),
        ("--alias", alias, [_validate_model_alias_name, _validate_model_alias_name_reserved]),
    ]
    for option, value, rules in checks:
        try:
            for rule in rules:
                rule(value)
        except MlflowException as exc:
            raise UserError(f"{option} {value!r}: {exc.message}") from None


def store_error(uri: str, exc: Exception) -> str:
    """One line for an MLflow store that cannot be used at all (an unsupported URI, the
    retired file store): the store, MLflow's first sentence, and the fix."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    first = text.split(". ")[0].rstrip(".")[:300]
    return (
        f"MLflow store {uri} cannot be used ({first}); point MLFLOW_TRACKING_URI at a database "
        "or server store, e.g. sqlite:///mlflow.db"
    )

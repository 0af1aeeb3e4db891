"""Errors a user can fix, and how every entry point reports them: one line, non-zero exit.

Each module raises its own subclass of ``UserError`` (``ParamsError``, ``DataError``,
``AdaptInputError``, ...) with a message that names the problem and the fix. DVC stage scripts
and the CLI wrap their one call in ``reported(...)``, so such an error prints that message and
exits 1 instead of a traceback; anything else is a bug and keeps its traceback.

No imports beyond the standard library: the torch-free serving path uses it too.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(ValueError):
    """Bad input (params, data, files, requests); the message says what is wrong and the fix."""


class DataError(UserError):
    """Downloaded, prepared or supplied data is missing, damaged or not the expected content."""


@contextlib.contextmanager
def reported(prog: str) -> Iterator[None]:
    """Turn a ``UserError`` (or a missing file) raised in the block into ``prog: error: ...``
    on stderr and exit status 1."""
    try:
        yield
    except (UserError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def stage_args(*names: str) -> list[str]:
    """The command-line arguments of a DVC stage script (``dvc.yaml`` writes them), exactly
    ``names`` of them, else its usage line and exit status 2."""
    args = sys.argv[1:]
    if len(args) != len(names):
        print(f"usage: python {sys.argv[0]} {' '.join(names)}", file=sys.stderr)
        raise SystemExit(2)
    return args

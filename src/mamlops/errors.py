"""Errors a user can fix, and how every entry point reports them: one line, non-zero exit.

Each module raises its own subclass of ``UserError`` (``ParamsError``, ``DataError``,
``AdaptInputError``, ...) with a message that names the problem and the fix. DVC stage scripts
and the CLI wrap their one call in ``reported(...)``, so such an error prints that message and
exits 1 instead of a traceback; anything else is a bug and keeps its traceback.

No imports beyond the standard library: the torch-free serving path uses it too.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path


class UserError(ValueError):
    """Bad input (params, data, files, requests); the message says what is wrong and the fix."""


class DataError(UserError):
    """Downloaded, prepared or supplied data is missing, damaged or not the expected content."""


class ParamsError(UserError):
    """A params.yaml key is missing or has a value that cannot work; the message says which.

    Here, not beside the schema (``schema.py``), because the data set modules
    (``datasets/``) check their own ``prepare.<name>`` keys and must not import the configs."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, ``dvc queue kill``) inside ``sigterm_as_interrupt``:
    a KeyboardInterrupt, so that the code a Ctrl-C unwinds (an MLflow run marked KILLED,
    temporary files removed) runs for it too."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Stopped`` in the main thread instead of ending the
    process on the spot. Elsewhere (another thread: no signal handlers there) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def reported(prog: str) -> Iterator[None]:
    """Turn a ``UserError`` (or a missing file) raised in the block into ``prog: error: ...``
    on stderr and exit status 1; a Ctrl-C or a SIGTERM into ``prog: stopped by ...`` and the
    shell's status for that signal (130, 143), not a 30-line traceback."""
    try:
        yield
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print(f"{prog}: stopped by {name}; outputs of earlier runs are kept", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    except (UserError, FileNotFoundError) as exc:
        _report(prog, exc)
    except OSError as exc:
        error = disk_error(exc)
        if error is None:
            raise
        _report(prog, error)


def _report(prog: str, exc: BaseException) -> None:
    """One line, always: a message quoting a library's multi-line text is flattened."""
    print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    raise SystemExit(1) from None


DISK_ERRORS = {  # errno -> what it means for the user: the machine's state, not a bug
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


def disk_error(exc: OSError, path: str | Path | None = None) -> UserError | None:
    """A one-line ``UserError`` for an ``OSError`` that the machine, not the code, caused (a full
    disk, a quota, a read-only or forbidden folder), naming the file; None for any other."""
    if exc.errno not in DISK_ERRORS:
        return None
    where = path or exc.filename or "a file"
    verb = "access" if exc.errno == errno.EACCES else "write"
    return UserError(
        f"cannot {verb} {where}: {DISK_ERRORS[exc.errno]}; earlier files are left as they were "
        "(outputs are written to a temporary file, then renamed). Free space or fix the "
        "folder's permissions, then rerun"
    )


def stage_args(*names: str) -> list[str]:
    """The command-line arguments of a DVC stage script (``dvc.yaml`` writes them), exactly
    ``names`` of them, else its usage line and exit status 2."""
    args = sys.argv[1:]
    if len(args) != len(names):
        print(f"usage: python {sys.argv[0]} {' '.join(names)}", file=sys.stderr)
        raise SystemExit(2)
    return args

"""Atomic file writes: every output goes to a temporary file beside its target, then a rename.

A crash, a kill or a full disk mid-write then leaves the earlier file intact rather than a
half-written one that DVC would hash and later stages would trust. Whole folders (the
downloaded data set, the prepared data, a taught classifier) are built in a work folder beside
their target (``work_dir``).

What a killed process left is told by a lock, not by a name: the writer holds an exclusive
``flock`` on each temporary file and work folder from the moment it exists until it is renamed
or removed, and the kernel drops the lock when the process dies, ``kill -9`` included. So
``sweep_abandoned`` and ``sweep_temporaries`` remove what nobody holds. The name (host and pid)
is the fallback for what the lock cannot tell: a file system without locks, and the instant
between creating a folder and locking it. Names alone failed in containers: a restarted
container has a new host name (the old one's leftovers looked like another machine's, kept
forever) and often the same pid (a dead writer looked alive).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from mamlops.errors import UserError, disk_error

# the renames ``written_together`` holds back until its block ends (None: rename at once), each
# with the descriptor that holds its temporary file's lock
_Pending = list[tuple[str, Path, int]]
_PENDING: ContextVar[_Pending | None] = ContextVar("mamlops_pending", default=None)
# held while a temporary file or work folder is created and locked, and while this process
# sweeps: a sweep in another thread must not find one of ours in the instant before its lock
_CREATING = threading.Lock()
# an unlocked leftover named for a live process is removed once it is this old (seconds): the
# name's pid was reused, or its host is a container that no longer exists
UNLOCKED_GRACE_S = 60.0


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path`` (same folder, so the rename is atomic);
    the temporary file is removed if ``write`` fails, and locked until then (module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name (e.g. {path}/<name>)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # host and pid in the name: the fallback when the lock cannot tell (module docstring)
        prefix = f".{path.name}.{_owner()}-"
        with _CREATING:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
            _lock(fd)
    except OSError as exc:
        raise disk_error(exc, path) or exc from None
    pending = _PENDING.get()
    handed = False  # to written_together, which renames and closes it as its block ends
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        write(tmp)
        if pending is not None:
            pending.append((tmp, path, fd))
            handed = True
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and (error := disk_error(exc, path)):
            raise error from None
        raise
    finally:
        if not handed:
            os.close(fd)
    return path


@contextlib.contextmanager
def written_together() -> Iterator[None]:
    """The files ``atomic_write`` writes inside the block replace their targets together, as
    the block ends, or none of them if it fails.

    Why: a stage's outputs describe one run (evaluate's metrics, results, CSV and episode PNG;
    the two theta files). Written one by one, a kill between two of them left a new metrics
    file beside an old picture. Here all the work, and any failure, comes before the first
    rename; the renames follow one another in microseconds. A ``kill -9`` inside the block
    leaves temporary files, named for ``sweep_temporaries``, and the earlier outputs whole.
    Files read back inside the block are still the earlier ones: log them after it.
    """
    pending: _Pending = []
    token = _PENDING.set(pending)
    try:
        try:
            yield
        except BaseException:
            for tmp, _, _ in pending:
                Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            _PENDING.reset(token)
        for i, (tmp, path, _) in enumerate(pending):
            try:
                os.replace(tmp, path)
            except OSError as exc:
                for rest, _, _ in pending[i:]:
                    Path(rest).unlink(missing_ok=True)
                raise disk_error(exc, path) or exc from None
    finally:
        for _, _, fd in pending:
            os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks: identifies a theta file or a meta-model."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(paths: Iterable[Path], root: Path) -> str:
    """SHA-256 over the files' names relative to ``root`` and their contents, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).relative_to(root).as_posix().encode() + b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def folder_digest(folder: str | Path) -> str:
    """``files_digest`` of every file under ``folder`` (when DVC has no hash for it)."""
    folder = Path(folder)
    return files_digest(sorted(p for p in folder.rglob("*") if p.is_file()), folder)


@contextlib.contextmanager
def work_dir(dest: str | Path, kind: str = "tmp") -> Iterator[Path]:
    """A new empty folder beside ``dest``, ``.<name>-<kind>-<host>-<pid>-<random>``, locked
    while the block runs; whatever is still at that name when the block ends is removed.

    Rename the finished work out of it (or into ``dest``) inside the block. What a ``kill -9``
    leaves is unlocked, and ``sweep_abandoned`` removes it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}-{kind}-{_owner()}-"
    with _CREATING:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        _lock(fd)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def sweep_abandoned(dest: str | Path, kinds: tuple[str, ...] = ("tmp", "old")) -> list[Path]:
    """Remove the ``work_dir`` folders beside ``dest`` that no process holds (module
    docstring); folders of unknown naming are left alone. Returns what was removed."""
    dest, removed = Path(dest), []
    for kind in kinds:
        prefix = f".{dest.name}-{kind}-"
        for path in sorted(dest.parent.glob(prefix + "*")):
            # host-pid-suffix: a host name may contain dashes, the pid and mkdtemp's suffix do not
            parts = path.name[len(prefix) :].rsplit("-", 2)
            if len(parts) == 3 and path.is_dir() and _abandoned(path, *parts[:2], shutil.rmtree):
                removed.append(path)
    return removed


def sweep_temporaries(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Remove the temporary files of ``atomic_write`` that a killed process left in ``folder``.

    ``kill -9`` in the middle of a write leaves ``.<name>.<host>-<pid>-<random>.tmp`` (a
    checkpoint's, often 0 bytes); inside a DVC output DVC would track and push it. Removed when
    no process holds it, as in ``sweep_abandoned``. Returns what was removed.
    """
    folder, removed, host = Path(folder), [], socket.gethostname()
    if not folder.is_dir():
        return removed
    for path in sorted((folder.rglob if recursive else folder.glob)(".*.tmp")):
        # .<name>.<host>-<pid>-<random>: only this host's name is known to end the head
        parts = path.name.removesuffix(".tmp").rsplit("-", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not path.is_file():
            continue
        owner = host if parts[0].endswith(f".{host}") else ""
        if _abandoned(path, owner, parts[1], lambda p: p.unlink(missing_ok=True)):
            removed.append(path)
    return removed


def _abandoned(path: Path, host: str, pid: str, remove: Callable[[Path], Any]) -> bool:
    """Remove ``path`` (a work folder or temporary file whose name gives ``host`` and ``pid``)
    with ``remove`` when no process holds it; whether it was removed.

    Locked: a live writer's. Unlocked: its writer died, unless it is in the instant between
    creating and locking, which only a young file of a live pid of this host (not this very
    process: ours are created under ``_CREATING``) can be. Where the file system has no locks,
    the name alone decides: removed when it names a process of this host that no longer runs.
    """
    with _CREATING:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False  # gone meanwhile, or not ours to read
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live writer holds it
            except OSError:  # no locks here (some network file systems)
                if not _owner_gone(host, pid):
                    return False
            else:
                mine = host == socket.gethostname()
                other = mine and pid.isdigit() and int(pid) != os.getpid()
                live = other and process_alive(int(pid))
                young = time.time() - os.stat(fd).st_mtime < UNLOCKED_GRACE_S
                if young and (live or not mine):
                    return False  # its writer may be between creating and locking it
            remove(path)
            return True
        finally:
            os.close(fd)


def _lock(fd: int) -> None:
    """Hold an exclusive lock on ``fd`` until it is closed (or the process dies); a file system
    without locks leaves the name to tell (``_abandoned``)."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _owner() -> str:
    """``<host>-<pid>``: whose work folder or temporary file a name says it is."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _owner_gone(host: str, pid: str) -> bool:
    """Whether the owner a name gives is a process of this host that no longer runs; False
    for another host's (a shared file system) and for a pid that is not a number."""
    return host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie (killed, not yet reaped by its parent) does not: it will
    never touch its work folder again."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def release_dead_dvc_locks(root: str | Path = ".") -> list[int]:
    """Drop the entries of processes that no longer run from DVC's ``.dvc/tmp/rwlock``; the
    pids dropped.

    ``kill -9`` of ``dvc repro`` leaves its pid in that file, and every later ``dvc repro`` then
    refuses to run ("If there are no processes with such PIDs, you can manually remove ...").
    ``mamlops check`` (make run's first step) does that removal, for dead processes only (zombies
    count as dead; a reused pid counts as alive, which is the safe side). Pids are this host's:
    a repository shared between machines must not run it while another machine runs DVC.
    """
    path = Path(root) / ".dvc" / "tmp" / "rwlock"
    if not path.is_file():
        return []
    with open(path.with_name("rwlock.lock"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # what DVC holds while it edits the file
        try:
            locks = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            return []
        dropped: set[int] = set()

        def alive(entry: dict) -> bool:
            pid = int(entry.get("pid", 0))
            if process_alive(pid):
                return True
            dropped.add(pid)
            return False

        writes = {k: v for k, v in locks.get("write", {}).items() if alive(v)}
        reads = {k: [e for e in v if alive(e)] for k, v in locks.get("read", {}).items()}
        if dropped:
            write_json(path, {"write": writes, "read": {k: v for k, v in reads.items() if v}})
        return sorted(dropped)


def write_safetensors(
    path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> Path:
    """``tensors`` (torch) as safetensors, atomically, and byte-identical for identical input.

    The safetensors writer serialises ``metadata`` from a Rust HashMap, so its key order (and
    with it the file's md5, which DVC tracks) changes from process to process. The header is
    re-serialised here with sorted keys; tensor data and offsets are untouched.
    """
    from safetensors.torch import save

    _check_finite(tensors, path, UserError)
    blob = save(tensors, metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    data = len(text).to_bytes(8, "little") + text + blob[8 + size :]
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def read_safetensors(
    path: str | Path, error: type[Exception] = ValueError
) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file in one read; ``error(message)`` when it is
    missing or not safetensors. Never unpickles: the format holds tensors and strings only."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors, metadata = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path}: not a safetensors file ({exc})") from None
    _check_finite(tensors, path, error)
    return tensors, metadata


def _check_finite(tensors: dict[str, Any], path: str | Path, error: type[Exception]) -> None:
    """Weights with NaN or inf (a diverged run, ``adapt --lr 1e30``) are refused where they are
    saved and where they are loaded: a classifier of NaNs would answer every request wrongly."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise error(
                f"{path}: tensor {name!r} holds NaN or inf values (diverged weights); retrain "
                "or adapt with a smaller learning rate"
            )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

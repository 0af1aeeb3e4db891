"""Atomic writes: the earlier file survives a failed write; outputs get normal permissions."""

from __future__ import annotations

import pytest


def test_atomic_write_keeps_old_file_on_failure_and_normal_permissions(tmp_path) -> None:
    from mamlops.files import atomic_write, write_json

    target = write_json(tmp_path / "m.json", {"a": 1})
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_current_umask())

    def boom(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_written_together_replaces_all_or_none(tmp_path) -> None:
    """A stage's outputs replace the earlier run's as a group: a failure anywhere in the block
    (here while the third file is written) leaves all the earlier files and no temporaries; a
    block that ends renames them all, and files written outside a block land at once."""
    from mamlops.files import atomic_write, write_text, written_together

    names = ("metrics.json", "results.json", "grid.png")
    for name in names:
        write_text(tmp_path / name, f"earlier {name}")

    def fail(tmp: str) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), written_together():
        write_text(tmp_path / names[0], "new")
        write_text(tmp_path / names[1], "new")
        assert (tmp_path / names[0]).read_text() == f"earlier {names[0]}"  # held back
        atomic_write(tmp_path / names[2], fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert [(tmp_path / n).read_text() for n in names] == [f"earlier {n}" for n in names]

    with written_together():
        for name in names:
            write_text(tmp_path / name, f"new {name}")
    assert [(tmp_path / n).read_text() for n in names] == [f"new {n}" for n in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    write_text(tmp_path / names[0], "at once")
    assert (tmp_path / names[0]).read_text() == "at once"


def _current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


WRITE_THETA = """
import sys, torch
from mamlops.files import write_safetensors
tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.float64)}
meta = {k: str(i) for i, k in enumerate(["zeta", "alpha", "mid", "beta", "omega", "kappa"])}
write_safetensors(sys.argv[1], tensors, meta)
"""


def test_write_safetensors_is_byte_identical_across_processes(tmp_path) -> None:
    """The safetensors writer orders metadata keys by a per-process random hash; ours sorts
    them, so identical runs give identical files (and identical DVC hashes)."""
    import subprocess
    import sys

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    paths = [tmp_path / f"t{i}.safetensors" for i in range(4)]
    for p in paths:  # one process each: the hash seed differs per process
        subprocess.run([sys.executable, "-c", WRITE_THETA, str(p)], check=True)
    blobs = {p.read_bytes() for p in paths}
    assert len(blobs) == 1
    loaded = load_file(paths[0])
    assert torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))
    assert loaded["b"].dtype == torch.float64 and torch.equal(loaded["b"], torch.ones(3).double())
    with safe_open(str(paths[0]), framework="pt") as f:
        assert f.metadata() == {
            "zeta": "0",
            "alpha": "1",
            "mid": "2",
            "beta": "3",
            "omega": "4",
            "kappa": "5",
        }
    header_size = int.from_bytes(paths[0].read_bytes()[:8], "little")
    assert header_size % 8 == 0


def test_a_zombie_process_counts_as_gone(tmp_path) -> None:
    """kill -9 of a stage whose parent has not reaped it yet leaves a zombie: its work folder is
    abandoned all the same (it used to be kept as 'alive' for as long as the parent lived)."""
    import os
    import socket
    import subprocess
    import time
    from pathlib import Path

    from mamlops.files import process_alive, sweep_abandoned

    child = subprocess.Popen(["sleep", "60"])
    try:
        assert process_alive(child.pid)
        os.kill(child.pid, 9)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        assert not process_alive(child.pid)  # a zombie: not reaped, but gone
        dest = tmp_path / "omniglot"
        work = tmp_path / f".omniglot-tmp-{socket.gethostname()}-{child.pid}-x1"
        (work / "half").mkdir(parents=True)
        assert sweep_abandoned(dest) == [work] and not work.exists()
    finally:
        child.wait()


def test_prepare_sweeps_what_a_killed_prepare_left(tmp_path) -> None:
    """prepare's work folders carry host and pid too, so a later prepare removes those of dead
    processes (they used to stay forever) and never those of live ones."""
    import socket
    import subprocess
    import sys

    from mamlops.data.prepare import staged_dir
    from mamlops.files import work_dir

    dead = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    host = socket.gethostname()
    out = tmp_path / "prepared"
    left = [tmp_path / f".prepared-{kind}-{host}-{dead}-zz" for kind in ("tmp", "old")]
    for path in left:
        path.mkdir()
    with work_dir(out) as live:  # a live prepare's, held by its lock
        with staged_dir(out) as tmp:
            (tmp / "a.txt").write_text("new")
        assert (out / "a.txt").read_text() == "new"
        assert not any(p.exists() for p in left) and live.exists()
        with staged_dir(out) as tmp:  # replacing an existing folder leaves no .old- folder
            (tmp / "a.txt").write_text("newer")
        assert (out / "a.txt").read_text() == "newer"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["prepared", live.name])
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


def test_writing_onto_a_folder_names_it(tmp_path) -> None:
    """`export --out <folder>` used to end in IsADirectoryError's traceback."""
    from mamlops.errors import UserError
    from mamlops.files import write_json

    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="out is a folder; give a file name"):
        write_json(tmp_path / "out", {"a": 1})
    assert list((tmp_path / "out").iterdir()) == []


def test_dead_processes_lose_their_dvc_locks(tmp_path) -> None:
    """kill -9 of `dvc repro` leaves its pid in .dvc/tmp/rwlock and blocks every later repro;
    the entries of dead processes go, those of live ones stay."""
    import json
    import os
    import subprocess

    from mamlops.files import release_dead_dvc_locks

    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid runs nothing now
    live, dead = {"pid": os.getpid(), "cmd": "dvc repro"}, {"pid": gone.pid, "cmd": "dvc repro"}
    lock = tmp_path / ".dvc" / "tmp" / "rwlock"
    lock.parent.mkdir(parents=True)
    lock.write_text(
        json.dumps({"write": {"a": dead, "b": live}, "read": {"a": [dead], "c": [dead, live]}})
    )
    assert release_dead_dvc_locks(tmp_path) == [gone.pid]
    assert json.loads(lock.read_text()) == {"write": {"b": live}, "read": {"c": [live]}}
    assert release_dead_dvc_locks(tmp_path) == []
    assert release_dead_dvc_locks(tmp_path / "elsewhere") == []


def test_a_leftover_is_told_by_its_writers_lock_not_its_name(tmp_path) -> None:
    """A restarted container has a new host name and often the same pid: names alone kept its
    predecessor's leftovers forever (another host's) or took a dead writer for a live one (its
    pid reused). The writer's lock tells: a killed writer's work folder and temporary file are
    swept whatever their names say, a live writer's are kept whatever theirs say."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from mamlops.files import UNLOCKED_GRACE_S, sweep_abandoned, sweep_temporaries, work_dir

    dest = tmp_path / "store"
    writer = (
        "import sys, time; from pathlib import Path; from mamlops.files import atomic_write, "
        "work_dir\n"
        "with work_dir(sys.argv[1]) as w:\n"
        "    atomic_write(Path(sys.argv[1]).parent / 'ckpt.pt', lambda t: (print(w, t, "
        "flush=True), time.sleep(60)))\n"
    )

    def start() -> tuple[subprocess.Popen, Path, Path]:
        proc = subprocess.Popen(
            [sys.executable, "-c", writer, str(dest)], stdout=subprocess.PIPE, text=True
        )
        folder, tmp = proc.stdout.readline().split()
        return proc, Path(folder), Path(tmp)

    def rename(path: Path, owner: str) -> Path:
        """``path`` under the name another writer would have given it (host-pid)."""
        head, _, rest = path.name.partition(f"{socket.gethostname()}-")
        return path.rename(path.with_name(head + owner + "-" + rest.split("-", 1)[1]))

    old = time.time() - 2 * UNLOCKED_GRACE_S
    killed, held = start(), start()
    try:
        killed[0].send_signal(signal.SIGKILL)
        killed[0].wait()
        left = [
            rename(killed[1], f"{socket.gethostname()}-{os.getpid()}"),  # its pid is ours now
            rename(killed[2], "old-container-1f3a-1"),  # a container that no longer exists
        ]
        for path in left:
            os.utime(path, (old, old))
        kept = [rename(held[1], "node-b-7"), rename(held[2], f"{socket.gethostname()}-1")]
        for path in kept:
            os.utime(path, (old, old))
        assert sweep_abandoned(dest) == [left[0]]
        assert sweep_temporaries(tmp_path) == [left[1]]
        assert all(p.exists() for p in kept)
    finally:
        held[0].kill()
        held[0].wait()
    assert sweep_abandoned(dest) == [kept[0]] and sweep_temporaries(tmp_path) == [kept[1]]
    # a writer that ends leaves nothing and holds no descriptor
    from mamlops.files import write_text

    before = len(os.listdir("/proc/self/fd"))
    with work_dir(dest) as folder:
        write_text(folder / "x.txt", "x")
    assert not folder.exists() and len(os.listdir("/proc/self/fd")) == before

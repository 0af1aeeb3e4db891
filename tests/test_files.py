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


def _current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask

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

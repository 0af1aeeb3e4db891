"""What runs this process: the torch device a config asks for, and one line describing it.

Apart from the configs (``config.py``), which must not import torch: the prepare and download
stages read the configs, and torch is imported here only when a function is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mamlops.errors import ParamsError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; asking for CUDA without it is a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"device {name!r} asked for, but CUDA is not available; use auto or cpu")
    return torch.device(name)


def hardware(device: str | torch.device | None = None) -> str:
    """One line on what runs this process (CPU model, cores and threads, or GPU; torch), for
    the results table and MLflow tags."""
    import os
    import platform

    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(dev)}, torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    return (
        f"CPU {name} ({cores} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"
    )

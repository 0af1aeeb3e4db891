"""mamlops: MAML few-shot image classification as a DVC + MLflow pipeline, served through ONNX.

Importing the package imports nothing heavy: the serving path (``onnx_predict``, ``serve``) must
run without torch.
"""

from __future__ import annotations

import importlib.metadata


def version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written);
    "unknown" when the package runs from a source tree that was never installed."""
    try:
        return importlib.metadata.version("mamlops")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def __getattr__(name: str) -> str:
    """``mamlops.__version__``, looked up only when asked for (not on every import)."""
    if name == "__version__":
        return version()
    raise AttributeError(f"module 'mamlops' has no attribute {name!r}")

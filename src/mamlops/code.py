"""The package's own import graph, read from the source (``ast``), never by importing it.

Two things depend on which modules a piece of code runs: a DVC stage must list every module its
script imports (or ``dvc repro`` reuses a stale output, ``tests/test_layout.py``), and a training
checkpoint may be resumed only by the code that wrote it (``checkpoint.resume_key``). Both take
the closure computed here, so neither is a hand-kept list that can miss a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# modules that cannot change an output: atomic writes, one-line error reporting, MLflow logging,
# glibc malloc settings, URL credentials, and this walk (it decides whether a run resumes, and a
# resumed run ends where an uninterrupted one does)
NO_OUTPUT_EFFECT = frozenset({"files", "errors", "tracking", "mlflow_ui", "malloc", "urls", "code"})


def module_name(path: Path) -> str:
    """``src/mamlops/data/episodes.py`` -> ``data.episodes`` (the name below ``mamlops``)."""
    rel = Path(path).resolve().relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def module_path(name: str) -> Path | None:
    """The file of package module ``name`` (``data.episodes``; a subpackage's ``__init__.py``),
    None for a name that is not a module of this package."""
    path = PACKAGE.joinpath(*name.split("."))
    for file in (path.with_suffix(".py"), path / "__init__.py"):
        if file.is_file():
            return file
    return None


def imported_modules(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports anywhere in it, inside functions included
    (absolute imports, and relative ones of a file inside the package)."""
    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = Path(path).name == "__init__.py"  # its own package is level 1
                here = module_name(path).split(".")[: -node.level + package or None]
                base = ".".join(["mamlops", *here, *([base] if base else [])])
            # ``from mamlops.meta import train`` runs meta/train.py; ``from mamlops.datasets
            # import get`` runs datasets/__init__.py: the module named, else its package
            names = [
                f"{base}.{a.name}" if _inside(f"{base}.{a.name}") else base for a in node.names
            ]
        else:
            continue
        for name in names:
            if _inside(name):
                found.add(name.split(".", 1)[1])
    return found


def _inside(name: str) -> bool:
    """Whether dotted ``name`` (``mamlops.data.episodes``) is a module of this package."""
    parts = name.split(".")
    return parts[0] == "mamlops" and len(parts) > 1 and module_path(".".join(parts[1:])) is not None


def import_closure(path: Path) -> set[str]:
    """Every package module that running ``path`` can import, transitively."""
    todo, seen = list(imported_modules(path)), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_modules(module_path(name)))
    return seen


def output_code(path: Path) -> list[Path]:
    """The files of the code that decides what running ``path`` (a package module or a script)
    writes: its import closure, itself included, less ``NO_OUTPUT_EFFECT``; sorted."""
    names = import_closure(path) - NO_OUTPUT_EFFECT
    files = {module_path(n) for n in names}
    if Path(path).resolve().is_relative_to(PACKAGE):
        files.add(Path(path).resolve())
    return sorted(files)

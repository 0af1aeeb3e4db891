"""dvc.yaml cannot drift from the code: each stage depends on exactly the modules it imports,
and passes the paths the CLI uses by default (``layout.Layout``).

A stage whose deps miss a module it imports is silently reused by ``dvc repro`` after that
module changed (stale outputs); so each stage's deps must list every module of
``src/mamlops`` in the transitive import closure of its script, imports inside functions
included. Modules that cannot change an output are left out on purpose (``NO_OUTPUT_EFFECT``);
listing a module the stage does not import is an error too (needless re-runs).

The package's layers (docs/design.md) are folders, and the imports must respect them: base
modules at the top level, then ``data/``, ``meta/``, ``classifier/``, ``serving/``, and the
entry points; a module imports its own layer or those below, with no cycle, and no module grows
past one idea's size.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from mamlops import code
from mamlops.layout import Layout

PKG = REPO / "src" / "mamlops"
STAGES = ("download", "prepare", "train", "evaluate", "export")
# the walk is the library's own (mamlops.code), the one that also keys checkpoint resumption
imported_modules, closure = code.imported_modules, code.import_closure
NO_OUTPUT_EFFECT = code.NO_OUTPUT_EFFECT


def stage(name: str, dvc: dict | None = None) -> dict:
    spec = (dvc or yaml.safe_load((REPO / "dvc.yaml").read_text()))["stages"][name]
    return spec.get("do", spec)


def listed_modules(deps: list[str]) -> set[str]:
    prefix = "src/mamlops/"
    return {
        d[len(prefix) : -3].removesuffix("/__init__").replace("/", ".")
        for d in deps
        if d.startswith(prefix) and d.endswith(".py")
    }


@pytest.mark.parametrize("name", STAGES)
def test_deps_are_the_import_closure(name: str) -> None:
    spec = stage(name)
    script = f"pipeline/{name}.py"
    assert script in spec["deps"], f"{name}: its own script is not a dep"
    want = closure(REPO / script) - NO_OUTPUT_EFFECT
    got = listed_modules(spec["deps"])
    assert want - got == set(), f"dvc.yaml stage {name} misses deps on {sorted(want - got)}"
    assert got - want == set(), f"dvc.yaml stage {name} lists unused {sorted(got - want)}"


def test_the_check_catches_a_removed_dep() -> None:
    """Take an import's dep out of dvc.yaml, as a careless edit would: the check must fail."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    spec = stage("export", dvc)
    spec["deps"].remove("src/mamlops/meta/maml.py")  # export adapts with maml.adapt_detached
    want = closure(REPO / "pipeline/export.py") - NO_OUTPUT_EFFECT
    assert "meta.maml" in want - listed_modules(spec["deps"])


def test_closure_follows_imports_inside_functions(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from mamlops.classifier.registry import register_if_best\n")
    assert {"classifier.registry", "tracking", "errors"} <= closure(script)


def _cmd_args(name: str, key: str, item: str) -> list[str]:
    cmd = stage(name)["cmd"].replace("${key}", key).replace("${item}", item)
    return shlex.split(cmd)[2:]  # after `python pipeline/<name>.py`


def test_command_lines_use_the_cli_paths() -> None:
    """The stage scripts get their paths from dvc.yaml; the CLI's defaults must be the same."""
    lay, s, d = Layout(), "my-setting", "omniglot"
    assert _cmd_args("download", s, d) == [str(lay.raw_omniglot)]
    assert _cmd_args("prepare", s, d) == [d, str(lay.raw_omniglot), str(lay.prepared(d))]
    assert _cmd_args("train", s, d) == [s, *map(str, lay.train_paths(s, d))]
    assert _cmd_args("evaluate", s, d) == [s, *map(str, lay.evaluate_paths(s, d))]
    assert _cmd_args("export", s, d) == [s, *map(str, lay.export_paths(s, d))]


# ----------------------------------------------------------------------------- layers

# bottom up: a module may import its own layer and the ones below it, never one above
LAYERS = ("base", "data", "meta", "classifier", "serving", "entry")
BASE = {
    "config",
    "schema",
    "params",
    "hardware",
    "layout",
    "datasets",
    "errors",
    "files",
    "urls",
    "malloc",
    "tracking",
    "mlflow_ui",
    "code",
}
ENTRY = {"cli", "report", "__main__", "__init__"}
MAX_LINES = 450  # one idea per module; past this a module holds two


def layer(name: str) -> str:
    """``data.episodes`` -> ``data``; a top-level module is base or an entry point."""
    head = name.split(".")[0]
    if head in LAYERS:
        return head
    if head in ENTRY or head.startswith("cli"):
        return "entry"
    assert head in BASE, f"src/mamlops/{head}: a new top-level module; give it a layer here"
    return "base"


def modules() -> dict[str, Path]:
    return {code.module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def upward_imports(found: dict[str, Path]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(
        f"{name} ({layer(name)}) imports {dep} ({layer(dep)})"
        for name, path in found.items()
        for dep in imported_modules(path)
        if rank[layer(dep)] > rank[layer(name)]
    )


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert upward_imports(modules()) == []


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "episodes.py"
    bad.write_text("def f():\n    from mamlops.serving import serve\n")
    assert upward_imports({"data.episodes": bad})


def test_the_import_graph_has_no_cycle() -> None:
    graph = {name: imported_modules(path) - {name} for name, path in modules().items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for dep in graph.get(name, ()):
                visit(dep, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_no_module_is_over_the_size_of_one_idea() -> None:
    sizes = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}

"""The package's structure, read from the source with ``ast`` (nothing is imported): the import
graph of every module under src/ (module-level and function-level imports of crf_rnn_3d.*)
has no cycle and follows the layering, and the framework-free C++ has no TensorFlow include.

Packages and files are discovered from the folders, so moved or added files are checked too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "crf_rnn_3d"  # the import name of src/ (setup.py's package_dir)

# What each subpackage may import (besides the root module crf_rnn_3d, which holds constants).
# Data: datasets -> experiments. Computation: lattice_op -> crf -> models -> experiments.
# benchmarks (shared benchmark pieces) sits beside experiments: nothing else imports either.
BELOW_EXPERIMENTS = {"datasets", "lattice_op", "crf", "models"}
ALLOWED = {
    "datasets": {"datasets"},
    "lattice_op": {"lattice_op"},
    "crf": {"crf", "lattice_op"},
    "models": {"models", "crf", "lattice_op"},
    "experiments": {"experiments", *BELOW_EXPERIMENTS},
    "benchmarks": {"benchmarks", *BELOW_EXPERIMENTS},
}
TF_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]tensorflow/', re.MULTILINE)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([ROOT, *parts])


def discover_modules() -> dict[str, Path]:
    """Every module under src/ that belongs to a package (folders with an __init__.py)."""
    modules = {}
    for path in sorted(SRC.rglob("*.py")):
        if all((folder / "__init__.py").is_file() for folder in [path.parent, *_parents(path)]):
            modules[module_name(path)] = path
    return modules


def _parents(path: Path) -> list[Path]:
    return [p for p in path.parent.parents if p.is_relative_to(SRC)]


def imported_names(source: str, name: str, is_package: bool) -> set[str]:
    """Every crf_rnn_3d.* name that module ``name`` (its ``source``) imports, anywhere in the
    file (functions too), relative imports resolved; ``from a import b`` gives ``a.b`` (``a`` for
    ``*``)."""
    tree = ast.parse(source, filename=name)
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            found.update(
                source if alias.name == "*" else f"{source}.{alias.name}" for alias in node.names
            )
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return {n for n in found if n == ROOT or n.startswith(ROOT + ".")}


def resolve(imported: str, modules: dict[str, Path]) -> str | None:
    """The module an imported name lives in: itself when it is a module (``from crf_rnn_3d.crf
    import functional``), else the closest enclosing one (a class in ``from crf_rnn_3d.crf import
    CrfRnn`` is an import of the package crf_rnn_3d.crf). A parent package's own initialisation
    is not counted as a dependency of its submodules' imports."""
    target = imported
    while target not in modules and "." in target:
        target = target.rpartition(".")[0]
    return target if target in modules else None


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of src/ it imports."""
    modules = discover_modules()
    graph = {}
    for name, path in modules.items():
        targets = {
            resolve(i, modules)
            for i in imported_names(path.read_text(), name, path.name == "__init__.py")
        }
        graph[name] = targets - {None, name}
    return graph


def subpackage(module: str) -> str | None:
    """``datasets`` for crf_rnn_3d.datasets.io; None for the root module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first == last) or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# ------------------------------------------------------------------------------ the checks


def test_the_graph_sees_every_kind_of_import():
    """The reader itself: module- and function-level, absolute and relative, from-imports of
    names and of modules (a check of the checker, on the real files)."""
    graph = import_graph()
    assert f"{ROOT}.experiments.train" in graph and f"{ROOT}.datasets.io" in graph
    # module level, a submodule named in `from package import module`
    assert f"{ROOT}.crf.functional" in graph[f"{ROOT}.crf.layer"]
    # a class imported from a package's __init__ counts as the package
    assert f"{ROOT}.crf" in graph[f"{ROOT}.models.vnet"]
    # function level (inside common.manifest_shape_and_spacing)
    assert f"{ROOT}.datasets.tfdata" in graph[f"{ROOT}.experiments.common"]
    source = "def f():\n    from . import errors\n    from .io import Volume\n"
    names = imported_names(source, f"{ROOT}.datasets.probe", False)
    modules = discover_modules()
    assert {resolve(n, modules) for n in names} == {
        f"{ROOT}.datasets.errors",
        f"{ROOT}.datasets.io",
    }
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(cyclic) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layering():
    graph = import_graph()
    packages = {subpackage(m) for m in graph} - {None, "configs"}
    unknown = packages - set(ALLOWED)
    assert not unknown, f"new subpackage(s) {sorted(unknown)}: give them a place in ALLOWED"
    wrong = []
    for module, targets in sorted(graph.items()):
        own = subpackage(module)
        for target in sorted(targets):
            theirs = subpackage(target)
            if own is None:
                if target != module:
                    wrong.append(f"{module} (the root module imports nothing) -> {target}")
            elif theirs is not None and theirs not in ALLOWED[own]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_experiments_and_benchmarks_are_imported_only_from_inside():
    graph = import_graph()
    for top in ("experiments", "benchmarks"):
        outside = sorted(
            f"{m} -> {t}"
            for m, targets in graph.items()
            for t in targets
            if subpackage(t) == top and subpackage(m) != top
        )
        assert not outside, outside


def test_framework_free_cpp_includes_no_tensorflow():
    files = sorted(p for p in SRC.rglob("*") if p.suffix in (".h", ".cc") and "csrc" in p.parts)
    assert files, "no C++ found under a csrc/ folder of src/"
    offenders = []
    for path in files:
        relative = path.relative_to(SRC).as_posix()
        if TF_INCLUDE.search(path.read_text()):
            offenders.append(relative)
    assert not offenders, f"TensorFlow includes in framework-free C++: {offenders}"


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate", "cross_validate", "report"])
def test_every_stage_uses_the_one_cli_wrapper(stage):
    path = SRC / "experiments" / f"{stage}.py"
    tree = ast.parse(path.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    calls = {getattr(c.func, "id", None) for c in ast.walk(main) if isinstance(c, ast.Call)}
    assert "run_stage" in calls, f"{stage}.main does not use cli.run_stage"
    handlers = [n for n in ast.walk(main) if isinstance(n, ast.ExceptHandler)]
    assert not handlers, f"{stage}.main catches errors itself"
    assert "CLI_ERRORS" not in path.read_text()

"""The package's layering (docs/design.md, "Floors"): imports point only down, no cycles, no
module over 450 lines, and an import inside a function carries a comment saying why."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxrl")
FLOORS = {
    "kernels": 0, "models": 0, "types": 0,
    "rl": 1, "rewards": 1, "data": 1, "sampling": 1, "sharding": 1,
    "wiring": 2, "config": 2, "plan": 2,
    "train": 3, "eval": 3,
    "cli": 4, "ablate": 4,
}
MAX_LINES = 450


def _modules() -> dict[str, str]:
    found = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _resolve(module: str, node: ast.AST, modules: dict[str, str]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            parts = parts if modules[module].endswith("__init__.py") else parts[:-1]
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    out = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("jaxrl.") and name != module:
            out.add(name)
    return out


def _floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def _graph():
    modules = _modules()
    edges, inner_imports = {}, []
    for module, path in modules.items():
        source = open(path, encoding="utf-8").read()
        lines = source.splitlines()
        tree = ast.parse(source)
        edges[module] = set()
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[module] |= _resolve(module, node, modules)
                line = lines[node.lineno - 1]
                above = lines[node.lineno - 2] if node.lineno > 1 else ""
                if id(node) not in top_level and "#" not in line and not above.strip().startswith("#"):
                    inner_imports.append(f"{module}:{node.lineno}: {line.strip()}")
    return modules, edges, inner_imports


def test_every_module_has_a_floor():
    modules, _, _ = _graph()
    assert [m for m in modules if m != "jaxrl" and _floor(m) is None] == []


def test_imports_point_down_only():
    _, edges, _ = _graph()
    upward = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
              if _floor(a) is not None and _floor(b) is not None and _floor(b) > _floor(a)]
    assert upward == []


def test_no_import_cycles():
    _, edges, _ = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_imports_inside_functions_say_why():
    _, _, inner = _graph()
    assert inner == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_length(module):
    with open(_modules()[module], encoding="utf-8") as handle:
        assert sum(1 for _ in handle) <= MAX_LINES


def test_the_checker_catches_a_back_arrow_and_a_cycle(tmp_path):
    """The checks above can fail: a fake package with models -> train and a <-> b."""
    package = tmp_path / "jaxrl"
    (package / "models").mkdir(parents=True)
    (package / "train").mkdir()
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text("")
    (package / "train" / "__init__.py").write_text("")
    (package / "models" / "a.py").write_text("from jaxrl.train import b\n")
    (package / "train" / "b.py").write_text("def f():\n    from jaxrl.models import a\n")
    real = globals()["PACKAGE"]
    globals()["PACKAGE"] = str(package)
    try:
        with pytest.raises(AssertionError):
            test_imports_point_down_only()
        with pytest.raises(AssertionError):
            test_no_import_cycles()
        with pytest.raises(AssertionError):
            test_imports_inside_functions_say_why()
    finally:
        globals()["PACKAGE"] = real

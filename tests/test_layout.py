"""The package's shape, checked on its source: small pieces, no import cycles, no private imports.

These are the rules the layout promises (README, "Layout"): no class longer than
450 lines, no function longer than 120 lines, no import cycle inside
``svq_modules`` (imports inside functions count), and no module importing a
``_private`` name of another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "svq_modules"
MAX_CLASS_LINES = 450
MAX_FUNCTION_LINES = 120


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(), filename=str(path))
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / Path(*name.split(".")) / "__init__.py").exists()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.Module) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every import of ``svq_modules`` in ``tree``."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "svq_modules"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != "svq_modules":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (target, alias.name))
    return found


def _owner(name: str) -> str:
    """The module of the package that ``name`` (a dotted module path) refers to."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_the_package_is_found():
    assert "svq_modules.nn" in MODULES and "svq_modules.coding" in MODULES and len(MODULES) > 20


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_class_or_function_is_too_long(module):
    too_long = []
    for node in ast.walk(MODULES[module]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - start + 1
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if length > limit:
                too_long.append(f"{node.name}: {length} lines (limit {limit})")
    assert not too_long, f"{module}: {too_long}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_of_another_module_is_imported(module):
    bad = []
    for target, name in _imports(module, MODULES[module]):
        owner = _owner(target)
        private_module = any(part.startswith("_") and not part.startswith("__") for part in target.split("."))
        if owner != module and ((name or "").startswith("_") or private_module):
            bad.append(f"{target}.{name}" if name else target)
    assert not bad, f"{module} imports private names: {bad}"


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for module, tree in MODULES.items():
        deps = {_owner(target) for target, _ in _imports(module, tree)}
        # a package's __init__ re-exporting its own submodules is not a cycle of the submodules
        graph[module] = {d for d in deps if d != module and not (module.startswith(d + ".") and _is_package(d))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_plotting_imports_nothing_of_the_package():
    assert _imports("svq_modules.plotting", MODULES["svq_modules.plotting"]) == []


def test_the_checker_sees_a_cycle_and_a_private_import():
    """The checks above can fail: a planted cycle and a planted private import are found."""
    MODULES["svq_modules._probe_a"] = ast.parse("from ._probe_b import _hidden\n")
    MODULES["svq_modules._probe_b"] = ast.parse("def f():\n    from ._probe_a import g\n")
    try:
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_no_import_cycle()
        with pytest.raises(AssertionError, match="private"):
            test_no_private_name_of_another_module_is_imported("svq_modules._probe_a")
    finally:
        del MODULES["svq_modules._probe_a"], MODULES["svq_modules._probe_b"]

"""One-way layering: the import graph of src/nmkit has no cycle, and nmkit modules are imported at
module level (a function-level import must not be a way around a cycle).

The graph is read with ``ast`` from the source, not by importing: every ``import nmkit...`` and
``from nmkit... import ...`` (or relative import), at module level or inside a function, is an edge
to the module it names. ``from package import name`` is an edge to ``package.name`` when that is a
module, else to the package. Importing a submodule also runs its package's ``__init__``; those
implicit edges are left out (a package re-exporting its own submodules is not a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import nmkit

ROOT = Path(nmkit.__file__).parent

# Function-level imports of nmkit modules that are allowed, as (importing module, imported module) ->
# the reason, which must be other than dodging a cycle. Empty today: heavy third-party libraries
# (transformers, matplotlib, scipy, datasets) are imported inside the functions that need them, so
# every nmkit module is cheap to import at module level. Two string-keyed tables load modules on
# demand by design and are not imports of this kind: ``nmkit.__getattr__`` (keeps ``import nmkit``
# light) and the CLI's optional ``bench``/``commands`` modules.
LAZY_ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported nmkit module, line, inside a function) for every nmkit import of ``module``."""
    tree = ast.parse(path.read_text(), str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import nmkit.a.b` names module nmkit.a.b or its parent
                target = target.rpartition(".")[0]
            if target and target != module:
                found.append((target, node.lineno, id(node) in in_function))
    return found


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycle(graph: dict[str, list[tuple[str, int, bool]]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for target, _, _ in graph.get(m, []):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_walk_finds_module_and_function_level_imports(tmp_path):
    """The checks below can fail: the walk sees both kinds of import, and a cycle is found."""
    src = tmp_path / "probe.py"
    src.write_text("from nmkit.patterns import NM\n\n\ndef f():\n    from nmkit.solvers import nm\n")
    found = {(t, inside) for t, _, inside in _imports("nmkit.probe", src, _modules())}
    assert found == {("nmkit.patterns", False), ("nmkit.solvers.nm", True)}
    assert _cycle({"a": [("b", 1, False)], "b": [("a", 1, True)], "c": []}) == ["a", "b", "a"]
    assert _cycle({"a": [("b", 1, False)], "b": [], "c": [("a", 1, False)]}) is None


def test_no_import_cycle_in_nmkit():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_level_import_of_nmkit_modules():
    lazy = [f"{m}:{line} imports {t}" for m, edges in _graph().items() for t, line, inside in edges
            if inside and (m, t) not in LAZY_ALLOWED]
    assert not lazy, "import these at module level (or justify them in LAZY_ALLOWED):\n" + "\n".join(lazy)

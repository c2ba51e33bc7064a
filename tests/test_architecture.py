"""The layout rules of docs/architecture.md: imports run one way (stages on top), packages form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mrrl"
# Modules allowed to import the stage scripts: the registry itself and the entry points that run stages.
MAY_IMPORT_STAGES = {"mrrl.cli", "mrrl.pipeline", "mrrl.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``mrrl`` module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.startswith("mrrl")
        ):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mrrl"))
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _unit(module: str) -> str:
    """The package (``mrrl.ppo``) or root module (``mrrl.manifest``) a module belongs to."""
    return ".".join(module.split(".")[:2])


def test_only_the_registry_and_entry_points_import_stage_scripts():
    upward = {
        module: sorted(i for i in imports if i == "mrrl.stages" or i.startswith("mrrl.stages."))
        for module, imports in _graph().items()
        if not module.startswith("mrrl.stages") and module not in MAY_IMPORT_STAGES
    }
    assert {m: i for m, i in upward.items() if i} == {}


def test_stage_scripts_do_not_import_each_other():
    sideways = {
        module: sorted(i for i in imports if i.startswith("mrrl.stages.") and i != module)
        for module, imports in _graph().items()
        if module.startswith("mrrl.stages.")
    }
    assert {m: i for m, i in sideways.items() if i} == {}


def test_packages_form_no_import_cycle():
    edges: dict[str, set[str]] = {}
    for module, imports in _graph().items():
        edges.setdefault(_unit(module), set()).update(_unit(i) for i in imports if _unit(i) != _unit(module))
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for unit in sorted(edges):
        if unit not in state:
            visit(unit, [unit])


def _docstring_or_version(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) or (
        isinstance(node, ast.Assign)
        and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"]
    )


def test_package_inits_re_export_nothing():
    """One style: ``__init__`` files hold a docstring; a name is imported from the module that defines it."""
    busy = [
        _module_name(p)
        for p in PACKAGE.rglob("__init__.py")
        if p.parent.name != "stages"
        and any(not _docstring_or_version(n) for n in ast.parse(p.read_text()).body)
    ]
    assert busy == []

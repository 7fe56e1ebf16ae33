"""The import structure the design promises: core modules form no cycle (imports inside
functions included), no module imports another's private name, and plugins use only the public
core (never the training loop, never another stage's plugin module)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> import name, as setup.cfg maps them.
PACKAGES = {"core": "gem", "hooks": "gem.hooks", "gem_plugins": "gem_plugins"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, imported name or "") for every absolute import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, imported in _imports(path):
            if f"{module}.{imported}" in MODULES:
                edges[name].add(f"{module}.{imported}")
            elif module in MODULES:
                edges[name].add(module)
    return edges


def test_the_module_map_is_what_the_test_reads():
    assert {"gem.context", "gem.evaluation", "gem.run_folder", "gem.pipeline", "gem_plugins.somersd"} <= set(MODULES)


def test_no_import_cycle_among_core_modules():
    edges = _edges()
    # The package's own __init__ only re-exports the hook marker; every module may import it.
    core = {m for m in edges if m.startswith("gem") and not m.startswith("gem_plugins") and m != "gem"}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges[module] & core):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(core):
        if module not in state:
            visit(module)
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for name, path in MODULES.items():
        for module, imported in _imports(path):
            if module in MODULES and module != name and imported.startswith("_") and not imported.startswith("__"):
                bad.append(f"{name} imports {module}.{imported}")
    assert not bad, bad


def test_plugins_import_neither_the_training_loop_nor_another_stage_plugin():
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("gem_plugins."):
            continue
        for module, _ in _imports(path):
            if module == "gem.training" or module.startswith("gem.training."):
                bad.append(f"{name} imports gem.training")
            if module == "gem_plugins.somersd" and name != "gem_plugins.somersd":
                bad.append(f"{name} imports the somersd ranker plugin")
            if module in ("gem.pipeline", "gem.evaluation", "gem.cli", "gem.compare", "gem.eval_command"):
                bad.append(f"{name} imports the command-level module {module}")
    assert not bad, bad

"""The package's imports against the layer order docs/architecture.md states: every module is in one
layer, imports only from its own layer or lower ones, and no chain of imports comes back to where it
started. Imports inside functions count too (a lazy import is still a dependency)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "w4a8conv"
ARCHITECTURE = Path(__file__).parents[1] / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def documented_layers(text: str) -> list[list[str]]:
    """The numbered list under "## Layers": each item's `code` names, in order from the bottom."""
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    items = [line for line in section.splitlines() if re.match(r"^\d+\. ", line)]
    return [re.findall(r"`([^`]+)`", item.split(":", 1)[0]) for item in items]


LAYERS = documented_layers(ARCHITECTURE.read_text())


def relative(module: str) -> str:
    return "__init__" if module == "w4a8conv" else module.removeprefix("w4a8conv.")


def covers(name: str, module: str) -> bool:
    """A documented name stands for a module, or for a package and everything in it."""
    return relative(module) == name or relative(module).startswith(name + ".")


def layer_of(module: str) -> int | None:
    """The layer of the longest documented name that covers the module."""
    found = [(len(name), index) for index, names in enumerate(LAYERS) for name in names if covers(name, module)]
    return max(found)[1] if found else None


def imported_modules(module: str) -> set[str]:
    """The package's modules this one imports, wherever in the file the import statement is."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imported_modules(module) for module in MODULES}


def test_every_module_is_in_one_documented_layer():
    assert LAYERS, "docs/architecture.md has no numbered list under ## Layers"
    missing = [m for m in MODULES if layer_of(m) is None]
    assert not missing, f"in no layer of docs/architecture.md: {missing}"
    names = [name for layer in LAYERS for name in layer]
    assert len(names) == len(set(names)), f"named in two layers: {names}"
    stale = [name for name in names if not any(covers(name, m) for m in MODULES)]
    assert not stale, f"docs/architecture.md places modules that do not exist: {stale}"


def test_no_module_imports_from_a_higher_layer():
    placed = {m for m in MODULES if layer_of(m) is not None}  # the others fail the test above
    upward = [f"{m} (layer {layer_of(m) + 1}) imports {t} (layer {layer_of(t) + 1})"
              for m in sorted(placed) for t in sorted(GRAPH[m] & placed) if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_catch_a_circle_and_an_upward_import():
    """The walk itself: a made-up graph with a circle is caught, and the real graph has the edges a
    lazy import and a relative one make."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "w4a8conv.api" in GRAPH["w4a8conv"]  # `from . import api` inside __getattr__
    assert "w4a8conv.source.safetensors_file" in GRAPH["w4a8conv.source.reader"]
    assert layer_of("w4a8conv.runtime.checkpoint") < layer_of("w4a8conv.source.reader") < layer_of("w4a8conv.plan")
    assert layer_of("w4a8conv.cli") == len(LAYERS) - 1

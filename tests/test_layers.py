"""The import graph of svdiff goes one way: no module imports, directly or through others, a module that imports
it back; the math (spectral/) never needs diffusers or transformers; the shift-file format needs only the standard
library, torch and safetensors. Read from the source with `ast`, so an import inside a function counts as much as
one at the top of a file."""

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "svdiff"
# Third-party packages the pure shift-file format may use; the standard library is always allowed.
FORMAT_ALLOWED = {"torch", "safetensors"}
SPECTRAL_FORBIDDEN = {"diffusers", "transformers"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def containing_module(name: str) -> str | None:
    """The longest prefix of a dotted name that is a module of svdiff (`svdiff.a.b.func` -> `svdiff.a.b`)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """The svdiff modules and the top-level outside packages that `module` imports anywhere in its file (at module
    level, in functions, in classes). `from pkg import name` counts as importing the submodule `pkg.name` when
    there is one, else the package `pkg`."""
    return imports_in(MODULES[module].read_text(), module, is_package(module))


def imports_in(source: str, module: str, package: bool) -> tuple[set[str], set[str]]:
    here = module if package else module.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "svdiff":
                    internal.add(containing_module(alias.name) or alias.name)
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if target.split(".")[0] != "svdiff":
                external.add(target.split(".")[0])
                continue
            for alias in node.names:
                internal.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    internal.discard(module)
    return internal, external


GRAPH = {module: imports_of(module) for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, …, a], or None (depth-first search, colouring the nodes). A node without
    an entry has no edges."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def is_leaf(module: str) -> bool:
    """A module that imports no other svdiff module and nothing beyond the standard library and torch."""
    internal, external = GRAPH[module]
    return not internal and all(name in sys.stdlib_module_names or name == "torch" for name in external)


def test_the_reader_sees_every_kind_of_import():
    source = """
import json
import svdiff.spectral.shifts
from . import checkpoint
from .. import errors, __version__
from ..spectral import add_shifts

def later():
    from ..world import render
    import diffusers.utils
"""
    internal, external = imports_in(source, "svdiff.train.loop", package=False)
    assert internal == {
        "svdiff.spectral.shifts",  # absolute
        "svdiff.train.checkpoint",  # `from . import` a submodule
        "svdiff.errors",  # `from .. import` a submodule …
        "svdiff",  # … and a name of the package
        "svdiff.spectral",  # a name from a package
        "svdiff.world.render",  # in a function
    }
    assert external == {"json", "diffusers"}
    assert imports_in("from . import mixed", "svdiff.spectral", package=True)[0] == {"svdiff.spectral.mixed"}


def test_a_cycle_is_found_and_shown():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_module_graph_has_no_cycle():
    cycle = find_cycle({module: internal for module, (internal, _) in GRAPH.items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("svdiff.spectral")])
def test_spectral_needs_neither_diffusers_nor_higher_layers(module):
    internal, external = GRAPH[module]
    assert not external & SPECTRAL_FORBIDDEN, f"{module} imports {sorted(external & SPECTRAL_FORBIDDEN)}"
    higher = {m for m in internal if not m.startswith("svdiff.spectral") and not is_leaf(m)}
    assert not higher, f"{module} imports {sorted(higher)}, above the math"


def test_the_format_is_pure():
    internal, external = GRAPH["svdiff.format"]
    outside = {name for name in external if name not in sys.stdlib_module_names and name not in FORMAT_ALLOWED}
    assert not outside, f"svdiff.format imports {sorted(outside)}"
    not_leaves = {m for m in internal if not is_leaf(m)}
    assert not not_leaves, f"svdiff.format imports {sorted(not_leaves)}, which are not leaf modules"

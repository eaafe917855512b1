"""The interop package's layers, read from its import statements (issue 22.1): no
module imports one that imports it back, however far round, and the file formats
know nothing of the naming layer above them.

    formats/  (files <-> nested dicts of numpy arrays)
      <- schemes (naming schemes as data) <- engine (pairing, load, export)
      <- nnx, torch, flax (front-ends) <- flax_train_state, cli, __init__
"""

import ast
import pathlib

import pytest

import eqx_bn.interop

PACKAGE = "eqx_bn.interop"
ROOT = pathlib.Path(eqx_bn.interop.__file__).resolve().parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def _imports(path: pathlib.Path) -> set[str]:
    """The modules of eqx_bn that `path` imports, anywhere in it (a function's
    deferred import counts as much as one at the top)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (
                f"{base}.{node.module}" if node.level and node.module else node.module
            )
            if node.level and not node.module:
                module = base
            # `from .formats import tree` imports the module `tree`.
            for a in node.names:
                if f"{module}.{a.name}" in GRAPH_NODES:
                    found.add(f"{module}.{a.name}")
            found.add(module)
    return {m for m in found if m and m.startswith("eqx_bn")}


FILES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
GRAPH_NODES = set(FILES)
GRAPH = {name: _imports(path) & GRAPH_NODES - {name} for name, path in FILES.items()}


def _cycle() -> list[str] | None:
    """One import cycle among the interop modules, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(GRAPH):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read():
    # The test means something only if it sees the imports it is about.
    assert f"{PACKAGE}.engine" in GRAPH[f"{PACKAGE}.flax"]
    assert f"{PACKAGE}.nnx" in GRAPH[f"{PACKAGE}.flax"]
    assert f"{PACKAGE}.formats.tree" in GRAPH[f"{PACKAGE}.nnx"]
    assert f"{PACKAGE}.formats.sniff" in GRAPH[f"{PACKAGE}.formats.msgpack"]


def test_no_import_cycle_in_interop():
    assert _cycle() is None, " -> ".join(_cycle())


@pytest.mark.parametrize(
    "name", sorted(n for n in FILES if n.startswith(f"{PACKAGE}.formats"))
)
def test_formats_import_nothing_of_the_naming_layer(name):
    above = {
        m
        for m in GRAPH[name]
        if m.startswith(PACKAGE) and not m.startswith(f"{PACKAGE}.formats")
    }
    assert not above, f"{name} imports {sorted(above)}"

"""The one walker over nested dicts (and lists), and what is built on it: the
flat `{path: leaf}` view the converters pair names with, its inverse, and the
selection of top-level entries.

A path is a tuple of strings: integer keys (NNX list items, as
`nnx.to_pure_dict` and `msgpack_serialize` keep them) are written as their
decimal string, as `flax.serialization.to_bytes` stores them.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .errors import CheckpointError

Path = tuple[str, ...]

MAX_DEPTH = 100
"""How deep a tree read from a file may nest. Real checkpoints nest a few levels per
module; this only stops a hostile file from exhausting the Python stack."""


def where(path: Path, separator: str = "/") -> str:
    """A path in a message: `at 'params/Dense_0/kernel'`, or `at the top level`."""
    return f"at '{separator.join(path)}'" if path else "at the top level"


def map_tree(
    tree: Any,
    leaf: Callable[[Path, Any], Any],
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    key: Callable[[Path, Any], None] | None = None,
    lists: bool = False,
    lists_as_dicts: bool = False,
    max_depth: int | None = None,
    too_deep: Callable[[Path], Exception] | None = None,
) -> Any:
    """Rebuilds nested mappings with `leaf(path, value)` in place of each leaf.

    **Arguments:**

    - `tree`: nested mappings (any `Mapping`; rebuilt as `dict`s, keys kept).
    - `leaf`: called on every leaf with its path; its result takes the leaf's
        place.
    - `is_leaf`: a node for which it is true is a leaf even if it is a mapping.
    - `key`: called as `key(path_of_the_mapping, key)` for every key first,
        e.g. to refuse keys of a wrong type.
    - `lists`: walk into lists too (rebuilt as lists, items named `"0"`, `"1"`,
        ...); otherwise lists are leaves.
    - `lists_as_dicts`: with `lists`, rebuild lists and tuples as
        `{"0": ..., "1": ...}` (as Flax's msgpack format holds them).
    - `max_depth`, `too_deep`: deeper paths raise `too_deep(path)`.

    **Returns:**

    The rebuilt tree.

    **Raises:**

    - `ValueError`: two keys of one mapping have the same string form (`0` and
        `"0"`), so their paths would clash.
    """

    def walk(node: Any, path: Path) -> Any:
        if max_depth is not None and len(path) > max_depth:
            assert too_deep is not None
            raise too_deep(path)
        if is_leaf is not None and is_leaf(node):
            return leaf(path, node)
        if isinstance(node, Mapping):
            out = {}
            named: dict[str, Any] = {}
            for k, v in node.items():
                if key is not None:
                    key(path, k)
                if str(k) in named:
                    raise ValueError(
                        f"{where(path)}: the keys {named[str(k)]!r} and {k!r} both "
                        f"read as {str(k)!r}"
                    )
                named[str(k)] = k
                out[k] = walk(v, (*path, str(k)))
            return out
        if lists and isinstance(node, (list, tuple) if lists_as_dicts else list):
            items = [walk(v, (*path, str(i))) for i, v in enumerate(node)]
            return {str(i): v for i, v in enumerate(items)} if lists_as_dicts else items
        return leaf(path, node)

    return walk(tree, ())


def flatten(
    tree: Mapping, *, is_leaf: Callable[[Any], bool] | None = None
) -> dict[Path, Any]:
    """Every leaf of nested mappings by its path, in the tree's order.

    **Arguments:**

    - `tree`: nested mappings.
    - `is_leaf`: as for `map_tree` (e.g. an `nnx.Variable`, or the `{"value": x}`
        dict Orbax restores one as).

    **Returns:**

    `{("params", "Dense_0", "kernel"): leaf, ...}`: keys as strings.

    **Raises:**

    - `ValueError`: as for `map_tree`.
    """
    flat: dict[Path, Any] = {}

    def collect(path: Path, value: Any) -> None:
        flat[path] = value

    map_tree(tree, collect, is_leaf=is_leaf)
    return flat


def unflatten(
    flat: Iterable[tuple[Path, Any]], key: Callable[[str], Any] = str
) -> dict:
    """Nested dicts from `(path, leaf)` pairs: the inverse of `flatten`.

    **Arguments:**

    - `flat`: the pairs, e.g. `flat.items()`.
    - `key`: makes each path part a key (e.g. digits as ints, for NNX).
    """
    tree: dict = {}
    for path, value in flat:
        node = tree
        for part in path[:-1]:
            node = node.setdefault(key(part), {})
        node[key(path[-1])] = value
    return tree


def select_entries(
    tree: dict[str, Any], keys: Sequence[str] | None, origin: str
) -> dict[str, Any]:
    """The top-level entries `keys` of a checkpoint's tree (all if `None`).

    **Raises:**

    - `CheckpointError`: the tree lacks one of them; the message lists those it
        has.
    """
    if keys is None:
        return tree

    missing = [k for k in keys if k not in tree]
    if missing:
        names = ", ".join(repr(str(k)) for k in sorted(tree, key=str)) or "none"
        raise CheckpointError(
            f"{origin} has no entry {missing[0]!r}; its top-level entries are {names}"
        )
    return {k: tree[k] for k in keys}

"""How error messages name a value, and where two PyTrees differ."""

import dataclasses
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree


def with_article(noun: str) -> str:
    """`noun` with its indefinite article: `"an int"`, `"a dict"`, `"an ndarray"`.

    Told by the first letter, which is how a Python type name reads aloud but for
    `u` (`uint8` says "you": "a") and `nd` (`ndarray` says "en": "an").
    """
    vowel = noun[:1].lower() in ("a", "e", "i", "o") or noun.startswith("nd")
    return f"{'an' if vowel else 'a'} {noun}"


def describe(x: Any, *, placement: bool = False) -> str:
    """`float32[4, 3]` for an array (or anything with `shape` and `dtype`: a
    `jax.ShapeDtypeStruct`, a tracer), `key<fry>[]` for a typed PRNG key, `None`
    for None and the type with its article (`an int`, `a dict`) for anything else:
    how error messages name a leaf.

    With `placement`, an array's sharding follows (`float32[3] on
    NamedSharding(...)`), for messages about where arrays live.
    """
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        text = f"{_dtype_name(x.dtype)}[{', '.join(map(str, x.shape))}]"
        if placement:
            text += f" on {jax.typeof(x).sharding}"
        return text
    if x is None:
        return "None"
    return with_article(type(x).__name__)


def _dtype_name(dtype: Any) -> str:
    # JAX's extended dtypes (typed PRNG keys) have no NumPy equivalent: named as
    # JAX prints them (`key<fry>`), as is anything else NumPy does not know.
    try:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
            return str(dtype)
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_leaf(x: Any) -> bool:
    # Not `treedef_is_leaf`: that is also true of None and of empty containers.
    treedef = jax.tree.structure(x)
    return treedef.num_nodes == 1 and treedef.num_leaves == 1


def _children(x: Any) -> tuple[Any, dict[str, Any]]:
    """`x`'s node (its type and static data, as a one-level treedef) and its
    children by key (`.field`, `[0]`, `['name']`); a None child is kept."""
    pairs, node = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    return node, {jax.tree_util.keystr(path): child for path, child in pairs}


def _equal(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # `==` that gives an array, or refuses
        return False


def _static_fields(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """The static fields (`eqx.field(static=True)`) in which two dataclasses of one
    type differ: what makes their treedefs differ."""
    if not dataclasses.is_dataclass(a):
        return []
    return [
        (f.name, getattr(a, f.name, None), getattr(b, f.name, None))
        for f in dataclasses.fields(a)
        if f.metadata.get("static", False)
        and not _equal(getattr(a, f.name, None), getattr(b, f.name, None))
    ]


def _walk(a: Any, b: Any, path: str, out: list[str]) -> None:
    if _is_leaf(a) or _is_leaf(b):
        if not (_is_leaf(a) and _is_leaf(b)):
            out.append(f"{path}: expected {describe(a)}, got {describe(b)}")
        # Two non-array leaves (flags, functions) are configuration, not compared.
        elif (_is_array_like(a) or _is_array_like(b)) and describe(a) != describe(b):
            out.append(f"{path}: expected {describe(a)}, got {describe(b)}")
        return
    if type(a) is not type(b):
        out.append(f"{path}: expected {describe(a)}, got {describe(b)}")
        return
    node_a, children_a = _children(a)
    node_b, children_b = _children(b)
    out += [
        f"{path}{k}: missing (expected {describe(v)})"
        for k, v in children_a.items()
        if k not in children_b
    ]
    out += [
        f"{path}{k}: unexpected {describe(v)}"
        for k, v in children_b.items()
        if k not in children_a
    ]
    if list(children_a) == list(children_b) and node_a != node_b:
        fields = _static_fields(a, b)
        out += [
            f"{path}.{name}: expected {u!r}, got {v!r} (a static field)"
            for name, u, v in fields
        ]
        if not fields:  # another node type's static data (a State's keys...)
            out.append(f"{path}: expected {node_a}, got {node_b}")
    for k, child in children_a.items():
        if k in children_b:
            _walk(child, children_b[k], path + k, out)


def tree_differences(expected: PyTree, got: PyTree, where: str = "") -> list[str]:
    """Every way `got` differs from `expected` in structure, shape, dtype or kind,
    each named by its path: `where` followed by `jax.tree_util.keystr`'s path.

    - `{path}: expected float32[4, 3], got float32[5, 3]`: an array of another
        shape or dtype, or a leaf of another kind (`got a float`, `key<fry>[]` for
        `uint32[2]`), or a leaf where a subtree is expected;
    - `{path}: missing (expected ...)`, `{path}: unexpected ...`: a child (field,
        key, index) of only one of them;
    - `{path}: expected a tuple, got a list`: nodes of different types;
    - `{path}.{field}: expected 3, got 5 (a static field)`: nodes of one type
        whose static data differ (for other nodes than dataclasses, the two
        nodes are printed as treedefs).

    Two leaves that are not arrays (flags, functions: configuration) are not
    compared.

    **Arguments:**

    - `expected`, `got`: any PyTrees (arrays, tracers or `jax.ShapeDtypeStruct`s).
    - `where`: what the paths start with, e.g. `"model"`.

    **Returns:**

    The differences as messages, in tree order; an empty list when there is none.
    """
    leaves_a, treedef_a = jax.tree.flatten(expected)
    leaves_b, treedef_b = jax.tree.flatten(got)
    if treedef_a == treedef_b and all(
        not (_is_array_like(u) or _is_array_like(v)) or describe(u) == describe(v)
        for u, v in zip(leaves_a, leaves_b)
    ):
        return []
    out: list[str] = []
    _walk(expected, got, where, out)
    if not out:  # equal treedefs, by a test this walk does not make: never hidden
        out.append(f"{where}: expected {treedef_a}, got {treedef_b}")
    return out

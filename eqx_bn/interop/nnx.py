"""Flax NNX state: reading it without Flax, and telling it apart from linen variables.

An NNX model's state is named by attribute (`{"dense_0": {"kernel", "bias"}, "norm":
{"scale", "bias", "mean", "var"}, "blocks": {0: ..., 1: ...}}`), with no
`params`/`batch_stats` collections. It reaches us in several forms, all read here into
one flat `{("blocks", "0", "conv", "kernel"): array}`:

- `nnx.to_pure_dict(nnx.state(model))`: nested dicts of arrays, lists as `int` keys;
- an `nnx.State` itself, whose leaves are `nnx.Variable`s (recognised through
    `sys.modules`: if Flax is not imported, the caller cannot hold one);
- either of those saved with msgpack (`int` keys become strings) or Orbax (an
    `nnx.State` comes back with every leaf wrapped as `{"value": array}`).

Nothing of Flax is imported here.
"""

import sys
from collections.abc import Mapping
from typing import Any, Literal

Layout = Literal["auto", "linen", "nnx"]
"""How `load_flax` reads its tree: detected (`"auto"`), linen variables or NNX state."""

_WRAPPER = "value"
# An NNX random stream (`nnx.Rngs`, or the `rngs` of `nnx.Dropout`) holds these two.
_RNG_STREAM = frozenset({"key", "count"})


def _flax_class(module: str, name: str) -> type | None:
    """A Flax class if Flax has been imported already, else `None` (no import)."""
    found = sys.modules.get(module)
    cls = getattr(found, name, None) if found is not None else None
    return cls if isinstance(cls, type) else None


def is_nnx_state(tree: Any) -> bool:
    """Whether `tree` is an `nnx.State` (only possible when Flax is imported)."""
    cls = _flax_class("flax.nnx.statelib", "State")
    return cls is not None and isinstance(tree, cls)


def _variable(node: Any) -> tuple[bool, Any, bool]:
    """`(is a Variable, its value, is random-stream state)`."""
    cls = _flax_class("flax.nnx.variablelib", "Variable")
    if cls is None or not isinstance(node, cls):
        return False, node, False
    rng = _flax_class("flax.nnx.rnglib", "RngState")
    return True, node.get_value(), rng is not None and isinstance(node, rng)


def _is_wrapped(node: Any) -> bool:
    """`{"value": array}`: how Orbax restores one `nnx.Variable`."""
    return (
        isinstance(node, Mapping)
        and len(node) == 1
        and _WRAPPER in node
        and not isinstance(node[_WRAPPER], Mapping)
    )


def _leaves(tree: Mapping, prefix: tuple[str, ...], out: list) -> None:
    """Appends `(path, node, from_variable, rng)` for every leaf; a `{"value": x}`
    dict is kept whole here, to be unwrapped (or not) once all leaves are known."""
    for key, node in tree.items():
        path = (*prefix, str(key))
        is_var, value, rng = _variable(node)
        if is_var:
            out.append((path, value, True, rng))
        elif _is_wrapped(node):
            out.append((path, node, False, False))
        elif isinstance(node, Mapping):
            _leaves(node, path, out)
        else:
            out.append((path, node, False, False))


def read_nnx(tree: Mapping) -> tuple[dict[tuple[str, ...], Any], set[tuple[str, ...]]]:
    """Flattens NNX state in any of the forms it comes in.

    **Arguments:**

    - `tree`: an `nnx.State`, `nnx.to_pure_dict` output, or a msgpack or Orbax
        restore of either.

    **Returns:**

    `(flat, rng)`: `flat` maps each path (a tuple of strings: integer keys as their
    decimal string, as msgpack stores them) to its array; `rng` holds the paths
    that belong to random streams (`nnx.Rngs` state: not parameters).

    Leaves wrapped as `{"value": array}` are unwrapped when every leaf is: that is
    how Orbax restores an `nnx.State`. A tree with only some leaves so wrapped is
    taken as it is (an NNX attribute may well be called `value`).
    """
    found: list = []
    _leaves(tree, (), found)
    unwrap = bool(found) and all(
        not from_var and _is_wrapped(node) for _, node, from_var, _ in found
    )
    flat: dict[tuple[str, ...], Any] = {}
    rng: set[tuple[str, ...]] = set()
    for path, node, _, is_rng in found:
        if unwrap:
            node = node[_WRAPPER]
        elif _is_wrapped(node):
            path, node = (*path, _WRAPPER), node[_WRAPPER]
        flat[path] = node
        if is_rng:
            rng.add(path)
    # In a pure dict (or a file), a random stream is `{"key": ..., "count": ...}`.
    parents: dict[tuple[str, ...], set[str]] = {}
    for path in flat:
        parents.setdefault(path[:-1], set()).add(path[-1])
    for parent, names in parents.items():
        if names == _RNG_STREAM:
            rng.update((*parent, name) for name in names)
    return flat, rng


def certainly_nnx(tree: Mapping) -> bool:
    """NNX for sure, whatever the model: an `nnx.State`, `nnx.Variable` leaves,
    Orbax-wrapped leaves or integer keys, none of which a linen tree has."""
    if is_nnx_state(tree):
        return True
    found: list = []
    _leaves(tree, (), found)
    if any(from_var for _, _, from_var, _ in found):
        return True
    if found and all(_is_wrapped(node) for _, node, _, _ in found):
        return True
    return _has_int_keys(tree)


def _has_int_keys(tree: Any) -> bool:
    if not isinstance(tree, Mapping):
        return False
    return any(isinstance(k, int) or _has_int_keys(v) for k, v in tree.items())

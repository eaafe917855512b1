"""Flax NNX's front-end: reading NNX state without Flax, loading it (for
`load_flax`), `export_nnx` and `nnx_paths`.

An NNX model's state is named by attribute (`{"dense_0": {"kernel", "bias"}, "norm":
{"scale", "bias", "mean", "var"}, "blocks": {0: ..., 1: ...}}`), with no
`params`/`batch_stats` collections. It reaches us in several forms, all read here into
one flat `{("blocks", "0", "conv", "kernel"): array}`:

- `nnx.to_pure_dict(nnx.state(model))`: nested dicts of arrays, lists as `int` keys;
- an `nnx.State` itself, whose leaves are `nnx.Variable`s (recognised through
    `sys.modules`: if Flax is not imported, the caller cannot hold one);
- either of those saved with msgpack (`int` keys become strings) or Orbax (an
    `nnx.State` comes back with every leaf wrapped as `{"value": array}`).

What marks a tree as certainly NNX (`certainly_nnx`) is here; the choice between
linen and NNX is `load_flax`'s (`flax.py`). The naming scheme is `schemes.NNX`.
Nothing of Flax is imported here.
"""

import sys
from collections.abc import Mapping
from typing import Any

import equinox as eqx

from .._typing import typecheck
from .engine import (
    ConversionError,
    NameMapping,
    Pairing,
    export_pairs,
    load_pairs,
    pair,
    paths_of,
)
from .formats.tree import flatten, map_tree, unflatten
from .schemes import LINEN, NNX, PARAMS

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


def _variable(node: Any) -> tuple[bool, Any, str | None]:
    """`(is a Variable, its value, what it holds if not a parameter or statistic:
    "rng", "intermediate" or "optimizer", else None)`."""
    variable = _flax_class("flax.nnx.variablelib", "Variable")
    # Flax before 0.11 puts `VariableState`s (value and type) in an `nnx.State`.
    old = _flax_class("flax.nnx.variablelib", "VariableState")
    if variable is not None and isinstance(node, variable):
        kind, value = type(node), node.get_value()
    elif old is not None and isinstance(node, old):
        kind, value = node.type, node.value
    else:
        return False, node, None
    for name, module, cls in _NOT_PARAMETERS:
        found = _flax_class(module, cls)
        if found is not None and issubclass(kind, found):
            return True, value, name
    return True, value, None


# The kinds of NNX Variable that hold no parameter or statistic of the model.
_NOT_PARAMETERS = (
    ("rng", "flax.nnx.rnglib", "RngState"),  # nnx.Rngs: keys and counts
    ("intermediate", "flax.nnx.variablelib", "Intermediate"),  # `sow`'s values
    ("optimizer", "flax.nnx.training.optimizer", "OptState"),  # nnx.Optimizer's
)


def _is_orbax_variable(node: Any) -> bool:
    """`{"value": array}`: how Orbax restores one `nnx.Variable` (a `sow`n tuple's
    value as `{"0": array, ...}`)."""
    if not (isinstance(node, Mapping) and len(node) == 1 and _WRAPPER in node):
        return False
    value = node[_WRAPPER]
    return not isinstance(value, Mapping) or _is_stored_tuple(value)


def _is_stored_tuple(node: Any) -> bool:
    """A tuple as Flax's formats store it: `{"0": a, "1": b}` (ambiguous but where
    an array is expected: a list of arrays is stored the same)."""
    return (
        isinstance(node, Mapping)
        and bool(node)
        and all(str(k).isdigit() for k in node)
        and not any(isinstance(v, Mapping) for v in node.values())
    )


def _is_leaf(node: Any) -> bool:
    return _variable(node)[0] or _is_orbax_variable(node)


def read_nnx(tree: Mapping) -> tuple[dict[tuple[str, ...], Any], dict[tuple, str]]:
    """Flattens NNX state in any of the forms it comes in.

    **Arguments:**

    - `tree`: an `nnx.State`, `nnx.to_pure_dict` output, or a msgpack or Orbax
        restore of either.

    **Returns:**

    `(flat, kinds)`: `flat` maps each path (a tuple of strings: integer keys as
    their decimal string, as msgpack stores them) to its value; `kinds` names the
    paths that hold no parameter or statistic: `"rng"` for random streams
    (`nnx.Rngs` state), `"intermediate"` for values stored with `sow` (a tuple, in
    a pure dict), `"optimizer"` for `nnx.Optimizer` state.

    Leaves wrapped as `{"value": array}` are unwrapped when every leaf is: that is
    how Orbax restores an `nnx.State`. A tree with only some leaves so wrapped is
    taken as it is (an NNX attribute may well be called `value`).
    """
    found = flatten(tree, is_leaf=_is_leaf)
    unwrap = bool(found) and all(
        not _variable(node)[0] and _is_orbax_variable(node) for node in found.values()
    )
    flat: dict[tuple[str, ...], Any] = {}
    kinds: dict[tuple, str] = {}
    for path, node in found.items():
        _, node, kind = _variable(node)
        if unwrap:
            node = node[_WRAPPER]
        elif _is_orbax_variable(node):
            path, node = (*path, _WRAPPER), node[_WRAPPER]
        flat[path] = node
        if kind is None and isinstance(node, (list, tuple, Mapping)):
            # `sow` keeps a tuple of values where any other Variable has an array.
            kind = "intermediate"
        if kind is not None:
            kinds[path] = kind
    # In a pure dict (or a file), a random stream is `{"key": ..., "count": ...}`.
    parents: dict[tuple[str, ...], set[str]] = {}
    for path in flat:
        parents.setdefault(path[:-1], set()).add(path[-1])
    for parent, names in parents.items():
        if names == _RNG_STREAM:
            kinds.update({(*parent, name): "rng" for name in names})
    return flat, kinds


def certainly_nnx(tree: Mapping) -> bool:
    """NNX for sure, whatever the model: an `nnx.State`, `nnx.Variable` leaves,
    Orbax-wrapped leaves or integer keys in the model's variables, none of which a
    linen tree has."""
    return _nnx_evidence(tree) is not None


def _nnx_evidence(tree: Mapping) -> str | None:
    """Why `tree` is certainly NNX state (a phrase for messages), or `None`."""
    if is_nnx_state(tree):
        return "they are an `nnx.State`"
    found = list(flatten(tree, is_leaf=_is_leaf).values())
    if any(_variable(node)[0] for node in found):
        return "their leaves are `nnx.Variable`s"
    if found and all(_is_orbax_variable(node) for node in found):
        return (
            "every leaf is wrapped as `{'value': array}`, as Orbax restores NNX state"
        )
    if isinstance(tree.get(PARAMS), Mapping):
        # A linen TrainState: only `params`/`batch_stats` are the model's; the
        # rest (`opt_state`) may well have integer keys, e.g. the `inner_states`
        # of `optax.multi_transform` with integer labels.
        scanned = [tree[name] for name in LINEN.collections if name in tree]
    else:
        scanned = [tree]
    if any(_has_int_keys(node) for node in scanned):
        return "they have integer keys (NNX list items), which linen names never are"
    return None


def _has_int_keys(tree: Any) -> bool:
    ints: list = []
    map_tree(
        tree,
        lambda path, leaf: None,
        is_leaf=_is_leaf,
        key=lambda path, k: ints.append(k) if type(k) is int else None,
    )
    return bool(ints)


def nnx_variables(
    variables: Mapping, pairing: Pairing
) -> tuple[dict[tuple[str, ...], Any], list[tuple[str, str]]]:
    """The NNX leaves, and what nothing in the model wants and is no parameter
    (random streams, `sow`n intermediates, optimiser state) as `(name, kind)`:
    reported as extra entries, skipped with `ignore_extra=True`."""
    flat, kinds = read_nnx(variables)
    wanted = {e.path for e in pairing.entries}
    scopes = {e.path[:i] for e in pairing.entries for i in range(len(e.path))}
    for path in flat:
        # `to_bytes` stores a `sow`n tuple as `{"0": array}`: an index under a
        # scope the model does not have.
        if path not in wanted and path[-1].isdigit() and path[:-1] not in scopes:
            kinds.setdefault(path, "intermediate")
    extra = sorted((p for p in kinds if p not in wanted), key=lambda p: "/".join(p))
    for path in extra:
        del flat[path]
    return flat, [("/".join(p), kinds[p]) for p in extra]


def load_nnx(
    model: eqx.Module,
    state: eqx.nn.State,
    variables: Mapping,
    *,
    mapping: NameMapping | None,
    strict: bool,
    ignore_extra: bool,
    cast: bool,
    detected: bool,
) -> tuple[eqx.Module, eqx.nn.State]:
    """`load_flax` for NNX state (see there)."""
    pairing = pair(model, mapping, NNX)
    flat, extra = nnx_variables(variables, pairing)
    wanted = {e.path for e in pairing.entries}
    names = [*("/".join(p) for p in flat), *(name for name, _ in extra)]
    if detected and names and wanted and not wanted & set(flat):
        # Nothing pairs: most likely not NNX state at all, or not a model's
        # (an optimiser's); say why it was read so.
        raise _unpaired(model, variables, flat, names, mapping)
    return load_pairs(
        model,
        state,
        flat,
        pairing,
        NNX,
        strict=strict,
        cast=cast,
        extra=() if ignore_extra else extra,
    )


def _unpaired(model, variables, flat, names, mapping) -> ConversionError:
    linen = {e.path for e in pair(model, mapping, LINEN).entries}
    if _is_optimizer_state(variables):
        inside = (
            " (here under 'model': pass `variables['model']`)"
            if isinstance(variables.get("model"), Mapping)
            else ""
        )
        hint = (
            "They look like an `nnx.Optimizer`'s state (`step` and `opt_state`, "
            "the optimiser's moments), not a model's: pass the model's state, "
            f"`nnx.state(model)` or its `nnx.to_pure_dict`{inside}."
        )
    elif {(PARAMS, *p) for p in flat} & linen:
        hint = (
            "They look like a Flax linen `params` collection on its own: pass "
            "`{'params': params, 'batch_stats': batch_stats}`."
        )
    else:
        hint = (
            "See the pairing with `eqx_bn.interop.nnx_paths(model)` (NNX) or "
            "`eqx_bn.interop.flax_paths(model)` (linen); pass layout='linen' if "
            "these are linen variables."
        )
    why = _nnx_evidence(variables) or "they have no `params` collection at the top"
    more = ", ..." if len(names) > 5 else ""
    return ConversionError(
        f"Cannot load these variables into {type(model).__name__}: they were read as "
        f"Flax NNX state because {why}, but none of their names "
        f"({', '.join(sorted(names[:5]))}{more}) is one the model has. {hint}",
        unexpected=tuple(names),
    )


def _is_optimizer_state(tree: Mapping) -> bool:
    """`nnx.state(optimizer)`, in any form: `step` and `opt_state` at the top (and
    `model` too, in Flax before 0.11)."""
    return (
        "opt_state" in tree
        and "step" in tree
        and set(map(str, tree))
        <= {
            "opt_state",
            "step",
            "model",
        }
    )


# -- Front-ends ---------------------------------------------------------------------


def _index(part: str) -> str | int:
    # List items are integer keys in `nnx.to_pure_dict`; attribute names never are
    # digits only.
    return int(part) if part.isdigit() else part


@typecheck
def export_nnx(
    model: eqx.Module,
    state: eqx.nn.State,
    *,
    mapping: NameMapping | None = None,
) -> dict:
    """Writes an Equinox model and its State as NNX state, a pure dict.

    The inverse of loading NNX state with `load_flax`: exporting a model loaded from
    `nnx.to_pure_dict(nnx.state(nnx_model))` gives that dict back bit for bit (list
    items under integer keys, as NNX has them).

    !!! Example

        ```python
        _, nnx_state = nnx.split(nnx_model)
        nnx.replace_by_pure_dict(nnx_state, eqx_bn.interop.export_nnx(model, state))
        nnx.update(nnx_model, nnx_state)
        ```

    **Arguments:**

    - `model`, `state`: the Equinox model and its `eqx.nn.State`.
    - `mapping`: the same overrides as for `load_flax`, with NNX names
        (`{"classifier": lambda m: m.head}`).

    **Returns:**

    Nested dicts of numpy arrays in NNX's layout: `{"dense_0": {"kernel": ...,
    "bias": ...}, "norm": {"scale", "bias", "mean", "var"}, "blocks": {0: ...}}`,
    which `nnx.replace_by_pure_dict` accepts and `flax.serialization.to_bytes` or
    Orbax save.

    **Raises:**

    - `ConversionError`: when the model has layers with no conversion rule.
    - `ValueError`: for a `mapping` whose selectors do not pick part of the model.
    """
    exported = export_pairs(model, state, pair(model, mapping, NNX), NNX)
    return unflatten(exported.items(), key=_index)


@typecheck
def nnx_paths(
    model: eqx.Module, *, mapping: NameMapping | None = None
) -> dict[str, str]:
    """The pairing with NNX state that `load_flax` and `export_nnx` use.

    !!! Example

        ```python
        >>> eqx_bn.interop.nnx_paths(model)
        {'dense_0/kernel': 'model.dense_0.weight', ...
         'norm/mean': 'state[model.norm.state_index].mean', ...
         'blocks/0/conv/kernel': 'model.blocks[0].conv.weight', ...}
        ```

    **Arguments:**

    - `model`: the Equinox model.
    - `mapping`: overrides, as for `load_flax`, with NNX names.

    **Returns:**

    A dict from each NNX path (attributes and list indices joined with `/`) to the
    Equinox leaf it pairs with, in the model's order.

    **Raises:**

    - `ConversionError`: when the model has layers with no conversion rule.
    - `ValueError`: for a `mapping` whose selectors do not pick part of the model.
    """
    return paths_of(pair(model, mapping, NNX), NNX, type(model).__name__)

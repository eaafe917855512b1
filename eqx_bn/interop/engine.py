"""The pairing engine, for every naming scheme: walk an Equinox model, pair each of
its leaves with the name another framework gives it, then load (check every pair,
re-lay each array, build with `eqx.tree_at`) or export.

The model is walked in field order (and list order), with a scheme (a
`schemes.Naming`). Two ways of naming exist:

- Flax linen's (`numbered=True`): each layer of a known kind gets the name Flax's
    `@nn.compact` would give it in the current scope, `<Kind>_<n>` counted per kind
    (`Dense_0`, `Conv_1`, `BatchNorm_0`); any other module becomes a scope
    `<ClassName>_<n>` whose fields are named afresh, as a Flax submodule is. So a
    model with `blocks: list[ResNetBlock]` pairs with Flax's `ResNetBlock_0 ...
    ResNetBlock_N`. `eqx.nn.Sequential` is transparent, as `flax.linen.Sequential`
    is when its layers are built in the parent; at the top level its layers are
    `layers_0`, `layers_1`, ... by position, as in Flax.
- By attribute (`numbered=False`; Flax NNX, PyTorch): a field's name is its scope,
    list and tuple items add their index, dict items their key, and an
    `eqx.nn.Sequential`'s layers sit under `Naming.sequential` then their index.

A bare layer as the model is the root scope. A field can declare its name with
`eqx.field(metadata={naming.metadata_key: "conv_proj"})` (on a list field:
`conv_proj_0`, ... in linen; `conv_proj/0`, ... by attribute), and `mapping`
overrides any of it from the outside (see `pair`).

Loading takes the checkpoint's arrays flat, by path (`formats.tree.flatten`), checks
every pair before building anything, and raises one `ConversionError` listing every
problem. Nothing of Flax or torch is imported here.
"""

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import DictKey, GetAttrKey, SequenceKey, keystr

from .._describe import describe
from .schemes import IDENTITY, UNSUPPORTED_HINTS, Layout, Naming, rule_for

Key = GetAttrKey | SequenceKey | DictKey
NameMapping = Mapping[str, Callable[[Any], Any] | None]
"""Overrides of the automatic pairing: scope -> selector or `None` (see `pair`)."""


class ConversionError(ValueError):
    """A checkpoint's variables (Flax, NNX, PyTorch) and an Equinox model do not
    correspond.

    Raised once, listing every problem with its name in the checkpoint, the
    Equinox leaf it is paired with, and the expected and actual shape and dtype.
    Nothing is loaded when it is raised. It subclasses `ValueError`, so
    `except ValueError` catches it too.

    **Fields:** the problems, as tuples of strings (one line per problem):

    - `missing`: variables the model needs that the checkpoint lacks.
    - `unexpected`: checkpoint variables that nothing in the model pairs with.
    - `mismatched`: pairs whose shape or dtype differ.
    - `extra`: top-level entries that are not `params`/`batch_stats` (`step`,
        `opt_state` of a saved TrainState...), and NNX random-stream state.
    - `unsupported`: layers of the model that have no conversion rule.

    **Hints** (what the message advises, for programs such as the command line):

    - `castable`: some mismatch is of dtype alone, which `cast=True` converts.
    - `prefix`: every key of a PyTorch state_dict starts with it and nothing
        pairs: pass `prefix=` (e.g. `"module."`), else `None`.
    - `key`: a whole training checkpoint was given for a state_dict, and this
        entry of it holds the model's (`"state_dict"`, `"model"`), else `None`.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
        mismatched: tuple[str, ...] = (),
        extra: tuple[str, ...] = (),
        unsupported: tuple[str, ...] = (),
        castable: bool = False,
        prefix: str | None = None,
        key: str | None = None,
    ):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        self.extra = extra
        self.unsupported = unsupported
        self.castable = castable
        self.prefix = prefix
        self.key = key


@dataclasses.dataclass(frozen=True)
class Entry:
    """One variable of the other framework paired with one Equinox leaf.

    - `path`: `(collection, *scopes, name)`, e.g.
        `("params", "ResNetBlock_0", "Conv_0", "kernel")`, without the collection
        where the naming has none (`("layer1", "0", "bn1", "running_var")`).
    - `model_path`: the path in the model of the leaf or, when `state_field` is
        set, of the layer's `state_index`.
    - `state_field`: for a leaf in the State, its field in the layer's entry:
        `"mean"`/`"var"` of any kind, a `CumulativeStats`' `"num_batches"`, a
        `RenormStats`' `"stddev"`, `"renorm_mean"` or `"renorm_stddev"`.
    - `layout`: how the array is re-laid between the two sides.
    """

    path: tuple[str, ...]
    model_path: tuple[Key, ...]
    layout: Layout
    state_field: str | None = None

    def name(self, separator: str) -> str:
        return separator.join(self.path)

    @property
    def eqx_name(self) -> str:
        if self.state_field is None:
            return "model" + keystr(self.model_path)
        return f"state[model{keystr(self.model_path)}].{self.state_field}"


@dataclasses.dataclass(frozen=True)
class Pairing:
    """The outcome of walking a model.

    - `entries`: the paired variables, in the model's order.
    - `ignored`: scopes that `mapping` sends to `None`.
    - `problems`: layers that cannot be paired automatically, with the reason.
    """

    entries: tuple[Entry, ...]
    ignored: tuple[tuple[str, ...], ...]
    problems: tuple[str, ...]


def is_arraylike(x: Any) -> bool:
    """An array, or the `jax.ShapeDtypeStruct` standing for one in an abstract model
    (from `eqx.filter_eval_shape`), which `load_flax` fills without initialising."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def natural_key(path: str) -> list:
    """Sort key that puts `ResNetBlock_2` before `ResNetBlock_10`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def get_at(tree: Any, path: tuple[Key, ...]) -> Any:
    """The node of `tree` at `path` (attributes, sequence indices, dict keys)."""
    for key in path:
        if isinstance(key, GetAttrKey):
            tree = getattr(tree, key.name)
        elif isinstance(key, SequenceKey):
            tree = tree[key.idx]
        else:
            tree = tree[key.key]
    return tree


def is_unsupported_layer(module: eqx.Module) -> bool:
    """An Equinox built-in layer with arrays and no rule (e.g. ConvTranspose).

    Treating it as a generic scope would pair its arrays by field name with no layout
    change, which is wrong for most of them; it has to be mapped by hand.
    """
    if not type(module).__module__.startswith("equinox."):
        return False
    if isinstance(module, (eqx.nn.Sequential, eqx.nn.MLP, eqx.nn.StateIndex)):
        return False
    return any(is_arraylike(leaf) for leaf in jax.tree_util.tree_leaves(module))


def _split(scope: str, naming: Naming) -> tuple[str, ...]:
    sep = naming.separator
    parts = tuple(p for p in scope.strip(sep).split(sep) if p)
    if not parts:
        example = "Dense_0" if naming.numbered else sep.join(("block", "0"))
        raise ValueError(
            f"mapping: empty {naming.framework} scope {scope!r}; expected a layer's "
            f"name, e.g. {example!r}."
        )
    return parts


class _Walker:
    def __init__(self, selected: dict[int, tuple[str, ...]], naming: Naming):
        self.selected = selected
        self.naming = naming
        self.found: Counter[int] = Counter()
        self.entries: list[Entry] = []
        self.problems: list[str] = []

    def module(self, module: eqx.Module, path: tuple[Key, ...], scope: tuple[str, ...]):
        """Walks the fields of `module`: in linen, naming them in a fresh scope; by
        attribute, each under its field name inside `scope`."""
        counter: Counter[str] = Counter()
        for field in dataclasses.fields(module):
            if field.metadata.get("static", False):
                continue
            value = getattr(module, field.name, None)
            declared = field.metadata.get(self.naming.metadata_key)
            child = path + (GetAttrKey(field.name),)
            if self.naming.numbered:
                self.visit(value, child, scope, counter, declared, field.name)
            else:
                self.visit_attribute(value, child, (*scope, declared or field.name))

    def visit(self, node, path, scope, counter, declared, field_name):
        """Linen naming: `scope` is the parent's, the node's own name comes from
        `declared` or the per-kind `counter`."""
        if node is None or isinstance(node, eqx.nn.StateIndex):
            return
        override = self.claim(node)
        if is_arraylike(node):
            flax_path = override or (*scope, declared or field_name)
            collection = self.naming.collections[:1]  # linen's `params`
            self.entries.append(Entry((*collection, *flax_path), path, IDENTITY))
        elif isinstance(node, (list, tuple, dict)) and not isinstance(node, eqx.Module):
            is_dict = isinstance(node, dict)
            for k, item in node.items() if is_dict else enumerate(node):
                name = None if declared is None else f"{declared}_{k}"
                key = DictKey(k) if is_dict else SequenceKey(k)
                self.visit(
                    item, path + (key,), scope, counter, name, f"{field_name}_{k}"
                )
        elif isinstance(node, eqx.Module):
            if (
                isinstance(node, eqx.nn.Sequential)
                and override is None
                and declared is None
            ):
                self.visit(
                    node.layers,
                    path + (GetAttrKey("layers"),),
                    scope,
                    counter,
                    None,
                    "layers",
                )
                return
            rule = rule_for(node, self.naming.rules)
            kind = rule.kind if rule is not None else type(node).__name__
            if override is not None:
                own = override
            elif declared is not None:
                own = (*scope, declared)
            else:
                own = (*scope, f"{kind}_{counter[kind]}")
                counter[kind] += 1
            self.named_module(node, path, own)

    def visit_attribute(self, node, path, own):
        """Attribute naming: `own` is the node's full name."""
        if node is None or isinstance(node, eqx.nn.StateIndex):
            return
        own = self.claim(node) or own
        if is_arraylike(node):
            self.entries.append(Entry(own, path, IDENTITY))
        elif isinstance(node, (list, tuple, dict)) and not isinstance(node, eqx.Module):
            is_dict = isinstance(node, dict)
            for k, item in node.items() if is_dict else enumerate(node):
                key = DictKey(k) if is_dict else SequenceKey(k)
                self.visit_attribute(item, path + (key,), (*own, str(k)))
        elif isinstance(node, eqx.nn.Sequential):
            self.visit_attribute(
                node.layers,
                path + (GetAttrKey("layers"),),
                (*own, *self.naming.sequential),
            )
        elif isinstance(node, eqx.Module):
            self.named_module(node, path, own)

    def claim(self, node) -> tuple[str, ...] | None:
        """The name `mapping` gives `node`, if any (counted, to check each is used)."""
        override = self.selected.get(id(node))
        if override is not None:
            self.found[id(node)] += 1
        return override

    def named_module(self, node, path, own):
        rule = rule_for(node, self.naming.rules)
        refused = None if rule is None or rule.refuse is None else rule.refuse(node)
        if refused is not None:
            where = self.naming.separator.join(own) or "the root"
            self.problems.append(
                f"model{keystr(path)}: {refused} ({self.naming.framework} scope "
                f"{where})."
            )
        elif rule is not None:
            self.layer(node, rule.slots(node), path, own)
        elif is_unsupported_layer(node):
            hint = UNSUPPORTED_HINTS.get(
                type(node), "pair its arrays through `mapping` one by one"
            )
            where = self.naming.separator.join(own) or "the root"
            self.problems.append(
                f"model{keystr(path)}: {type(node).__name__} has no conversion "
                f"rule ({self.naming.framework} scope {where}); {hint}."
            )
        else:
            self.module(node, path, own)

    def layer(self, layer, slots, path, scope):
        for slot in slots:
            collection = () if slot.collection is None else (slot.collection,)
            external = (*collection, *scope, slot.name)
            if slot.in_state:
                self.entries.append(
                    Entry(
                        external,
                        path + (GetAttrKey("state_index"),),
                        slot.layout,
                        slot.field,
                    )
                )
            else:
                self.entries.append(
                    Entry(external, path + (GetAttrKey(slot.field),), slot.layout)
                )


def pair(model: eqx.Module, mapping: NameMapping | None, naming: Naming) -> Pairing:
    """Pairs every variable of the other framework that the model corresponds to
    with its Equinox leaf.

    `mapping` maps a scope, relative to the collections and joined with
    `naming.separator` (`"ResNetBlock_0/conv_proj"`, no `params/` prefix, in linen;
    `"layer1.0.conv1"` in PyTorch), to a function selecting part of the model:

    - a layer of a known kind, or any module: it and its contents take that scope
        (its own children are named automatically inside it);
    - an array: it is the parameter at that path (`"my_scope/w"`), unchanged;
    - `None` instead of a function: nothing is paired under that scope: its
        variables are not read, and the model's leaves named there are left as they
        are (e.g. a new classifier head).

    Overridden parts do not take an automatic name, as an explicitly named Flax
    module does not advance the counter of its class.

    **Raises:**

    - `ValueError`: for an empty scope, a selector that fails or returns
        something that is not a module or array of `model`, or appears twice.
    """
    selected: dict[int, tuple[str, ...]] = {}
    ignored: list[tuple[str, ...]] = []
    names: dict[int, str] = {}
    for scope, select in (mapping or {}).items():
        parts = _split(scope, naming)
        if select is None:
            ignored.append(parts)
            continue
        try:
            target = select(model)
        except Exception as e:
            raise ValueError(
                f"mapping[{scope!r}]: the selector raised {type(e).__name__}: {e}. "
                "Expected a function like `lambda m: m.head` returning part of the "
                "model."
            ) from e
        if not (is_arraylike(target) or isinstance(target, eqx.Module)):
            raise ValueError(
                f"mapping[{scope!r}]: the selector returned {describe(target)}; "
                "expected a module or an array of the model."
            )
        if id(target) in selected:
            raise ValueError(
                f"mapping: {scope!r} and {names[id(target)]!r} select the same part of "
                f"the model; each part can have one {naming.framework} scope."
            )
        selected[id(target)] = parts
        names[id(target)] = scope
    walker = _Walker(selected, naming)
    rule = rule_for(model, naming.rules)
    if not naming.numbered:
        walker.visit_attribute(model, (), ())
    elif rule is not None:
        # A bare layer is the root scope, as a bare `nn.Dense` is in Flax.
        walker.layer(model, rule.slots(model), (), ())
    elif isinstance(model, eqx.nn.Sequential):
        # A top-level `nn.Sequential` names its layers by position: `layers_0`, ...
        walker.visit(
            model.layers, (GetAttrKey("layers"),), (), Counter(), "layers", "layers"
        )
    else:
        walker.module(model, (), ())
    for ident, scope in names.items():
        if walker.found[ident] != 1:
            where = (
                "appears more than once in the model"
                if walker.found[ident]
                else "is not part of the model (or lies inside a layer that is "
                "converted as a whole)"
            )
            raise ValueError(
                f"mapping[{scope!r}]: the selected object {where}; select a field of "
                "the model passed in, e.g. `lambda m: m.blocks[0].conv`."
            )
    return Pairing(tuple(walker.entries), tuple(ignored), tuple(walker.problems))


def _under(
    path: tuple[str, ...], scopes: tuple[tuple[str, ...], ...], naming: Naming
) -> bool:
    # An ignored scope excludes its whole subtree; in linen paths start with the
    # collection, which scopes in `mapping` leave out.
    start = 1 if naming.collections else 0
    return any(path[start : start + len(s)] == s for s in scopes)


def _target(entry: Entry, model: eqx.Module, state: eqx.nn.State) -> Any:
    """The Equinox leaf an entry fills (a model array or a field of a State entry)."""
    node = get_at(model, entry.model_path)
    if entry.state_field is None:
        return node
    try:
        stats = state.get(node)
    except KeyError:
        raise ConversionError(
            f"The State has no entry for {entry.eqx_name.split('].')[0]}]: it was not "
            "made for this model. Build the two together with "
            "`eqx.nn.make_with_state(Model)(...)`."
        ) from None
    return getattr(stats, entry.state_field)


def _numpy_or_none(value: Any) -> np.ndarray | None:
    """`value` as a numpy array, or `None` when it is not array-like (reported as a
    mismatch by the caller rather than raised here)."""
    try:
        return np.asarray(value)
    except Exception:
        return None


def _fix_hint(strict: bool, naming: Naming) -> str:
    hint = (
        f"See the pairing with `{naming.paths_function}(model)`; change it with "
        "`mapping=`"
    )
    return hint + (
        ", or pass strict=False to load only what matches." if strict else "."
    )


def load_pairs(
    model: eqx.Module,
    state: eqx.nn.State,
    flat: Mapping[tuple[str, ...], Any],
    pairing: Pairing,
    naming: Naming,
    *,
    strict: bool,
    cast: bool,
    extra: Sequence[tuple[str, str]] = (),
) -> tuple[eqx.Module, eqx.nn.State]:
    """The engine under every `load_*`: checks every pair, then builds.

    **Arguments:**

    - `model`, `state`: as for `load_flax`; not modified.
    - `flat`: the checkpoint's arrays by path (`("params", "Dense_0", "kernel")`, or
        `("layer1", "0", "bn1", "weight")`), as `pairing`'s entries name them.
    - `pairing`: `pair(model, mapping, naming)`.
    - `naming`: the naming scheme, for the messages.
    - `strict`, `cast`: as for `load_flax`.
    - `extra`: what the checkpoint holds beside the model's variables and is not
        to be ignored, as `(name, kind)`; `kind` is `"entry"` (a top-level entry
        such as a TrainState's `step`), `"rng"` (NNX random streams),
        `"intermediate"` (NNX `sow`n values) or `"optimizer"` (`nnx.Optimizer`
        state). Reported, with the hint to skip them.

    **Returns:**

    New `(model, state)` with exactly the original structure, shapes and dtypes.

    **Raises:**

    - `ConversionError`: listing every problem, before anything is built.
    """
    entries = [
        e for e in pairing.entries if not _under(e.path, pairing.ignored, naming)
    ]
    wanted = {e.path for e in entries}
    sep = naming.separator

    missing, mismatched, loaded = [], [], []
    castable = False
    for entry in entries:
        target = _target(entry, model, state)
        want_shape = entry.layout.external_shape(tuple(target.shape))
        want = describe(jax.ShapeDtypeStruct(want_shape, target.dtype))
        where = f"{entry.name(sep)} -> {entry.eqx_name}"
        if entry.path not in flat:
            if strict:
                missing.append(f"{where}: expected {want}")
            continue
        value = _numpy_or_none(flat[entry.path])
        if value is None or value.dtype == object:
            got = describe(flat[entry.path])
            mismatched.append(f"{where}: expected {want}, got {got}")
            continue
        bad_shape = tuple(value.shape) != tuple(want_shape)
        bad_dtype = value.dtype != np.dtype(target.dtype) and not cast
        if bad_shape or bad_dtype:
            castable = castable or not bad_shape
            relaid = bad_shape and entry.layout.name != "identity"
            note = f" (in {naming.framework}'s layout)" if relaid else ""
            mismatched.append(f"{where}: expected {want}{note}, got {describe(value)}")
            continue
        loaded.append((entry, value, target))

    unexpected = []
    if strict:
        for path, value in flat.items():
            if path not in wanted and not _under(path, pairing.ignored, naming):
                arr = _numpy_or_none(value)
                got = describe(value if arr is None else arr)
                unexpected.append(f"{sep.join(path)}: {got}")
        unexpected.sort(key=natural_key)
    unsupported = list(pairing.problems) if strict else []

    if missing or unexpected or mismatched or extra or unsupported:
        raise _error(
            type(model).__name__,
            naming,
            strict,
            missing,
            unexpected,
            mismatched,
            list(extra),
            unsupported,
            castable=castable,
        )
    return _build(model, state, loaded)


_EXTRA_HEADINGS = {
    "entry": "Entries other than {} (the rest of a saved TrainState?)",
    "rng": (
        "NNX random-stream state (`nnx.Rngs` keys and counts; an Equinox model "
        "holds none, its calls take keys)"
    ),
    "intermediate": "NNX intermediates (values stored with `sow`, not parameters)",
    "optimizer": "`nnx.Optimizer` state (the optimiser's, not the model's)",
}
_EXTRA_NAMES = {
    "rng": "random-stream state",
    "intermediate": "intermediate",
    "optimizer": "optimizer state",
}


def _error(
    name,
    naming,
    strict,
    missing,
    unexpected,
    mismatched,
    extras,
    unsupported,
    castable=False,
):
    source = naming.source
    sections = [
        (f"Missing from the {source} (the model needs them)", missing),
        (
            f"Unexpected in the {source} (nothing in the model pairs with them)",
            unexpected,
        ),
        ("Mismatched shape or dtype", mismatched),
        ("Layers with no conversion rule", unsupported),
    ]
    count = len(missing) + len(unexpected) + len(mismatched) + len(unsupported)
    lines = [f"Cannot load the {source} into {name}:"]
    for title, items in sections:
        if items:
            lines.append(f"{title}:")
            lines += [f"  {item}" for item in items]
    if extras:
        count += len(extras)
        groups = []
        for kind, heading in _EXTRA_HEADINGS.items():
            names = [entry for entry, of in extras if of == kind]
            if names:
                heading = heading.format("/".join(naming.collections) or "variables")
                groups.append(f"{heading}: {', '.join(names)}")
        them = "it" if len(extras) == 1 else "them"
        lines += [f"{group}." for group in groups[:-1]]
        lines.append(f"{groups[-1]}; pass ignore_extra=True to skip {them}.")
    lines.insert(1, f"{count} problem{'s' if count != 1 else ''}.")
    if castable:
        lines.append(
            "Some mismatches are of dtype alone: pass cast=True to convert them."
        )
    if count > len(extras):  # the pairing itself is at fault, not only extras
        lines.append(_fix_hint(strict, naming))
    return ConversionError(
        "\n".join(lines),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
        extra=tuple(
            name if kind == "entry" else f"{name} ({_EXTRA_NAMES[kind]})"
            for name, kind in extras
        ),
        unsupported=tuple(unsupported),
        castable=castable,
    )


def _build(model, state, loaded):
    """One `eqx.tree_at` for the model's leaves and one for the State's."""
    in_model = [(e, v, t) for e, v, t in loaded if e.state_field is None]
    in_state = [(e, v, t) for e, v, t in loaded if e.state_field is not None]

    def value(entry, array, target):
        array = entry.layout.to_eqx(array, tuple(target.shape))
        return jnp.asarray(np.asarray(array).astype(np.dtype(target.dtype), copy=False))

    if in_model:
        model = eqx.tree_at(
            lambda m: [get_at(m, e.model_path) for e, _, _ in in_model],
            model,
            replace=[value(*item) for item in in_model],
        )
    else:
        model = _copy(model)
    indices = [get_at(model, e.model_path) for e, _, _ in in_state]
    if in_state:
        state = eqx.tree_at(
            lambda s: [
                getattr(s.get(i), e.state_field)
                for i, (e, _, _) in zip(indices, in_state)
            ],
            state,
            replace=[value(*item) for item in in_state],
        )
    else:
        state = _copy(state)
    return model, state


def _copy(tree):
    # A fresh object even when nothing changed: the caller may `State.set` on the
    # result, which invalidates the object it is called on, not the input.
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def export_pairs(
    model: eqx.Module, state: eqx.nn.State, pairing: Pairing, naming: Naming
) -> dict[tuple[str, ...], np.ndarray]:
    """The engine under every `export_*`: each paired leaf in the other layout.

    **Returns:**

    `{path: numpy array}` in the model's order, scopes `mapping` ignores left out.

    **Raises:**

    - `ConversionError`: when the model has layers with no conversion rule.
    """
    if pairing.problems:
        raise _error(
            type(model).__name__, naming, True, [], [], [], [], pairing.problems
        )
    # `np.asarray(order="C")`, not `np.ascontiguousarray`, which makes a 0-d
    # parameter 1-d.
    return {
        entry.path: np.asarray(
            entry.layout.to_external(np.asarray(_target(entry, model, state))),
            order="C",
        )
        for entry in pairing.entries
        if not _under(entry.path, pairing.ignored, naming)
    }


def paths_of(pairing: Pairing, naming: Naming, model_name: str) -> dict[str, str]:
    """The engine under every `*_paths`: each external name -> its Equinox leaf.

    **Raises:**

    - `ConversionError`: when the model has layers with no conversion rule.
    """
    if pairing.problems:
        raise _error(model_name, naming, True, [], [], [], [], pairing.problems)
    return {
        e.name(naming.separator): e.eqx_name
        for e in pairing.entries
        if not _under(e.path, pairing.ignored, naming)
    }

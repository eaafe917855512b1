"""Another framework's variable names <-> Equinox leaves: the automatic pairing and
explicit overrides, for every naming scheme (a `Naming`).

The Equinox model is walked in field order (and list order). Two ways of naming exist:

- Flax linen's (`LINEN`, `numbered=True`): each layer of a known kind gets the name
    Flax's `@nn.compact` would give it in the current scope, `<Kind>_<n>` counted per
    kind (`Dense_0`, `Conv_1`, `BatchNorm_0`); any other module becomes a scope
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
overrides any of it from the outside.
"""

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
from jax.tree_util import DictKey, GetAttrKey, SequenceKey, keystr

from .layers import (
    IDENTITY,
    LINEN_RULES,
    UNSUPPORTED_HINTS,
    Layout,
    Rule,
    is_unsupported_layer,
    rule_for,
)

FLAX_NAME = "flax_name"
"""The `eqx.field` metadata key with which a field declares its Flax linen name."""

Key = GetAttrKey | SequenceKey | DictKey
NameMapping = Mapping[str, Callable[[Any], Any] | None]
"""Overrides of the automatic pairing: scope -> selector or `None` (see `pair`)."""
FlaxMapping = NameMapping


@dataclasses.dataclass(frozen=True)
class Naming:
    """How another framework names a model's variables.

    - `framework`: its name in messages (`"Flax"`, `"Flax NNX"`, `"PyTorch"`).
    - `source`: what the values come in, in messages (`"Flax variables"`).
    - `separator`: joins a path's parts in printed names (`"/"`, or `"."`).
    - `collections`: the top-level collections paths start with (linen's
        `("params", "batch_stats")`), or `()`.
    - `rules`: the layer kinds known to it and their variables (`layers.Rule`).
    - `numbered`: Flax linen's automatic `Kind_n` names; otherwise attribute names.
    - `sequential`: with attribute names, the scope an `eqx.nn.Sequential`'s layers
        sit under before their index (`("layers",)` in NNX, `()` in PyTorch).
    - `metadata_key`: the `eqx.field` metadata key declaring a field's name.
    - `paths_function`: the public function that shows the pairing, for hints.
    """

    framework: str
    source: str
    separator: str
    collections: tuple[str, ...]
    rules: tuple[Rule, ...]
    numbered: bool
    sequential: tuple[str, ...]
    metadata_key: str
    paths_function: str


LINEN = Naming(
    framework="Flax",
    source="Flax variables",
    separator="/",
    collections=("params", "batch_stats"),
    rules=LINEN_RULES,
    numbered=True,
    sequential=(),
    metadata_key=FLAX_NAME,
    paths_function="eqx_bn.interop.flax_paths",
)
"""Flax linen: `params`/`batch_stats` collections and automatic `Kind_n` names."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One variable of the other framework paired with one Equinox leaf.

    - `path`: `(collection, *scopes, name)`, e.g.
        `("params", "ResNetBlock_0", "Conv_0", "kernel")`, without the collection
        where the naming has none (`("layer1", "0", "bn1", "running_var")`).
    - `model_path`: the path in the model of the leaf or, when `state_field` is
        set, of the layer's `state_index`.
    - `state_field`: `"mean"`/`"var"` for a leaf of a `RunningStats` in the State.
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
            self.entries.append(Entry(("params", *flax_path), path, IDENTITY))
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
        if rule is not None:
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


def pair(
    model: eqx.Module, mapping: NameMapping | None = None, naming: Naming = LINEN
) -> Pairing:
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
                f"mapping[{scope!r}]: the selector returned a {type(target).__name__}; "
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

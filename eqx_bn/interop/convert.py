"""Another framework's variables <-> an Equinox model and its State.

The engine (`load_pairs`, `export_pairs`) serves every naming scheme; `load_flax`,
`export_flax` and `flax_paths` are its Flax linen front-end. The data path: nested
dicts of arrays -> `paths.pair` pairs each variable with a leaf of the model (or a
`RunningStats` field in the State) -> every pair is checked -> `layers` re-lays each
array -> one `eqx.tree_at` for the model and one for the State. Nothing of Flax is
imported here.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._typing import typecheck
from .paths import (
    LINEN,
    Entry,
    FlaxMapping,
    Naming,
    Pairing,
    get_at,
    natural_key,
    pair,
)

COLLECTIONS = ("params", "batch_stats")
"""The Flax collections a model and its State correspond to."""


class ConversionError(ValueError):
    """A checkpoint's variables (Flax, NNX, PyTorch) and an Equinox model do not
    correspond.

    Raised once, listing every problem with its Flax path, the Equinox leaf it is
    paired with, and the expected and actual shape and dtype. Nothing is loaded when
    it is raised. It subclasses `ValueError`, so `except ValueError` catches it too.

    **Attributes** (tuples of strings, one line per problem):

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
    ):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        self.extra = extra
        self.unsupported = unsupported
        self.castable = castable
        self.prefix = prefix


def _describe(shape, dtype) -> str:
    return f"{np.dtype(dtype).name}[{', '.join(map(str, shape))}]"


def _flatten(tree: Mapping, prefix: tuple[str, ...]) -> dict[tuple[str, ...], Any]:
    flat = {}
    for k, v in tree.items():
        path = (*prefix, str(k))
        if isinstance(v, Mapping):
            flat.update(_flatten(v, path))
        else:
            flat[path] = v
    return flat


def _has_variables_in_params(variables: Mapping, pairing: Pairing) -> bool:
    """`{'params': {'params': ..., 'batch_stats': ...}}`: a whole `variables` dict
    given to `TrainState.create(params=variables)`, which Flax users do.

    Not when the model itself has a top-level scope called `params`.
    """
    inner = variables.get("params")
    if not isinstance(inner, Mapping) or "params" not in inner:
        return False
    if not set(inner) <= set(COLLECTIONS):
        return False
    if "batch_stats" in inner and "batch_stats" in variables:
        return False
    return not any(e.path[1] == "params" for e in pairing.entries)


def _split_variables(
    variables: Mapping, pairing: Pairing
) -> tuple[dict[tuple[str, ...], Any], list[tuple[str, str]]]:
    """The Flax leaves of `params`/`batch_stats`, and the other entries as
    `(name, "entry")` (see `load_pairs`'s `extra`)."""
    if _has_variables_in_params(variables, pairing):
        outer = {k: v for k, v in variables.items() if k != "params"}
        variables = {**outer, **variables["params"]}
    flat: dict[tuple[str, ...], Any] = {}
    extra = []
    for name, tree in variables.items():
        if name not in COLLECTIONS:
            extra.append(str(name))
        elif isinstance(tree, Mapping):
            flat.update(_flatten(tree, (name,)))
        else:
            flat[(name,)] = tree
    return flat, [(name, "entry") for name in sorted(extra, key=natural_key)]


def _under(
    path: tuple[str, ...], scopes: tuple[tuple[str, ...], ...], naming: Naming
) -> bool:
    # An ignored scope excludes its whole subtree; in linen paths start with the
    # collection, which scopes in `mapping` leave out.
    start = 1 if naming.collections else 0
    return any(path[start : start + len(s)] == s for s in scopes)


def _target(entry: Entry, model: eqx.Module, state: eqx.nn.State) -> Any:
    """The Equinox leaf an entry fills (a model array or a RunningStats field)."""
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


@typecheck
def load_flax(
    model: eqx.Module,
    state: eqx.nn.State,
    variables: Mapping,
    *,
    mapping: FlaxMapping | None = None,
    strict: bool = True,
    ignore_extra: bool = False,
    cast: bool = False,
    layout: Literal["auto", "linen", "nnx"] = "auto",
) -> tuple[eqx.Module, eqx.nn.State]:
    """Loads Flax variables (linen) or state (NNX) into an Equinox model and its State.

    The model gives the structure, shapes and dtypes; the Flax variables give the
    values. Layers pair up by Flax's automatic names (see `flax_paths`): `Dense` <->
    `eqx.nn.Linear` (kernel transposed), `Conv` <-> `eqx.nn.Conv*` (`HWIO` -> `OIHW`,
    bias `(out,)` -> `(out, 1, 1)`), `BatchNorm` <-> `eqx_bn.BatchNorm` (the running
    `mean`/`var` go into the State), `LayerNorm`, `GroupNorm`, `RMSNorm` (scale
    <-> weight), `Embed` <-> `eqx.nn.Embedding`, and a plain array field of a
    custom module <-> `self.param(field_name)`. Other Equinox layers with
    parameters (`ConvTranspose`, `MultiheadAttention`, `eqx.nn.BatchNorm`...) are
    reported; pair their arrays through `mapping`.

    !!! Example

        ```python
        variables = eqx_bn.interop.read_msgpack("flax_checkpoint.msgpack")
        model, state = eqx.nn.make_with_state(ResNet18)(num_classes=10, key=key)
        model, state = eqx_bn.interop.load_flax(model, state, variables)
        ```

    **Arguments:**

    - `model`: the Equinox model; it is not modified.
    - `state`: its `eqx.nn.State` (from `eqx.nn.make_with_state`); not modified.
    - `variables`: `{"params": ..., "batch_stats": ...}` as nested dicts of numpy or
        JAX arrays (from `flax.serialization.msgpack_restore`, `read_msgpack`, or
        `Module.init`), or a saved TrainState (`params`, `batch_stats`, `step`,
        `opt_state`, ...; also with the whole variables dict passed as `params`);
        or Flax NNX state, `{"dense_0": {"kernel": ...}, "norm": {...}, ...}`
        (see `layout`).
    - `mapping`: overrides of the automatic pairing, `{flax_scope: selector}`:
        `{"head": lambda m: m.classifier}` pairs the Flax scope `head` (no
        collection prefix) with that module or array; `None` as selector leaves the
        scope out on both sides. See `eqx_bn.interop.paths.pair`.
    - `strict`: require every paired model leaf to be in `variables` and every
        Flax variable to be used. With `strict=False` model leaves without a Flax
        value keep their current value, unused Flax variables are skipped and
        layers with no conversion rule are left as they are; shapes and dtypes
        are still checked.
    - `ignore_extra`: skip top-level entries other than `params`/`batch_stats`
        (the rest of a TrainState), and NNX random-stream state, instead of
        raising.
    - `cast`: convert values whose dtype differs from the model's (e.g. a float64
        or bfloat16 checkpoint into a float32 model) instead of raising.
        Shapes must still agree.
    - `layout`: `"linen"` or `"nnx"` to say what `variables` are; `"auto"` (the
        default) tells them apart: linen variables have a `params` collection at
        the top, NNX state (`nnx.state(model)`, `nnx.to_pure_dict` of it, or their
        msgpack/Orbax restores, with string indices or `{"value": array}` leaves)
        is named by attribute. NNX state pairs by field name (list items by index,
        an `eqx.nn.Sequential`'s under `layers`; see `nnx_paths`), and its random
        streams (`nnx.Rngs` state) count as extra entries. See `docs/nnx.md`.

    **Returns:**

    `(model, state)`: new objects with exactly the original structure, shapes and
    dtypes, holding the Flax values.

    !!! Tip

        The model is only read for its structure, shapes and dtypes, so it can be
        abstract, which skips the random initialisation of a large model:
        `model, state = eqx.filter_eval_shape(eqx.nn.make_with_state(ResNet18),
        10, key=key)`. (With `strict=False`, leaves without a Flax value then
        stay `jax.ShapeDtypeStruct`s.)

    **Raises:**

    - `ConversionError`: listing every missing, unexpected, mis-shaped or mistyped
        variable (with Flax path, Equinox leaf, expected and actual shape/dtype),
        unknown top-level entries, and layers with no conversion rule.
    - `ValueError`: for a `mapping` whose selectors do not pick part of the model.
    """
    from .nnx import choose_layout, load_nnx  # nnx.py builds on this module

    if choose_layout(variables, model, mapping, layout) == "nnx":
        return load_nnx(
            model,
            state,
            variables,
            mapping=mapping,
            strict=strict,
            ignore_extra=ignore_extra,
            cast=cast,
            detected=layout == "auto",
        )
    pairing = pair(model, mapping)
    flat, extra = _split_variables(variables, pairing)
    return load_pairs(
        model,
        state,
        flat,
        pairing,
        LINEN,
        strict=strict,
        cast=cast,
        extra=() if ignore_extra else extra,
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
    - `pairing`: `paths.pair(model, mapping, naming)`.
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
        want = _describe(want_shape, target.dtype)
        where = f"{entry.name(sep)} -> {entry.eqx_name}"
        if entry.path not in flat:
            if strict:
                missing.append(f"{where}: expected {want}")
            continue
        value = _numpy_or_none(flat[entry.path])
        if value is None or value.dtype == object:
            got = type(flat[entry.path]).__name__
            mismatched.append(f"{where}: expected {want}, got a {got}")
            continue
        bad_shape = tuple(value.shape) != tuple(want_shape)
        bad_dtype = value.dtype != np.dtype(target.dtype) and not cast
        if bad_shape or bad_dtype:
            castable = castable or not bad_shape
            relaid = bad_shape and entry.layout.name != "identity"
            note = f" (in {naming.framework}'s layout)" if relaid else ""
            mismatched.append(
                f"{where}: expected {want}{note}, got "
                f"{_describe(value.shape, value.dtype)}"
                + ("" if bad_shape else "; pass cast=True to convert")
            )
            continue
        loaded.append((entry, value, target))

    unexpected = []
    if strict:
        for path, value in flat.items():
            if path not in wanted and not _under(path, pairing.ignored, naming):
                arr = _numpy_or_none(value)
                got = (
                    type(value).__name__
                    if arr is None
                    else _describe(arr.shape, arr.dtype)
                )
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


@typecheck
def export_flax(
    model: eqx.Module,
    state: eqx.nn.State,
    *,
    mapping: FlaxMapping | None = None,
) -> dict[str, dict]:
    """Writes an Equinox model and its State as Flax variables.

    The inverse of `load_flax`: `load_flax(model, state, export_flax(model, state))`
    gives back the same arrays, and exporting a loaded model gives back the Flax
    variables bit for bit.

    **Arguments:**

    - `model`, `state`: as for `load_flax`.
    - `mapping`: the same overrides as for `load_flax`.

    **Returns:**

    `{"params": ..., "batch_stats": ...}` as nested dicts of numpy arrays in Flax's
    layout (`batch_stats` only when the model has a `BatchNorm`), which
    `flax.linen.Module.apply` and `flax.serialization.to_bytes` accept.

    **Raises:**

    - `ConversionError`: when the model has layers with no conversion rule.
    - `ValueError`: for a `mapping` whose selectors do not pick part of the model.
    """
    variables: dict[str, dict] = {}
    for path, array in export_pairs(model, state, pair(model, mapping), LINEN).items():
        node = variables
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return variables


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


@typecheck
def flax_paths(
    model: eqx.Module, *, mapping: FlaxMapping | None = None
) -> dict[str, str]:
    """The pairing `load_flax` and `export_flax` use, to read and debug it.

    !!! Example

        ```python
        >>> eqx_bn.interop.flax_paths(model)
        {'params/conv_init/kernel': 'model.conv_init.weight',
         'params/bn_init/scale': 'model.bn_init.scale', ...
         'batch_stats/bn_init/mean': 'state[model.bn_init.state_index].mean', ...}
        ```

    **Arguments:**

    - `model`: the Equinox model.
    - `mapping`: overrides, as for `load_flax`.

    **Returns:**

    A dict from each Flax variable path (`collection/scope/.../name`) to the
    Equinox leaf it pairs with, in the model's order. Scopes mapped to `None` are
    left out.

    **Raises:**

    - `ConversionError`: when the model has layers with no conversion rule.
    - `ValueError`: for a `mapping` whose selectors do not pick part of the model.
    """
    return paths_of(pair(model, mapping), LINEN, type(model).__name__)


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

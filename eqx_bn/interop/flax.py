"""Flax's front-end: `load_flax` (linen variables or NNX state), `export_flax` and
`flax_paths` (linen), and the choice between linen and NNX that `load_flax` makes.

Linen variables are nested dicts under the `params`/`batch_stats` collections
(possibly inside a saved `TrainState`); they are flattened here and paired by the
engine with the `LINEN` scheme. NNX state is read by `nnx.py`. Nothing of Flax is
imported here.
"""

from collections.abc import Mapping
from typing import Any, Literal

import equinox as eqx

from .._typing import typecheck
from .engine import (
    ConversionError,
    NameMapping,
    Pairing,
    export_pairs,
    load_pairs,
    natural_key,
    pair,
    paths_of,
)
from .formats.tree import flatten, unflatten
from .nnx import certainly_nnx, load_nnx, nnx_variables
from .schemes import BATCH_STATS, LINEN, NNX, PARAMS

TreeLayout = Literal["auto", "linen", "nnx"]
"""How `load_flax` reads its tree: detected (`"auto"`), linen variables or NNX state."""


def _has_variables_in_params(variables: Mapping, pairing: Pairing) -> bool:
    """`{'params': {'params': ..., 'batch_stats': ...}}`: a whole `variables` dict
    given to `TrainState.create(params=variables)`, which Flax users do.

    Not when the model itself has a top-level scope called `params`.
    """
    inner = variables.get(PARAMS)
    if not isinstance(inner, Mapping) or PARAMS not in inner:
        return False
    if not set(inner) <= set(LINEN.collections):
        return False
    if BATCH_STATS in inner and BATCH_STATS in variables:
        return False
    return not any(e.path[1] == PARAMS for e in pairing.entries)


def _split_variables(
    variables: Mapping, pairing: Pairing
) -> tuple[dict[tuple[str, ...], Any], list[tuple[str, str]]]:
    """The Flax leaves of `params`/`batch_stats`, and the other entries as
    `(name, "entry")` (see `load_pairs`'s `extra`)."""
    if _has_variables_in_params(variables, pairing):
        outer = {k: v for k, v in variables.items() if k != PARAMS}
        variables = {**outer, **variables[PARAMS]}
    collections = {k: v for k, v in variables.items() if k in LINEN.collections}
    flat = flatten(collections)
    extra = [str(name) for name in variables if name not in LINEN.collections]
    return flat, [(name, "entry") for name in sorted(extra, key=natural_key)]


@typecheck
def load_flax(
    model: eqx.Module,
    state: eqx.nn.State,
    variables: Mapping,
    *,
    mapping: NameMapping | None = None,
    strict: bool = True,
    ignore_extra: bool = False,
    cast: bool = False,
    layout: Literal["auto", "linen", "nnx"] = "auto",
) -> tuple[eqx.Module, eqx.nn.State]:
    """Loads Flax variables (linen) or state (NNX) into an Equinox model and its State.

    The model gives the structure, shapes and dtypes; the Flax variables give the
    values. Layers pair up by Flax's automatic names (see `flax_paths`): `Dense` <->
    `eqx.nn.Linear` (kernel transposed), `Conv` <-> `eqx.nn.Conv*` (`HWIO` -> `OIHW`,
    bias `(out,)` -> `(out, 1, 1)`) or `eqx_bn.models.ChannelsLastConv` (as they
    are), `BatchNorm` <-> `eqx_bn.BatchNorm` (the running
    `mean`/`var` go into the State), `LayerNorm`, `GroupNorm`, `RMSNorm` (scale
    <-> weight), `Embed` <-> `eqx.nn.Embedding`, and a plain array field of a
    custom module <-> `self.param(field_name)`. Other Equinox layers with
    parameters (`ConvTranspose`, `MultiheadAttention`, `eqx.nn.BatchNorm`...) are
    reported; pair their arrays through `mapping`.

    Flax's BatchNorm keeps no batch count: a `BatchNorm(momentum=None)` keeps the
    count of the `state` given (0 from `eqx.nn.make_with_state`, so that its next
    training step replaces the loaded averages, as PyTorch's does for a
    state_dict without `num_batches_tracked`); set it with
    `state.set(bn.state_index, eqx_bn.CumulativeStats(mean, var, jnp.int32(n)))`.

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
        collection prefix) with that module or array, which then take that name (a
        module's own children are named automatically inside it); `None` as
        selector leaves the scope out on both sides: its variables are not read,
        and the model's leaves named there keep their values (e.g. a new
        classifier head). See the pairing with [`eqx_bn.interop.flax_paths`][].
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
        streams (`nnx.Rngs` state) count as extra entries. See
        [Flax NNX](../nnx.md).

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
    pairing = pair(model, mapping, LINEN)
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


@typecheck
def export_flax(
    model: eqx.Module,
    state: eqx.nn.State,
    *,
    mapping: NameMapping | None = None,
) -> dict[str, dict]:
    """Writes an Equinox model and its State as Flax variables.

    The inverse of `load_flax`: `load_flax(model, state, export_flax(model, state))`
    gives back the same arrays, and exporting a loaded model gives back the Flax
    variables bit for bit. The batch count of a `BatchNorm(momentum=None)` is left
    out: Flax's BatchNorm has none (and no cumulative average); its running mean
    and variance, all that inference needs, are written.

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
    return unflatten(
        export_pairs(model, state, pair(model, mapping, LINEN), LINEN).items()
    )


@typecheck
def flax_paths(
    model: eqx.Module, *, mapping: NameMapping | None = None
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
    return paths_of(pair(model, mapping, LINEN), LINEN, type(model).__name__)


# -- Linen or NNX --------------------------------------------------------------


def _fits(flat: Mapping, pairing) -> bool:
    return bool(flat) and set(flat) == {e.path for e in pairing.entries}


def choose_layout(
    variables: Mapping,
    model: eqx.Module,
    mapping: NameMapping | None,
    layout: TreeLayout,
) -> Literal["linen", "nnx"]:
    """Whether `load_flax` reads `variables` as linen variables or NNX state.

    Linen variables have a `params` collection at the top; NNX state never does,
    unless the model has an attribute called `params` (or `batch_stats`). Only then
    is the tree ambiguous, and the layout that pairs with the model exactly wins.

    **Raises:**

    - `ConversionError`: an ambiguous tree that fits both layouts or neither.
    """
    if layout != "auto":
        return layout
    if certainly_nnx(variables) or not isinstance(variables.get(PARAMS), Mapping):
        return "nnx"
    nnx_pairing = pair(model, mapping, NNX)
    clash = sorted({e.path[0] for e in nnx_pairing.entries} & set(LINEN.collections))
    if not clash:
        return "linen"
    linen_pairing = pair(model, mapping, LINEN)
    linen_flat = _split_variables(variables, linen_pairing)[0]
    fits = [
        name
        for name, ok in (
            ("linen", _fits(linen_flat, linen_pairing)),
            ("nnx", _fits(nnx_variables(variables, nnx_pairing)[0], nnx_pairing)),
        )
        if ok
    ]
    if len(fits) == 1:
        return fits[0]
    raise ConversionError(
        "Cannot tell whether these are Flax linen variables or NNX state: they have "
        f"a top-level `params`, as linen variables do, and {type(model).__name__} "
        f"has an attribute `{clash[0]}`, which NNX state has at the top; they pair "
        f"with {'both' if fits else 'neither'} exactly. Pass layout='linen' or "
        "layout='nnx' to load_flax (--layout on the command line)."
    )

"""`eqx_bn.BatchNorm`: Flax's `nn.BatchNorm` numerics as an Equinox stateful layer.

The layer reads its configuration, checks it, its input and its State, and hands
arrays to `_numerics`. The checks look only at Python values, shapes and dtypes, so
under `jax.jit` they run once, at trace time, and add nothing to the compiled step.
Each error says what it got, what was expected and the likely fix
(`"BatchNorm: ..."`).
"""

import contextlib
import math
import operator
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, Shaped

from ._describe import describe
from ._numerics import (
    Config,
    Moments,
    Renorm,
    Update,
    align_mask,
    axis_names,
    drop_unit_axes,
    isolates_passes,
    normalize,
    promote,
    train,
    train_statistics,
    unbound_axes,
    update_entry,
)
from ._typing import AxisIndexGroups, AxisName, Initializer, typecheck


class RunningStats(NamedTuple):
    """The running averages that a [`BatchNorm`][eqx_bn.BatchNorm] keeps in its
    `eqx.nn.State`: `state.get(bn.state_index)`.

    **Fields:**

    - `mean`: the running mean of each channel, shape `(input_size,)`; starts at 0.
    - `var`: the running variance of each channel, shape `(input_size,)`; starts
        at 1.

    Both are float32 (or the layer's `param_dtype` when it is built with
    `force_float32_reductions=False`). Flax keeps the same two arrays in
    `variables["batch_stats"]` as `mean` and `var`.
    """

    mean: Float[Array, " input_size"]
    var: Float[Array, " input_size"]


class CumulativeStats(NamedTuple):
    """What a `BatchNorm(momentum=None)` keeps in its `eqx.nn.State`: the running
    averages and the number of batches they average.

    PyTorch keeps the same three in a BatchNorm's buffers: `running_mean`,
    `running_var` and `num_batches_tracked` (int64 there, int32 here). A training
    step counts its batch first and then moves each average by `1 / num_batches`
    of the way to the batch's value, so every batch weighs the same.
    """

    mean: Float[Array, " input_size"]
    var: Float[Array, " input_size"]
    num_batches: Int[Array, ""]


class RenormStats(NamedTuple):
    """The statistics that a `BatchNorm(renorm=True)` keeps in its `eqx.nn.State`:
    Keras's five, `moving_mean`, `moving_variance`, `moving_stddev`, `renorm_mean`
    and `renorm_stddev`, here `mean`, `var`, `stddev`, `renorm_mean` and
    `renorm_stddev` (initially 0, 1, 1, 0, 1).

    `renorm_mean` and `renorm_stddev` (moving averages with `renorm_momentum`)
    measure a training batch's correction; `mean` and `stddev` (with `momentum`)
    are for inference, which uses `mean` and `var = stddev**2 - eps`.
    """

    mean: Float[Array, " input_size"]
    var: Float[Array, " input_size"]
    stddev: Float[Array, " input_size"]
    renorm_mean: Float[Array, " input_size"]
    renorm_stddev: Float[Array, " input_size"]


ENTRY_KINDS = {
    RunningStats: "a layer with a momentum (renorm=False)",
    CumulativeStats: "a momentum=None layer",
    RenormStats: "a renorm=True layer",
}
"""Every kind of State entry that a `BatchNorm` keeps for its statistics, and the
layer that keeps it: `BatchNorm.entry_kind` says which is a layer's. Whatever
rewrites State entries (the layer, `recalibrate`, accumulation, interop) handles
each of them, or refuses a layer clearly."""


class RenormClipping(NamedTuple):
    """Batch Renormalization's bounds, scalars in the `eqx.nn.State` of a
    `BatchNorm(renorm=True)` under `clipping_index`: `r` is clipped to
    `[rmin, rmax]` and `d` to `[-dmax, dmax]`. No bound on a side is `rmin = 0`,
    `rmax = inf`, `dmax = inf`. Set them with
    [`eqx_bn.set_renorm_clipping`][], inside a jitted step too: new values need no
    new trace.
    """

    rmin: Float[Array, ""]
    rmax: Float[Array, ""]
    dmax: Float[Array, ""]


CLIPPING_KEYS = ("rmax", "rmin", "dmax")
"""The keys of `renorm_clipping`, as Keras's."""


FROZEN = ("statistics", "all")
"""What `BatchNorm(frozen=...)` may fix, besides `None`: its running statistics, or
those and its scale and bias."""


class Pooling(NamedTuple):
    """A BatchNorm's State entry for the length of a step that accumulates
    micro-batches (`eqx_bn.train`'s `accumulate=k`); users never see one.

    - `running`: the running statistics as they were before the step, kept as
        they are until its end (a `RunningStats` or `CumulativeStats`: Batch
        Renormalization and Ghost BatchNorm layers do not pool);
    - `pooled`: `(count, mean, m2)` per channel of every element the layer saw in
        the step so far (`m2` the sum of squared deviations from the mean);
    - `normalize_with`: `None` to normalise each micro-batch with its own
        statistics, or the `(mean, biased variance)` of the whole batch to
        normalise every micro-batch with.
    """

    running: Any
    pooled: tuple[Array, Array, Array]
    normalize_with: tuple[Array, Array] | None


# ------------------------------------------------------------ configuration


def _number(name: str, value: Any) -> float:
    """`value` as a float, or the library's error for something that is not one.

    Anything `float()` takes except text and bools: Python and NumPy numbers, and
    concrete JAX scalars (from a hyperparameter sweep, say)."""
    try:
        if isinstance(value, (bool, str, bytes)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"BatchNorm: {name} must be a real number, got {value!r} "
            f"({type(value).__name__})."
        ) from None


def _count(value: Any) -> int | None:
    """`value` as an int if it is an integer (not a bool or a float), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _floating_dtype(name: str, dtype: Any) -> None:
    if dtype is None:
        return
    try:
        d = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(
            f"BatchNorm: {name} must be a floating-point dtype, got {dtype!r}."
        ) from err
    if not jnp.issubdtype(d, jnp.floating):
        # Flax raises "Dtype must be inexact"; an integer output dtype would
        # truncate the normalised values to a handful of integers.
        raise ValueError(
            f"BatchNorm: {name} must be a floating-point dtype (float32, bfloat16, "
            f"float16, ...), got {d.name}: a normalised output is not an integer. "
            "Leave dtype=None to follow x, or cast the layer's output afterwards."
        )


def check_config(
    input_size: Any,
    momentum: Any,
    eps: Any,
    dtype: Any,
    param_dtype: Any,
    frozen: Any = None,
) -> int:
    """Raises a ValueError for a configuration `BatchNorm.__init__` cannot honour;
    returns `input_size` as an `int` (it may be a NumPy or JAX integer)."""
    size = _count(input_size)
    if size is None or size <= 0:
        raise ValueError(
            f"BatchNorm: input_size must be a positive int, got {input_size!r}."
        )
    if momentum is not None:
        if isinstance(momentum, str):
            raise ValueError(
                f"BatchNorm: momentum must be a real number, got {momentum!r} (str); "
                "or None for a cumulative average (PyTorch's momentum=None)."
            )
        m = _number("momentum", momentum)
        if not 0.0 <= m <= 1.0:  # NaN fails both comparisons
            raise ValueError(
                f"BatchNorm: momentum must be in [0, 1], got {momentum} (or None "
                "for a cumulative average, PyTorch's momentum=None)."
            )
    e = _number("eps", eps)
    if not (e >= 0 and math.isfinite(e)):
        raise ValueError(f"BatchNorm: eps must be >= 0 and finite, got {eps}.")
    _floating_dtype("dtype", dtype)
    _floating_dtype("param_dtype", param_dtype)
    if frozen is not None and (not isinstance(frozen, str) or frozen not in FROZEN):
        raise ValueError(
            f"BatchNorm: frozen must be 'statistics', 'all' or None, got {frozen!r}: "
            "'statistics' normalises with the running statistics and never updates "
            "them, 'all' fixes the scale and bias too. eqx_bn.freeze_batch_norms "
            "sets it on every BatchNorm of a model."
        )
    return size


# -------------------------------------------------------------------- input


def check_bounds(
    rmin: float | None, rmax: float | None, dmax: float | None, where: str
) -> None:
    """Keras's checks on clipping bounds (those given: None is no bound)."""
    if rmin is not None and rmax is not None and rmax < rmin:
        raise ValueError(
            f"{where}: Batch Renormalization's clipping needs rmax >= rmin, got "
            f"rmax={rmax} and rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            f"{where}: Batch Renormalization's clipping needs dmax >= 0, got "
            f"dmax={dmax}."
        )


def check_variants(
    renorm: Any,
    renorm_clipping: Any,
    renorm_momentum: Any,
    virtual_batch_size: Any,
    momentum: Any,
) -> tuple[dict[str, float], int | None]:
    """Raises a ValueError for Batch Renormalization or Ghost BatchNorm settings
    that `BatchNorm.__init__` cannot honour: Keras's checks on `renorm_clipping`
    (unknown keys, `rmax < rmin`, `dmax < 0`), settings that would be ignored
    without `renorm=True`, and a `virtual_batch_size` that is not a positive int.
    Returns the clipping bounds given, as floats, and `virtual_batch_size`."""
    if virtual_batch_size is not None:
        size = _count(virtual_batch_size)
        if size is None or size <= 0:
            raise ValueError(
                "BatchNorm: virtual_batch_size must be a positive int (the examples "
                f"per virtual batch) or None, got {virtual_batch_size!r}."
            )
        virtual_batch_size = size
    if not renorm:
        if renorm_clipping:
            raise ValueError(
                "BatchNorm: renorm_clipping is given but renorm is False: the bounds "
                "apply to Batch Renormalization only. Pass renorm=True, or leave "
                "renorm_clipping out."
            )
        if renorm_momentum != 0.99:
            raise ValueError(
                f"BatchNorm: renorm_momentum={renorm_momentum!r} is given but renorm "
                "is False: it drives Batch Renormalization's statistics only. Pass "
                "renorm=True, or leave renorm_momentum out."
            )
        return {}, virtual_batch_size
    if momentum is None:
        raise ValueError(
            "BatchNorm: renorm=True needs a momentum for the moving statistics it "
            "infers with (Keras's renorm has no cumulative average); got "
            "momentum=None. Pass a momentum (Keras's default is 0.99), or leave "
            "renorm out for PyTorch's cumulative average."
        )
    m = _number("renorm_momentum", renorm_momentum)
    if not 0.0 <= m <= 1.0:  # NaN fails both comparisons
        raise ValueError(
            f"BatchNorm: renorm_momentum must be in [0, 1], got {renorm_momentum}."
        )
    if renorm_clipping is None:
        return {}, virtual_batch_size
    if not isinstance(renorm_clipping, dict):
        raise ValueError(
            "BatchNorm: renorm_clipping must be a dict with keys among rmax, rmin "
            f"and dmax, as Keras's, or None; got {describe(renorm_clipping)}."
        )
    unknown = sorted(map(repr, set(renorm_clipping) - set(CLIPPING_KEYS)))
    if unknown:
        raise ValueError(
            f"BatchNorm: renorm_clipping has unknown keys {', '.join(unknown)}; the "
            "keys are rmax, rmin and dmax, as Keras's (a key left out: no bound on "
            "that side; Keras does not derive rmin from rmax)."
        )
    bounds = {
        k: _number(f"renorm_clipping[{k!r}]", v)
        for k, v in renorm_clipping.items()
        if v is not None
    }
    check_bounds(*(bounds.get(k) for k in ("rmin", "rmax", "dmax")), "BatchNorm")
    return bounds, virtual_batch_size


def check_dtypes(x: Array, mask: Array | None) -> None:
    """A TypeError with the conversion to make, for a non-float `x` or non-bool mask."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"BatchNorm: x must be floating point, got {x.dtype.name} of shape "
            f"{x.shape}. Convert it before the layer, e.g. x.astype(jnp.float32) "
            "(integer pixels: scale them too, e.g. x.astype(jnp.float32) / 255)."
        )
    if mask is not None and mask.dtype != np.bool_:
        raise TypeError(
            f"BatchNorm: mask must be boolean, got {mask.dtype.name} of shape "
            f"{mask.shape}. Convert it first, e.g. mask.astype(bool) (the mask "
            "selects elements; it does not weight them)."
        )


def per_example_mask(x: Array, mask: Array) -> Array:
    """With `axis_name=None`, a `(batch,)` mask is one flag per example, as under
    vmap.

    Under `jax.vmap` a per-example mask is a scalar, so the batched mask is
    `(batch,)`. Broadcasting would align that with `x`'s *last* axis instead, and
    when that axis happens to have `batch` entries, mask the wrong elements without
    a word: so `(batch,)` is read as `(batch, 1, ..., 1)`. Any other 1-d mask
    broadcasts as usual (e.g. `(time,)`, shared by every example).
    """
    batch = x.shape[0]
    if mask.shape == (batch,):
        return jnp.reshape(mask, (batch,) + (1,) * (x.ndim - 1))
    return mask


# -------------------------------------------------------------------- State


def _name_key(key: object) -> str:
    """A State key as a message shows it: the path string that
    `eqx.nn.make_with_state` gives, or what an object key stands for."""
    if isinstance(key, str | int):
        return repr(key)
    return "an object key (of a layer built without eqx.nn.make_with_state)"


def _missing_state_error(marker: object, state: eqx.nn.State) -> ValueError:
    # A State flattens to its values, with its keys as the node's data.
    keys = jax.tree_util.tree_structure(state).node_data()[1]
    held = "; ".join(_name_key(k) for k in keys[:3]) + (
        "; ..." if len(keys) > 3 else ""
    )
    entries = f"{len(keys)} entr{'y' if len(keys) == 1 else 'ies'}"
    return ValueError(
        "BatchNorm: `state` holds no running statistics for this layer. Its key is "
        f"{_name_key(marker)}; the State holds {entries}{f' ({held})' if keys else ''}"
        ". eqx.nn.make_with_state keys a State by the model's class name and each "
        "stateful layer's path, so this State was made for another model, or for a "
        "layer at another place; a layer built without make_with_state has a key "
        "of its own, which only eqx.nn.State(...) of that very layer holds. Build "
        "the model and its state together, `model, state = "
        "eqx.nn.make_with_state(Model)(...)`, and pass that state."
    )


def _signature(kind: type) -> str:
    return f"{kind.__name__}({', '.join(kind._fields)})"


def _kind_of(entry: Any) -> type | None:
    """The kind of statistics `entry` is: its class if it is one of `ENTRY_KINDS`,
    else for a plain tuple of arrays (a State read back without its NamedTuples) the
    kind with as many fields; None for anything else."""
    if isinstance(entry, tuple(ENTRY_KINDS)):
        return type(entry)
    if type(entry) is tuple and all(hasattr(v, "shape") for v in entry):
        return next((k for k in ENTRY_KINDS if len(k._fields) == len(entry)), None)
    return None


def _other_kind_error(entry: tuple, got: type, kind: type) -> ValueError:
    """The statistics of another kind of layer given to a layer that keeps `kind`:
    what they are, what the layer keeps, and how to carry them over."""
    carry = {
        RunningStats: "eqx_bn.RunningStats(entry.mean, entry.var))`",
        CumulativeStats: "eqx_bn.CumulativeStats(entry.mean, entry.var, "
        "jnp.int32(num_batches)))`",
        RenormStats: "eqx_bn.RenormStats(entry.mean, entry.var, s, entry.mean, s))` "
        "with `s = jnp.sqrt(entry.var + bn.eps)`",
    }[kind]
    return ValueError(
        f"BatchNorm: as {ENTRY_KINDS[kind]}, this layer keeps {_signature(kind)} in "
        f"`state`; its entry is {describe(entry)}, what {ENTRY_KINDS[got]} keeps "
        f"({_signature(got)}). Build the model and its state together with "
        "eqx.nn.make_with_state; to carry statistics over, set `state = "
        f"state.set(bn.state_index, {carry}."
    )


def check_running(
    running: Any, input_size: int, dtype: np.dtype, kind: type = RunningStats
) -> None:
    """Raises a ValueError if `running` is not the statistics a layer keeps: of
    `kind` (one of `ENTRY_KINDS`, `BatchNorm.entry_kind`), each array `dtype` of
    shape `(input_size,)` (a `CumulativeStats`' count an int32 scalar).

    `state.get` returns whatever the State holds under the layer's key: a State
    of another model with the same module path, or one that `jax.vmap` gave back
    with `out_axes=0`, would otherwise broadcast silently in inference, update
    silently in training, or fail a call later in a reshape.
    """
    expected = f"{np.dtype(dtype).name}[{input_size}]"
    got = _kind_of(running)
    if got is not None and got is not kind:
        raise _other_kind_error(running, got, kind)
    if got is None:
        raise ValueError(
            f"BatchNorm: the state entry for this layer is {describe(running)}, "
            f"expected {_signature(kind)}, its statistics each {expected}. The "
            "State belongs to another model (a different layer at the same place): "
            "build the model and its state together with eqx.nn.make_with_state."
        )
    names = list(kind._fields)
    parts = list(running)
    if kind is CumulativeStats:
        count = parts.pop(names.index("num_batches"))
        names.remove("num_batches")
        if count.shape != () or np.dtype(count.dtype) != np.int32:
            raise ValueError(
                "BatchNorm(momentum=None): the batch count in `state` is "
                f"{describe(count)}, expected an int32 scalar. Set it with "
                "`jnp.int32(n)` (a State vmapped with out_axes=0 has one per "
                "example: use out_axes=(0, None))."
            )
    shapes = {tuple(v.shape) for v in parts}
    dtypes = {np.dtype(v.dtype) for v in parts}
    if shapes == {(input_size,)} and dtypes == {np.dtype(dtype)}:
        return
    described = [f"{name} {describe(v)}" for name, v in zip(names, parts)]
    got = ", ".join(described[:-1]) + f" and {described[-1]}"
    shape = tuple(parts[0].shape)
    if shapes == {(input_size,)}:
        cause = (
            "The shapes fit but the dtype does not: the State was made for a layer "
            "with another param_dtype / force_float32_reductions, or was cast (a "
            "mixed-precision policy applied to the whole state?). Cast it back, "
            f"e.g. jax.tree.map(lambda a: a.astype(jnp.{np.dtype(dtype).name}), "
            "state), or leave the state out of the cast."
        )
    elif len(shapes) == 1 and len(shape) >= 2 and shape[-1] == input_size:
        lead = shape[:-1]
        extra = (
            f"an extra leading axis of size {lead[0]}"
            if len(lead) == 1
            else f"extra leading axes {lead}"
        )
        cause = (
            f"They carry {extra}: "
            "the state was most likely returned by jax.vmap with out_axes=0, which "
            "stacks one copy per example. Use out_axes=(0, None) for the state "
            "(and in_axes=(0, None)), e.g. jax.vmap(model, axis_name='batch', "
            "in_axes=(0, None), out_axes=(0, None)). For an ensemble with one state "
            "per member, vmap over the state with in_axes=0 too."
        )
    elif len(shapes) == 1 and len(shape) == 1:
        cause = (
            f"They belong to a layer with input_size={shape[0]}: the State comes "
            "from another model (or another build). Build the model and its state "
            "together with eqx.nn.make_with_state, or load the state saved with "
            "this model."
        )
    else:
        cause = (
            "The State does not match this model: build the model and its state "
            "together with eqx.nn.make_with_state."
        )
    raise ValueError(
        f"BatchNorm: the running statistics in `state` are {got}, but this layer "
        f"(input_size={input_size}) expects {expected} each. {cause}"
    )


def check_clipping(clipping: Any, dtype: np.dtype) -> None:
    """Raises a ValueError if `clipping` is not a `RenormClipping` of `dtype`
    scalars (a State of another layer, or bounds set by hand with other shapes)."""
    scalars = isinstance(clipping, tuple) and len(clipping) == 3
    if not scalars or any(
        getattr(v, "shape", None) != () or np.dtype(v.dtype) != dtype for v in clipping
    ):
        raise ValueError(
            "BatchNorm(renorm=True): the clipping bounds in `state` are "
            f"{describe(clipping)}, expected RenormClipping(rmin, rmax, dmax) of "
            f"{np.dtype(dtype).name} scalars. Set them with "
            "eqx_bn.set_renorm_clipping, which keeps their shape and dtype."
        )


def get_running(state: eqx.nn.State, index: eqx.nn.StateIndex) -> Any:
    """`state.get(index)`, with our message when the State has no such entry."""
    try:
        return state.get(index)
    except KeyError:
        raise _missing_state_error(index.marker, state) from None


# ------------------------------------------------------------------- layer


def _canonical_axis_name(axis_name: AxisName | None) -> AxisName | None:
    if isinstance(axis_name, list):
        return tuple(axis_name)
    return axis_name


def _canonical_groups(
    groups: AxisIndexGroups | None,
) -> tuple[tuple[int, ...], ...] | None:
    if groups is None:
        return None
    return tuple(tuple(int(i) for i in group) for group in groups)


def _placement_error(old: RunningStats, new: RunningStats) -> ValueError:
    return ValueError(
        "BatchNorm: the running statistics in `state` "
        f"({describe(old.mean, placement=True)}) and the new ones "
        f"({describe(new.mean, placement=True)}) differ in "
        "placement, so eqx.nn.State refuses them. Under jax.jit with a batch sharded "
        "over a mesh, put the state (and model) on that mesh first, e.g. "
        "`state = jax.device_put(state, NamedSharding(mesh, P()))`. Under "
        "pmap/shard_map the new statistics differ between devices when "
        "axis_index_groups is set or when x is split over mesh axes that axis_name "
        "does not name: pass the state per device (pmap in_axes=0), or name those "
        "axes in axis_name."
    )


def _split_batch(
    x: Array, mask: Array | None, channel_axis: int, virtual: int
) -> tuple[Array, Array | None, int]:
    """A whole batch `(B, ...)` as tf_keras splits it, `(B // virtual, virtual,
    ...)`: example `i` at `[i // virtual, i % virtual]`, in virtual batch `i %
    virtual`. The mask follows if it varies over the batch; the channel axis
    moves one on."""
    split = (x.shape[0] // virtual, virtual)
    x = jnp.reshape(x, split + x.shape[1:])
    if mask is not None:
        mask = align_mask(mask, x.ndim - 1)
        if mask.shape[0] == 1:
            mask = mask[:, None]
        else:
            mask = jnp.reshape(mask, split + mask.shape[1:])
    return x, mask, channel_axis + 1


class BatchNorm(eqx.nn.StatefulLayer):
    r"""Batch normalisation with the numerics of `flax.linen.BatchNorm`.

    $$y = \frac{x - \mathbb{E}[x]}{\sqrt{\operatorname{Var}[x] + \varepsilon}}
    \gamma + \beta$$

    In training the mean and (biased) variance are those of the current batch, per
    channel, and the running averages are updated as Flax does:
    $r \leftarrow \text{momentum} \cdot r + (1 - \text{momentum}) \cdot s$.
    In inference the running averages are used and the state is returned unchanged.
    The running `mean` (initially 0) and `var` (initially 1) live in an
    `eqx.nn.State`, under `state_index`, as a [`RunningStats`][eqx_bn.RunningStats]
    (a [`CumulativeStats`][eqx_bn.CumulativeStats] for `momentum=None`, PyTorch's
    cumulative moving average).

    Two ways to call it:

    - `axis_name="batch"` (the default, Equinox's convention): `x` is one example,
      channels first, `(input_size, *spatial)`, and the layer runs under
      `jax.vmap(..., axis_name="batch")` (or `pmap` / `shard_map` axis names, or a
      tuple of names). Statistics cover the spatial axes and every named axis.
    - `axis_name=None`: `x` is a whole batch `(batch, input_size, *spatial)` and the
      statistics reduce over the batch and spatial axes. Under `jax.jit` with a
      sharded batch, XLA makes these the global batch's statistics.

    Either layout: channels first as above (the default, as `eqx.nn`), or channels
    last, `(*spatial, input_size)`, with `channels_last=True` (Flax's default, and
    the faster one next to XLA's convolutions).

    Compared with `eqx.nn.BatchNorm`: its default `mode="ema"` normalises training
    batches with the running averages, and its running variance starts differently;
    this layer normalises with the batch's own statistics, as Flax and PyTorch do.

    Two training-time variants, as Keras's and tf_keras's (the guide "Batch
    Renormalization and Ghost BatchNorm"): `renorm=True` corrects the batch
    statistics towards moving ones (its State entry is then a
    [`RenormStats`][eqx_bn.RenormStats], its bounds under `clipping_index`), and
    `virtual_batch_size=` normalises each virtual batch of the batch on its own.

    !!! Example

        ```python
        bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(16)
        batched = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        y, state = batched(x, state)                 # training: batch statistics
        y, _ = jax.vmap(eqx.nn.inference_mode(bn), in_axes=(0, None),
                        out_axes=(0, None))(x, state)  # inference: running statistics
        ```
    """

    scale: Float[Array, " input_size"] | None
    bias: Float[Array, " input_size"] | None
    state_index: eqx.nn.StateIndex[RunningStats | RenormStats]
    inference: bool
    input_size: int = eqx.field(static=True)
    axis_name: AxisName | None = eqx.field(static=True)
    axis_index_groups: tuple[tuple[int, ...], ...] | None = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    dtype: np.dtype | None = eqx.field(static=True)
    param_dtype: np.dtype = eqx.field(static=True)
    use_fast_variance: bool = eqx.field(static=True)
    force_float32_reductions: bool = eqx.field(static=True)
    channels_last: bool = eqx.field(static=True)
    unbiased_running_var: bool = eqx.field(static=True)
    frozen: Literal["statistics", "all"] | None = eqx.field(static=True)
    renorm: bool = eqx.field(static=True)
    renorm_momentum: float = eqx.field(static=True)
    clipping_index: eqx.nn.StateIndex[RenormClipping] | None
    virtual_batch_size: int | None = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: AxisName | None = "batch",
        *,
        momentum: float | None = 0.99,
        eps: float = 1e-5,
        use_bias: bool = True,
        use_scale: bool = True,
        inference: bool = False,
        dtype: jnp.dtype | type | str | None = None,
        param_dtype: jnp.dtype | type | str = jnp.float32,
        use_fast_variance: bool = True,
        force_float32_reductions: bool = True,
        axis_index_groups: AxisIndexGroups | None = None,
        channels_last: bool = False,
        unbiased_running_var: bool = False,
        frozen: Literal["statistics", "all"] | None = None,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
        bias_init: Initializer = jax.nn.initializers.zeros,
        scale_init: Initializer = jax.nn.initializers.ones,
        key: PRNGKeyArray | None = None,
    ):
        r"""**Arguments:**

        - `input_size`: the number of channels, `C` in `x`'s `(C, *spatial)`.
        - `axis_name`: the named axis (or tuple of names) the batch is spread over,
            as bound by `jax.vmap`/`pmap`/`shard_map`; `None` to pass whole batches.
        - `momentum`: decay of the running averages (Flax's meaning: PyTorch's
            `momentum=0.1` is `momentum=0.9` here). `None`: a cumulative average,
            PyTorch's `momentum=None`: the State also counts the batches
            ([`CumulativeStats`][eqx_bn.CumulativeStats]), and each training step
            counts its batch, then moves the averages by `1 / count` of the way
            to the batch's statistics, so that they are the average of every
            batch's so far, each batch weighing the same (the first step replaces
            the initial 0 and 1). With `unbiased_running_var=True` the steps are
            `nn.BatchNorm2d(momentum=None)`'s, from a count loaded by
            [`eqx_bn.interop.load_torch`][] too (for its last bits of the
            variance, `use_fast_variance=False` as well).
        - `eps`: added to the variance before the square root.
        - `use_bias`, `use_scale`: whether to learn $\beta$ and $\gamma$.
        - `inference`: use the running averages (Flax's `use_running_average`).
            Flip it with `eqx.nn.inference_mode`, or per call with `inference=`.
        - `dtype`: dtype of the output (default: promoted from `x` and the
            parameters, as Flax).
        - `param_dtype`: dtype of `scale` and `bias`.
        - `use_fast_variance`: one pass over `x` (with a shift, accurate even when
            |mean| >> std) instead of Flax's two-pass variance.
        - `force_float32_reductions`: compute statistics in at least float32 and
            keep the running averages in float32.
        - `axis_index_groups`: groups of indices along `axis_name` that are
            normalised separately (pmap / shard_map only), as in `jax.lax.psum`.
        - `channels_last`: `x` is `(*spatial, input_size)` per example (or
            `(batch, *spatial, input_size)` with `axis_name=None`), Flax's default
            layout (`axis=-1`). XLA's CPU and GPU convolutions work channels last,
            so a network whose convolutions are channels last avoids a transpose
            around each of them.
        - `unbiased_running_var`: update the running variance with the unbiased
            batch variance, $\frac{n}{n-1}$ times the biased one ($n$ valid
            elements per channel, over the batch, the spatial axes and every named
            axis), as PyTorch's `BatchNorm` does; the output still uses the biased
            one. With `momentum=0.9` (PyTorch's `momentum=0.1`) a training step
            then gives `torch.nn.BatchNorm2d`'s outputs and running statistics.
            As PyTorch, training on one element per channel is refused; a mask
            that leaves one element keeps that channel's running variance.
        - `frozen`: `"statistics"` to always normalise with the running
            statistics and never update them, in training as in inference (the
            `inference` flag and argument make no difference); `"all"` to fix
            the scale and bias too: no gradient reaches them, and
            [`eqx_bn.trainable`][] leaves them out of what an optimiser trains.
            PyTorch: `torchvision.ops.FrozenBatchNorm2d` (`"all"`); Keras:
            `layer.trainable = False`. [`eqx_bn.freeze_batch_norms`][] sets it on
            every BatchNorm of a model. A frozen `renorm` or Ghost layer
            normalises as its inference does (Keras's and tf_keras's
            `trainable = False`): the correction and the virtual batches are
            training's.
        - `renorm`: Batch Renormalization (Ioffe, 2017), as Keras's
            `BatchNormalization(renorm=True)`: training normalises with the batch
            statistics corrected towards moving ones, $\left(\frac{x -
            \mu_B}{\sigma_B} r + d\right) \gamma + \beta$ with
            $r = \sigma_B / \sigma$ and $d = (\mu_B - \mu) / \sigma$ clipped and
            without gradient, $\mu$ and $\sigma$ the renorm statistics before this
            step. The State holds a [`RenormStats`][eqx_bn.RenormStats] and,
            under `clipping_index`, the bounds. Inference is unchanged. It needs
            a `momentum` (Keras's renorm has no cumulative average), and
            accumulated steps (`eqx_bn.train`'s `accumulate=`) and
            [`eqx_bn.recalibrate`][] refuse it unless it is frozen.
        - `renorm_clipping`: Keras's dict of bounds, keys among `"rmax"`,
            `"rmin"` and `"dmax"`: $r$ is clipped to `[rmin, rmax]`, $d$ to
            `[-dmax, dmax]`; a key left out is no bound on that side (`rmin` is
            not derived from `rmax`). They are the State's initial values:
            change them with [`eqx_bn.set_renorm_clipping`][].
        - `renorm_momentum`: decay of the renorm statistics that $r$ and $d$
            are measured against (`momentum` is that of the inference ones).
        - `virtual_batch_size`: Ghost BatchNorm, as tf_keras's: training
            normalises each virtual batch of that many examples with its own
            statistics. Example `i` of a batch of `B` joins virtual batch
            `i % (B // virtual_batch_size)` (tf_keras's strided grouping); under
            named axes, examples are numbered as `jax.lax.axis_index(axis_name)`
            numbers them. `virtual_batch_size` must divide the batch. The running
            averages follow the mean of the virtual batches' means and of their
            variances (with `momentum=None`, the cumulative average of those).
            Inference is unchanged, for any batch size. Accumulated steps
            (`accumulate=`) and `recalibrate(population=True)` refuse it unless
            it is frozen.
        - `bias_init`, `scale_init`: `jax.nn.initializers`-style initialisers.
        - `key`: passed to the initialisers; only needed when they are random.

        **Raises:**

        - `ValueError`: for an `input_size` that is not a positive int, a
            `momentum` outside [0, 1] (and not `None`), an `eps` that is negative
            or not finite, an integer (or other non-floating) `dtype` or
            `param_dtype`, a `frozen` that is not `"statistics"`, `"all"` or
            `None`, groups given without an `axis_name`, `renorm_clipping` with
            keys other than rmax, rmin and dmax, `rmax < rmin` or `dmax < 0` (as
            Keras), `renorm_clipping` or `renorm_momentum` without `renorm=True`,
            `renorm=True` with `momentum=None`, or a `virtual_batch_size` that is
            not a positive int.
        """
        input_size = check_config(input_size, momentum, eps, dtype, param_dtype, frozen)
        bounds, virtual_batch_size = check_variants(
            renorm, renorm_clipping, renorm_momentum, virtual_batch_size, momentum
        )
        if axis_index_groups is not None and axis_name is None:
            raise ValueError(
                "BatchNorm: axis_index_groups needs an axis_name to group along."
            )
        param_dtype = np.dtype(param_dtype)
        shape = (input_size,)
        self.scale = scale_init(key, shape, param_dtype) if use_scale else None
        self.bias = bias_init(key, shape, param_dtype) if use_bias else None
        self.inference = inference
        self.input_size = input_size
        self.axis_name = _canonical_axis_name(axis_name)
        self.axis_index_groups = _canonical_groups(axis_index_groups)
        self.momentum = None if momentum is None else float(momentum)
        self.eps = float(eps)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.param_dtype = param_dtype
        self.use_fast_variance = use_fast_variance
        self.force_float32_reductions = force_float32_reductions
        self.channels_last = bool(channels_last)
        self.unbiased_running_var = bool(unbiased_running_var)
        self.frozen = frozen
        self.renorm = bool(renorm)
        self.renorm_momentum = float(renorm_momentum)
        self.virtual_batch_size = virtual_batch_size
        stat_dtype = self.running_dtype  # reads the fields set above
        zeros, ones = jnp.zeros(shape, stat_dtype), jnp.ones(shape, stat_dtype)
        if self.renorm:
            # moving_stddev and renorm_stddev start at sqrt(1), as Keras's.
            running = RenormStats(zeros, ones, ones, zeros, ones)
            self.clipping_index = eqx.nn.StateIndex(
                RenormClipping(
                    *(
                        jnp.asarray(bounds.get(k, default), stat_dtype)
                        for k, default in (
                            ("rmin", 0.0),
                            ("rmax", math.inf),
                            ("dmax", math.inf),
                        )
                    )
                )
            )
        else:
            if momentum is None:
                running = CumulativeStats(zeros, ones, jnp.zeros((), jnp.int32))
            else:
                running = RunningStats(zeros, ones)
            self.clipping_index = None
        self.state_index = eqx.nn.StateIndex(running)

    @property
    def use_bias(self) -> bool:
        """Whether the layer has a learned bias (`bias is not None`)."""
        return self.bias is not None

    @property
    def use_scale(self) -> bool:
        """Whether the layer has a learned scale (`scale is not None`)."""
        return self.scale is not None

    @property
    def running_dtype(self) -> np.dtype:
        """The dtype of the running averages that the layer keeps in its State:
        float32 with `force_float32_reductions` (the default), else `param_dtype` as
        JAX stores it (float64 is float32 without x64). A State whose entry for this
        layer has another dtype is refused."""
        dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        return np.dtype(jax.dtypes.canonicalize_dtype(dtype))

    @property
    def entry_kind(self) -> type:
        """The kind of statistics the layer keeps in its State under `state_index`:
        [`RenormStats`][eqx_bn.RenormStats] with `renorm=True`, else
        [`CumulativeStats`][eqx_bn.CumulativeStats] with `momentum=None`, else
        [`RunningStats`][eqx_bn.RunningStats]."""
        if self.renorm:
            return RenormStats
        return CumulativeStats if self.momentum is None else RunningStats

    def output_dtype(self, input_dtype: Any) -> np.dtype:
        """The dtype of the layer's output for an input of `input_dtype`: `dtype` if
        the layer was built with one, else the standard promotion of `input_dtype`
        with the dtypes of `scale` and `bias`, as Flax's.

        **Arguments:**

        - `input_dtype`: the dtype of `x` (anything `numpy.dtype` takes).

        **Returns:**

        A `numpy.dtype`.
        """
        if self.dtype is not None:
            return self.dtype
        params = [p.dtype for p in (self.scale, self.bias) if p is not None]
        return promote(input_dtype, *params)

    @jax.named_scope("eqx_bn.BatchNorm")
    @typecheck
    def __call__(
        self,
        x: Shaped[Array | np.ndarray, "*shape"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        mask: Shaped[Array | np.ndarray, "*mask_shape"] | None = None,
    ) -> tuple[Shaped[Array, "*shape"], eqx.nn.State]:
        """**Arguments:**

        - `x`: `(input_size, *spatial)` for one example under a named axis, or
            `(batch, input_size, *spatial)` when the layer has `axis_name=None`
            (channels last instead when the layer has `channels_last=True`).
            Any floating dtype; statistics are reduced in float32 (or wider).
        - `state`: the `eqx.nn.State` holding the running averages.
        - `key`: unused; accepted so the layer fits `eqx.nn.Sequential`.
        - `inference`: overrides the layer's `inference` flag for this call.
        - `mask`: boolean, broadcastable to `x`'s shape: which elements count in
            the batch statistics (padding excluded). Under `vmap`, a scalar mask
            per example; with `axis_name=None`, a 1-d mask `(batch,)` is likewise
            one flag per example. The output is still computed for every element.

        **Returns:**

        `(y, state)`: `y` has `x`'s shape; the state has the updated running
        averages in training, and is returned unchanged in inference. An `x`
        with no element (an empty batch, a zero-size spatial axis) gives an empty
        `y` and leaves the running averages as they are, as under `jax.vmap`.

        **Raises:**

        - `ValueError`: if the channel axis is not `input_size` long, the mask
            does not broadcast to `x`, training needs a named axis that is not
            bound, or `state` does not hold this layer's running statistics of
            its kind (`entry_kind`) with the shape and dtype the layer made them
            (a State of another model or of another kind of layer, one vmapped
            with `out_axes=0`, or one cast to another dtype); in training, with a
            `virtual_batch_size` that does not divide the batch.
        - `TypeError`: if `x` is not floating point or `mask` not boolean (the
            message says how to convert them).
        """
        del key
        x, mask, channel_axis = self._checked_input(x, mask)
        running = get_running(state, self.state_index)
        # In a step that accumulates micro-batches (`eqx_bn.train`), the entry is a
        # `Pooling`: known when tracing, so the plain call pays nothing for it.
        pooling = running if isinstance(running, Pooling) else None
        if pooling is not None:
            running = pooling.running
        check_running(running, self.input_size, self.running_dtype, self.entry_kind)
        inference = self.inference if inference is None else inference
        if inference or self.frozen is not None:
            return self._normalize_with(running, x, channel_axis), state
        if pooling is not None:
            y, pooled = self._train(
                x,
                mask,
                channel_axis,
                pooling.pooled,
                normalize_with=pooling.normalize_with,
                pool=True,
            )
            if pooled is not None:
                count, mean, m2 = pooled
                entry = pooling._replace(pooled=(count, mean, m2))
                try:
                    state = state.set(self.state_index, entry)
                except ValueError as err:
                    new = RunningStats(mean, m2)  # the placement is what differs
                    raise _placement_error(running, new) from err
            return y, state
        y, new = self._train(
            x, mask, channel_axis, running, renorm=self._renorm(running, state)
        )
        if new is None:
            return y, state
        new_running = self.entry_kind(*new)
        try:
            state = state.set(self.state_index, new_running)
        except ValueError as err:
            # Same shapes and dtypes by construction: only the placement differs.
            raise _placement_error(running, new_running) from err
        return y, state

    def _checked_input(
        self, x: Array | np.ndarray, mask: Array | np.ndarray | None
    ) -> tuple[Array, Array | None, int]:
        """`x` and `mask` as arrays, checked, a `(batch,)` mask read as one flag per
        example; and the channel axis."""
        x = jnp.asarray(x)
        mask = None if mask is None else jnp.asarray(mask)
        check_dtypes(x, mask)
        if (
            self.axis_name is None
            and mask is not None
            and mask.ndim == 1
            and x.ndim > 1
        ):
            mask = per_example_mask(x, mask)
        return x, mask, self._check_input(x, mask)

    def _normalize_with(self, running: tuple, x: Array, channel_axis: int) -> Array:
        """`x` normalised with the running statistics (inference, or frozen)."""
        shape, out_dtype = x.shape, self.output_dtype(x.dtype)
        x, _, channel_axis = drop_unit_axes(x, None, channel_axis)
        axes = tuple(i for i in range(x.ndim) if i != channel_axis)
        mean, var = running.mean, running.var
        if not self.force_float32_reductions:
            mean = mean.astype(self.param_dtype)
            var = var.astype(self.param_dtype)
        scale, bias = self.scale, self.bias
        if self.frozen == "all":
            scale, bias = jax.lax.stop_gradient((scale, bias))
        y = normalize(x, mean, var, scale, bias, self.eps, out_dtype, axes)
        return jnp.reshape(y, shape)

    def _renorm(self, running: tuple, state: eqx.nn.State) -> Renorm | None:
        """What Batch Renormalization's correction is measured against this step:
        the renorm statistics in `running` and the bounds in `state` (None without
        `renorm`)."""
        if not self.renorm:
            return None
        clipping = get_running(state, self.clipping_index)
        check_clipping(clipping, self.running_dtype)
        return Renorm(running.renorm_mean, running.renorm_stddev, *clipping)

    def _prepared(
        self, x: Array, mask: Array | None, channel_axis: int, *, pooled: bool
    ) -> tuple[Array, Array | None, Array | None, Array | None, Config] | None:
        """`x` (checked) and `mask` as the training path takes them, the scale and
        bias, and the static settings of the call (`_numerics.Config`); None when
        `x` has no element.

        `pooled`: the statistics are pooled with others (a step accumulating
        micro-batches), so one element per channel is no error here.
        """
        shape, out_dtype = x.shape, self.output_dtype(x.dtype)
        x, mask, channel_axis = drop_unit_axes(x, mask, channel_axis)
        self._check_axes_bound()
        if x.size == 0:
            return None
        replicas = self._replicas()
        virtual = self._virtual_batches(shape[0], replicas)
        if self.unbiased_running_var and mask is None and not pooled:
            per_batch = replicas * x.size // x.shape[channel_axis]
            if per_batch // (virtual or 1) == 1:
                raise ValueError(
                    "BatchNorm(unbiased_running_var=True): expected more than 1 "
                    f"value per channel in training, got x of shape {shape}"
                    + ("" if virtual is None else " in virtual batches of one")
                    + " (as PyTorch, the unbiased variance of one element is "
                    "undefined). Train on a larger batch, or use inference mode."
                )
        scale, bias = self.scale, self.bias
        if virtual is not None:
            # The statistics are tables, one row per virtual batch; the
            # parameters are given as one row.
            scale, bias = (None if p is None else p[None] for p in (scale, bias))
            if self.axis_name is None:
                # tf_keras's (size, virtual, ...): example i in virtual batch
                # i % virtual, which keeps its own axis, beside the channels.
                x, mask, channel_axis = _split_batch(x, mask, channel_axis, virtual)
            else:
                replicas //= virtual  # the members of one virtual batch
        axes = tuple(
            i
            for i in range(x.ndim)
            if i != channel_axis and not (virtual and self.axis_name is None and i == 1)
        )
        config = Config(
            axes=axes,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            replicas=replicas,
            eps=self.eps,
            fast_variance=self.use_fast_variance,
            stat_dtype=self._stat_dtype(x),
            out_dtype=out_dtype,
            isolate=isolates_passes(x.shape, channel_axis, replicas),
            virtual_batches=virtual,
        )
        return x, mask, scale, bias, config

    def _train(
        self,
        x: Array,
        mask: Array | None,
        channel_axis: int,
        entry: tuple,
        *,
        renorm: Renorm | None = None,
        normalize_with: tuple[Array, Array] | None = None,
        pool: bool = False,
    ) -> tuple[Array, tuple | None]:
        """The training output for `x` (checked) and the arrays of the State entry
        after it; `None` for those when `x` has no element (the entry stays).

        - `entry`: the layer's State entry, or with `pool`, the `(count, mean, m2)`
            that a step accumulating micro-batches has pooled so far;
        - `renorm`: Batch Renormalization's correction (`_renorm`), or None;
        - `normalize_with`: the `(mean, var)` to normalise with instead of the
            batch's (which are still what the entry takes in).

        `_numerics.train`, whose jitted functions the layers of one kind share:
        the statistics, the fused custom JVP (with virtual batches and renorm),
        and the entry's update.
        """
        shape, out_dtype = x.shape, self.output_dtype(x.dtype)
        prepared = self._prepared(x, mask, channel_axis, pooled=pool)
        if prepared is None:
            # Nothing to take statistics over: as under vmap with an empty batch,
            # an empty output and the running averages as they are.
            return jnp.zeros(shape, out_dtype), None
        x, mask, scale, bias, config = prepared
        with self._collective_errors():
            y, new = train(
                x,
                mask,
                scale,
                bias,
                tuple(entry),
                renorm,
                normalize_with,
                config=config,
                update=self._update(pool),
            )
        return jnp.reshape(y, shape), new

    def _update(self, pool: bool = False) -> Update:
        """How the layer's State entry moves towards a batch's statistics (with
        `pool`, the entry is a step's pooled moments instead)."""
        return Update(
            momentum=self.momentum,
            renorm_momentum=self.renorm_momentum if self.renorm else None,
            unbiased=self.unbiased_running_var,
            pool=pool,
        )

    def _updated(self, running: tuple, stats: Moments) -> tuple:
        """The State entry after a step whose batch had `stats` (one that pooled
        micro-batches: the other steps update it in `_train`)."""
        new = update_entry(tuple(running), stats, self._update(), self.eps)
        return self.entry_kind(*new)

    def _train_with_moments(
        self, x: Array | np.ndarray, mask: Array | np.ndarray | None = None
    ) -> tuple[Array, Moments | None]:
        """A training call without the State: the output and the batch's statistics
        (`None` for an empty `x`), for `eqx_bn.recalibrate` to accumulate (which
        refuses renorm layers: their output needs the State). No update, so the
        count stays a Python number where it is one (`train_statistics`)."""
        x, mask, channel_axis = self._checked_input(x, mask)
        shape, out_dtype = x.shape, self.output_dtype(x.dtype)
        prepared = self._prepared(x, mask, channel_axis, pooled=False)
        if prepared is None:
            return jnp.zeros(shape, out_dtype), None
        x, mask, scale, bias, config = prepared
        with self._collective_errors():
            y, stats = train_statistics(x, mask, scale, bias, None, None, config)
        return jnp.reshape(y, shape), stats

    def _finish_pooling(self, entry: Pooling) -> RunningStats | CumulativeStats:
        """The running statistics after a step that pooled micro-batches: one
        update (one batch counted, with `momentum=None`) from the moments of all
        the layer saw; none if it saw nothing (it ran in inference mode)."""
        count, mean, m2 = entry.pooled
        stats = Moments(mean, m2 / jnp.maximum(count, 1.0), count)
        new = self._updated(entry.running, stats)
        if self.momentum is not None:
            return new  # a channel that saw nothing keeps its statistics
        seen = jnp.any(count > 0)
        return CumulativeStats(
            *(jnp.where(seen, a, b) for a, b in zip(new, entry.running))
        )

    @contextlib.contextmanager
    def _collective_errors(self) -> Iterator[None]:
        """Our error (`_collective_error`) for a collective that JAX does not
        support, raised from the error JAX raises in the block."""
        try:
            yield
        except (NotImplementedError, AssertionError, ValueError) as err:
            ours = self._collective_error(err)
            if ours is None:
                raise
            raise ours from err

    def _virtual_batches(self, batch: int, replicas: int) -> int | None:
        """How many virtual batches this training call has (Ghost BatchNorm), or
        None for one, the whole batch: no `virtual_batch_size`, or one as large
        as the batch. `batch`: `x`'s first axis, the batch with `axis_name=None`."""
        size = self.virtual_batch_size
        if size is None:
            return None
        if self.axis_name is None:
            where = f"x's batch axis ({batch} examples)"
        else:
            batch = replicas
            where = f"the named axes {self.axis_name!r} ({batch} examples)"
        if batch % size:
            raise ValueError(
                f"BatchNorm(virtual_batch_size={size}): {where} must be a multiple "
                "of the virtual batch size, as in tf_keras. Train on a batch size "
                f"divisible by {size}, or choose another virtual_batch_size."
            )
        return None if batch == size else batch // size

    def _collective_error(self, err: Exception) -> ValueError | None:
        """Our error for a collective that JAX does not support; None for others."""
        if self.axis_name is None:
            return None
        manual = jax.sharding.get_abstract_mesh().manual_axes
        vmapped = [n for n in axis_names(self.axis_name) if n not in manual]
        if self.axis_index_groups is not None and isinstance(err, NotImplementedError):
            where = (
                f"over the jax.vmap axes {vmapped}"
                if vmapped
                else "under jax.shard_map(check_vma=True)"
            )
            return ValueError(
                f"BatchNorm: axis_index_groups over axis_name={self.axis_name!r} "
                f"is not supported {where}: JAX implements grouped collectives "
                "only over jax.pmap axes and jax.shard_map(..., check_vma=False) "
                "mesh axes. Bind the grouped axes with pmap or "
                "shard_map(check_vma=False), or leave axis_index_groups out."
            )
        if manual and vmapped and isinstance(err, (AssertionError, ValueError)):
            # jax 0.10: collectives over a vmap axis inside shard_map(check_vma=True)
            # fail in JAX's own varying-axes bookkeeping.
            return ValueError(
                f"BatchNorm: the statistics over the vmap axis {vmapped[0]!r} cannot "
                f"be collected inside jax.shard_map over mesh axes {manual}: JAX "
                "does not support collectives over vmap axes under "
                "shard_map(check_vma=True), the default. Pass check_vma=False to "
                "shard_map (and psum the gradients over the mesh axes yourself, as "
                "under pmap), or use jax.jit with a NamedSharding batch and an "
                f"axis_name=None layer. JAX's error: {type(err).__name__}: {err}"
            )
        return None

    def _stat_dtype(self, x: Array) -> np.dtype:
        dtype = x.dtype if self.dtype is None else self.dtype
        if self.force_float32_reductions:
            dtype = promote(dtype, jnp.float32)
        return np.dtype(dtype)

    def _check_input(self, x: Array, mask: Array | None) -> int:
        """Returns the channel axis of `x`; raises a ValueError saying what to fix."""
        example = (
            "*spatial, input_size" if self.channels_last else "input_size, *spatial"
        )
        if self.axis_name is None:
            layout = f"(batch, {example})"
            if x.ndim < 2:
                raise ValueError(
                    f"BatchNorm(axis_name=None): x must be a whole batch {layout}, got "
                    f"shape {x.shape}. For one example at a time, build the layer "
                    "with axis_name='batch' and call it under "
                    "jax.vmap(..., axis_name='batch')."
                )
            channel_axis = x.ndim - 1 if self.channels_last else 1
        else:
            layout = f"({example})"
            if x.ndim < 1:
                raise ValueError(
                    f"BatchNorm: x must be one example {layout}, got a scalar."
                )
            channel_axis = x.ndim - 1 if self.channels_last else 0
        channels = x.shape[channel_axis]
        if channels != self.input_size:
            raise ValueError(
                f"BatchNorm: x has {channels} channels on axis {channel_axis} (shape "
                f"{x.shape}), expected input_size={self.input_size} as in {layout}."
                + self._layout_hint(x)
            )
        if mask is not None:
            try:
                np.broadcast_shapes(mask.shape, x.shape)
                fits = np.broadcast_shapes(mask.shape, x.shape) == x.shape
            except ValueError:
                fits = False
            if not fits:
                per_example = (
                    f" or ({x.shape[0]},), one flag per example"
                    if self.axis_name is None and x.ndim > 1
                    else ""
                )
                raise ValueError(
                    f"BatchNorm: mask of shape {mask.shape} does not broadcast to x's "
                    f"shape {x.shape}. Expected a boolean mask broadcastable to x"
                    f"{per_example} (under vmap, one scalar per example)."
                )
        return channel_axis

    def _layout_hint(self, x: Array) -> str:
        """A guess at what went wrong when the channel axis has the wrong size."""
        batched = self.axis_name is not None and not self.channels_last
        if batched and x.ndim >= 2 and x.shape[1] == self.input_size:
            if not unbound_axes(self.axis_name):
                return (
                    " It looks like a whole batch, yet the layer already runs under "
                    f"the named axis {self.axis_name!r}: x is batched twice. Check "
                    "that the vmap's in_axes maps x's batch axis, and that x is not "
                    "vmapped again around it (an ensemble or a sequence needs its "
                    "own vmap over the model, with the batch inside)."
                )
            return (
                " It looks like a whole batch: call the layer under "
                f"jax.vmap(..., axis_name={self.axis_name!r}), or build it with "
                "axis_name=None."
            )
        first = 0 if self.axis_name is not None else 1
        if x.ndim > first + 1:
            other = first if self.channels_last else x.ndim - 1
            if x.shape[other] == self.input_size:
                return (
                    f" Axis {other} has {self.input_size} entries: if those are the "
                    "channels, build the layer with "
                    f"channels_last={not self.channels_last}."
                )
        return ""

    def _replicas(self) -> int:
        """How many inputs the named axes reduce together (1 with no axis name;
        with `axis_index_groups`, the size of one group: JAX's groups are equal)."""
        sizes = [jax.lax.axis_size(n) for n in axis_names(self.axis_name)]
        total = int(np.prod(sizes, dtype=np.int64))
        if self.axis_index_groups is not None:
            total //= len(self.axis_index_groups)
        return total

    def _check_axes_bound(self) -> None:
        if self.axis_name is None:
            return
        unbound = unbound_axes(self.axis_name)
        if unbound:
            raise ValueError(
                f"BatchNorm: training needs the named axis {self.axis_name!r}, but "
                f"{', '.join(map(repr, unbound))} is not bound here. Call the layer "
                f"under jax.vmap(..., axis_name={unbound[0]!r}) (or pmap/shard_map "
                "with that name), build it with axis_name=None to pass whole "
                "batches, or use inference mode, which needs no axis."
            )

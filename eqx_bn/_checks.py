"""The checks `BatchNorm` runs on its configuration, its inputs and its State.

All of them look only at Python values, shapes and dtypes, so under `jax.jit` they
run once, at trace time, and add nothing to the compiled step. Each error says what
it got, what was expected and the likely fix, in the words of `_batch_norm.py`'s
other messages (`"BatchNorm: ..."`).
"""

import math
import operator
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


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
    input_size: Any, momentum: Any, eps: Any, dtype: Any, param_dtype: Any
) -> int:
    """Raises a ValueError for a configuration `BatchNorm.__init__` cannot honour;
    returns `input_size` as an `int` (it may be a NumPy or JAX integer)."""
    size = _count(input_size)
    if size is None or size <= 0:
        raise ValueError(
            f"BatchNorm: input_size must be a positive int, got {input_size!r}."
        )
    m = _number("momentum", momentum)
    if not 0.0 <= m <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {momentum}.")
    e = _number("eps", eps)
    if not (e >= 0 and math.isfinite(e)):
        raise ValueError(f"BatchNorm: eps must be >= 0 and finite, got {eps}.")
    _floating_dtype("dtype", dtype)
    _floating_dtype("param_dtype", param_dtype)
    return size


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


def _describe(v: Any) -> str:
    shape = getattr(v, "shape", None)
    dtype = getattr(v, "dtype", None)
    if shape is None or dtype is None:
        return f"a {type(v).__name__}"
    return f"{np.dtype(dtype).name}{list(shape)}"


def _missing_state_error(marker: object) -> ValueError:
    return ValueError(
        "BatchNorm: `state` holds no running statistics for this layer (no entry "
        f"under its state_index {marker!r}). The State belongs to another model, or "
        "pairs a model from eqx.nn.make_with_state with eqx.nn.State(...) of a "
        "separately built one, whose keys differ. Build the model and its state "
        "together, `model, state = eqx.nn.make_with_state(Model)(...)`, and pass "
        "that state."
    )


def check_running(running: Any, input_size: int, dtype: np.dtype) -> None:
    """Raises a ValueError if `running` is not this layer's `(mean, var)`.

    `state.get` returns whatever the State holds under the layer's key: a State
    of another model with the same module path, or one that `jax.vmap` gave back
    with `out_axes=0`, would otherwise broadcast silently in inference, update
    silently in training, or fail a call later in a reshape.
    """
    expected = f"{np.dtype(dtype).name}[{input_size}]"
    parts = running if isinstance(running, tuple) and len(running) == 2 else None
    if parts is None or any(getattr(v, "shape", None) is None for v in parts):
        raise ValueError(
            f"BatchNorm: the state entry for this layer is {_describe(running)}, "
            f"expected RunningStats(mean, var), each {expected}. The State belongs "
            "to another model (a different layer at the same place): build the "
            "model and its state together with eqx.nn.make_with_state."
        )
    shapes = {tuple(v.shape) for v in parts}
    dtypes = {np.dtype(v.dtype) for v in parts}
    if shapes == {(input_size,)} and dtypes == {np.dtype(dtype)}:
        return
    got = f"mean {_describe(parts[0])} and var {_describe(parts[1])}"
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


def get_running(state: eqx.nn.State, index: eqx.nn.StateIndex) -> Any:
    """`state.get(index)`, with our message when the State has no such entry."""
    try:
        return state.get(index)
    except KeyError:
        raise _missing_state_error(index.marker) from None

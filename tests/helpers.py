"""Small shared helpers for the tests (not fixtures: plain functions to import)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


@contextlib.contextmanager
def flax_promotion():
    """Flax's code promotes dtypes implicitly (bfloat16 - float32); allow it there."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def channels_last(x):
    """(batch, C, *spatial) -> (batch, *spatial, C), Flax's layout."""
    return jnp.moveaxis(x, 1, -1)


def channels_first(x):
    """(batch, *spatial, C) -> (batch, C, *spatial), Equinox's layout."""
    return jnp.moveaxis(x, -1, 1)


def ulp_tolerance(dtype) -> float:
    """A few units in the last place of `dtype`: the float rounding level."""
    return float(8 * np.finfo(np.dtype(dtype)).eps)


def flax_train_step(bn, variables, x, mask=None):
    """One training call of a `flax.linen.BatchNorm` on channels-first `x` (and mask).

    Returns the output, channels first, and the updated `batch_stats`.
    """
    with flax_promotion():
        y, updates = bn.apply(
            variables,
            channels_last(x),
            False,
            mask=None if mask is None else channels_last(mask),
            mutable=["batch_stats"],
        )
    return channels_first(y), updates["batch_stats"]

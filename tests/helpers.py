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

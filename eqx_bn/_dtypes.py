"""Dtype promotion that follows JAX's standard lattice whatever the user's config says.

eqx_bn must round exactly as Flax does, and Flax relies on standard promotion
(`bfloat16 - float32 -> float32`). The library promotes explicitly with these helpers
so that it also runs under `jax_numpy_dtype_promotion="strict"`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


def promote(*dtypes) -> np.dtype:
    """The dtype that standard promotion gives for `dtypes`."""
    with jax.numpy_dtype_promotion("standard"):
        return np.dtype(jnp.result_type(*dtypes))


def promote_arrays(a: Array, b: Array) -> tuple[Array, Array]:
    """Casts `a` and `b` to their standard-promoted dtype."""
    dtype = promote(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype)

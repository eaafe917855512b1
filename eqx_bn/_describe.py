"""How error messages name a value."""

from typing import Any

import jax
import numpy as np


def describe(x: Any, *, placement: bool = False) -> str:
    """`float32[4, 3]` for an array (or anything with `shape` and `dtype`), `a
    {type}` for anything else: how error messages name a leaf.

    With `placement`, an array's sharding follows (`float32[3] on
    NamedSharding(...)`), for messages about where arrays live.
    """
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        text = f"{np.dtype(x.dtype).name}[{', '.join(map(str, x.shape))}]"
        if placement:
            text += f" on {jax.typeof(x).sharding}"
        return text
    return f"a {type(x).__name__}"

"""How error messages name a value."""

from typing import Any

import numpy as np


def describe(x: Any) -> str:
    """`float32[4, 3]` for an array (or anything with `shape` and `dtype`), `a
    {type}` for anything else: how error messages name a leaf."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{np.dtype(x.dtype).name}[{', '.join(map(str, x.shape))}]"
    return f"a {type(x).__name__}"

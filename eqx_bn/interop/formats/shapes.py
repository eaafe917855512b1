"""The check of an array shape declared by a checkpoint file, shared by its readers."""

import math
from typing import Any

import numpy as np

# numpy's limits on one array: its number of axes, and its size in bytes (which it
# also computes for a zero-size array, from the non-zero dimensions).
MAX_NDIM = 64
MAX_BYTES = int(np.iinfo(np.intp).max)


def shape_problem(shape: Any, itemsize: int) -> str | None:
    """What is wrong with a declared array shape, or None if numpy can hold it.

    A forged shape can multiply to 0 with a huge dimension (`[0, 2**62]`) or make
    numpy's byte count overflow even when it holds no element; numpy refuses both
    with a plain ValueError, which would escape the readers' `CheckpointError`.

    **Arguments:**

    - `shape`: the shape as decoded from the file (a list, if well formed).
    - `itemsize`: the bytes per element of the array's dtype.

    **Returns:**

    A sentence fragment saying what is wrong (e.g. `"shape has 100 axes, more
    than numpy's 64"`), or `None` if the shape is a list of non-negative ints that
    numpy can make an array of.
    """
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return f"shape {shape!r} is not a list of non-negative ints"[:300]
    if len(shape) > MAX_NDIM:
        return f"shape has {len(shape)} axes, more than numpy's {MAX_NDIM}"
    if math.prod(d for d in shape if d) * itemsize > MAX_BYTES:
        return f"shape {tuple(shape)} is too large for any array on this machine"
    return None

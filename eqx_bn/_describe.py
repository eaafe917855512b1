"""How error messages name a value."""

from typing import Any

import numpy as np


def with_article(noun: str) -> str:
    """`noun` with its indefinite article: `"an int"`, `"a dict"`, `"an ndarray"`.

    Told by the first letter, which is how a Python type name reads aloud but for
    `u` (`uint8` says "you": "a") and `nd` (`ndarray` says "en": "an").
    """
    vowel = noun[:1].lower() in ("a", "e", "i", "o") or noun.startswith("nd")
    return f"{'an' if vowel else 'a'} {noun}"


def describe(x: Any) -> str:
    """`float32[4, 3]` for an array (or anything with `shape` and `dtype`), `an int`,
    `a dict` (the type with its article) for anything else: how error messages name
    a leaf."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{np.dtype(x.dtype).name}[{', '.join(map(str, x.shape))}]"
    return with_article(type(x).__name__)

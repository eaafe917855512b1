"""Test-session settings: strict dtype and rank promotion, so that silent upcasts fail.

Flax's own code relies on standard promotion (e.g. bfloat16 - float32); calls into
Flax are wrapped in `flax_promotion()` from `tests/helpers.py`.
"""

import pathlib
import sys

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# Examples import their shared `_common` module from their own folder, as Python
# does when a script is run; tests that import an example need the same.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))


@pytest.fixture
def key():
    return jax.random.key(0)

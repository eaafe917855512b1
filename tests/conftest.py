"""Test-session settings: strict dtype and rank promotion, so that silent upcasts fail.

Flax's own code relies on standard promotion (e.g. bfloat16 - float32); calls into
Flax are wrapped in `flax_promotion()` from `tests/helpers.py`.
"""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)

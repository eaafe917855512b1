"""Small shared helpers for the tests (not fixtures: plain functions to import)."""

import contextlib

import equinox as eqx
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


def normal(shape, seed=1):
    """Standard normal float32 values from numpy (no RNG kernel to compile)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def assert_bitwise(got, expected):
    """Same tree structure, and every leaf the same dtype, shape and bytes."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    for a, b in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)
    ):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@eqx.filter_jit
def eval_batch(model, state, x):
    """The model's inference outputs for a batch (one example per vmap step)."""
    model = eqx.nn.inference_mode(model)
    out, _ = jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)
    return out


@eqx.filter_jit
def train_batch(model, state, x):
    """The model's training outputs and new State for a batch named `"batch"`."""
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )


def apply_per_example(layer, x):
    """A per-example Equinox layer over a batch (Dense/Linear, norms)."""
    return jax.vmap(layer)(x)


def apply_channels_first(layer, x):
    """A channels-first Equinox layer (Conv, GroupNorm) over a channels-last batch
    as Flax lays it out; the result channels last again."""
    return jnp.moveaxis(jax.vmap(layer)(channels_first(x)), 1, -1)


def apply_tokens(layer, x):
    """A per-token Equinox layer (Embedding) over `(batch, tokens)`."""
    return jax.vmap(jax.vmap(layer))(x)


def assert_as_accurate(ours, refs, key, factor=4, library="the reference", terms=None):
    """`ours` is as close to the float64 reference `refs[key]` as float32 rounding
    allows: `factor` times the reference library's own float32 error (`err/`), the
    effect of rounding every layer's output and gradient (`round/`), and epsilons of
    the terms summed to make each element (`terms`, else `terms/` in `refs`, else
    the result's own size).

    The keys follow `tests/data/REFERENCES.md`: `scope/name` holds the float64
    result rounded to float32, `scope/err/name` the library's float32 error (in
    files written without a scope, such as `cma.npz`, `err/scope/name`).
    """
    scope, _, name = key.partition("/")
    ref = np.asarray(refs[key], np.float64)
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape, (key, ours.shape, ref.shape)
    scoped = f"{scope}/err/{name}"
    err = float(refs[scoped if scoped in refs else f"err/{key}"])
    spread = float(refs.get(f"{scope}/round/{name}", 0.0))
    if terms is None:
        terms = refs.get(f"{scope}/terms/{name}", np.max(np.abs(ref), initial=0.0))
    size = float(terms)
    tol = factor * (max(err, spread) + np.finfo(np.float32).eps * size)
    worst = float(np.max(np.abs(ours - ref), initial=0.0))
    assert worst <= tol, (
        f"{key}: off by {worst:.3g}; allowed {tol:.3g} ({library} float32 off by "
        f"{err:.3g}, rounding moves it by {spread:.3g}, terms of size {size:.3g})"
    )


# `python -W error`, for the interpreters that tests start, but for the compilation
# cache they share with the test session (see `tests/conftest.py` and the
# `filterwarnings` in pyproject.toml): an entry caught half-written is compiled anew.
PYTHON_WARNINGS = [
    "-W",
    "error",
    "-W",
    "default:Error reading persistent compilation cache entry",
    "-W",
    "default:Error writing persistent compilation cache entry",
]

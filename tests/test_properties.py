"""Property-based tests (hypothesis) of what BatchNorm promises whatever the input."""

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import eqx_bn
from eqx_bn.interop import export_flax, load_flax
from eqx_bn.models.mlp import SeedMLP

# (batch, channels, *spatial). A few fixed shapes, the values drawn: XLA compiles
# each shape anew, and these cover what the layer tells apart (no spatial axis, one,
# two; one channel; a size-1 axis, squeezed out; the smallest batch).
shapes = st.sampled_from([(8, 3), (2, 1, 3), (5, 4, 1, 3), (3, 2, 3, 2)])


def batch_of(shape, seed, offset, spread):
    rng = np.random.default_rng(seed)
    return jnp.asarray(offset + spread * rng.standard_normal(shape), jnp.float32)


@settings(max_examples=8, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**16),
    offset=st.floats(-100, 100),
    spread=st.floats(0.1, 10),
    fast=st.booleans(),
)
def test_training_output_is_standardised_per_channel(shape, seed, offset, spread, fast):
    """Before the affine map, each channel has mean 0 and variance var/(var + eps)."""
    x = batch_of(shape, seed, offset, spread)
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        shape[1],
        axis_name=None,
        use_scale=False,
        use_bias=False,
        use_fast_variance=fast,
    )
    y, _ = bn(x, state)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    x64 = np.asarray(x, np.float64)
    var = x64.var(axis=axes)
    y64 = np.asarray(y, np.float64)
    # float32 rounding of x - mean, relative to the channel's spread
    tol = 1e-6 * (1 + np.abs(x64).max(axis=axes) / np.sqrt(var + 1e-5))
    assert np.all(np.abs(y64.mean(axis=axes)) <= tol)
    np.testing.assert_allclose(y64.var(axis=axes), var / (var + 1e-5), rtol=1e-4)


@settings(max_examples=8, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_inference_is_a_fixed_affine_map(shape, seed):
    """Eval output is a * x + b per channel, independent of the rest of the batch."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(c, axis_name=None)
    bn = eqx.tree_at(
        lambda b: (b.scale, b.bias),
        bn,
        (
            jnp.asarray(rng.normal(size=c), jnp.float32),
            jnp.asarray(rng.normal(size=c), jnp.float32),
        ),
    )
    stats = eqx_bn.RunningStats(
        jnp.asarray(rng.normal(size=c), jnp.float32),
        jnp.asarray(rng.uniform(0.1, 3, size=c), jnp.float32),
    )
    state = state.set(bn.state_index, stats)
    infer = eqx.nn.inference_mode(bn)
    x = batch_of(shape, seed, 0.0, 3.0)
    y, after = infer(x, state)
    # each example alone gives the same output as inside the batch
    y_first, _ = infer(x[:1], after)
    np.testing.assert_array_equal(y_first, y[:1])
    # and the map is affine: f(x) - f(0) is linear in x
    zero, _ = infer(jnp.zeros_like(x), after)
    y2, _ = infer(2 * x, after)
    np.testing.assert_allclose(y2 - zero, 2 * (y - zero), rtol=1e-5, atol=1e-5)
    unchanged = jax.tree.map(lambda a, b: bool((a == b).all()), after, state)
    assert jax.tree.all(unchanged)


@settings(max_examples=5, deadline=None)
@given(channels=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_state_round_trips_through_equinox_serialisation(channels, seed):
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(channels, axis_name=None)
    x = batch_of((5, channels, 3), seed, 1.0, 2.0)
    _, state = bn(x, state)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, (bn, state))
    buffer.seek(0)
    _, fresh_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(channels, axis_name=None)
    bn2, state2 = eqx.tree_deserialise_leaves(buffer, (bn, fresh_state))
    for a, b in zip(jax.tree.leaves((bn, state)), jax.tree.leaves((bn2, state2))):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=5, deadline=None)
@given(in_features=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_flax_to_eqx_bn_to_flax_is_the_identity(in_features, seed):
    """Random Flax variables of the seed MLP survive load + export bit for bit."""
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    variables = {
        "params": {
            "Dense_0": {"kernel": arr(in_features, 4), "bias": arr(4)},
            "BatchNorm_0": {"scale": arr(4), "bias": arr(4)},
            "Dense_1": {"kernel": arr(4, 1), "bias": arr(1)},
        },
        "batch_stats": {"BatchNorm_0": {"mean": arr(4), "var": np.abs(arr(4))}},
    }
    model, state = eqx.nn.make_with_state(SeedMLP)(in_features, key=jax.random.key(0))
    loaded, loaded_state = load_flax(model, state, variables)
    back = export_flax(loaded, loaded_state)
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    flat_back = dict(jax.tree_util.tree_flatten_with_path(back)[0])
    assert len(flat) == len(flat_back)
    for path, value in flat:
        np.testing.assert_array_equal(flat_back[path], value)
        assert flat_back[path].dtype == value.dtype

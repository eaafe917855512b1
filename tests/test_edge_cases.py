"""Numerical edge cases, each next to what Flax does with the same input."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import channels_last, flax_promotion, flax_train_step

import eqx_bn


def ours_train(x, mask=None, **kwargs):
    """One training step on a whole batch `(N, C, *spatial)`; returns y and stats."""
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        x.shape[1], axis_name=None, **kwargs
    )
    y, state = jax.jit(lambda x, s, m: bn(x, s, mask=m))(x, state, mask)
    return y, state.get(bn.state_index)


def flax_train(x, mask=None, **kwargs):
    bn = nn.BatchNorm(**kwargs)
    with flax_promotion():
        variables = bn.init(jax.random.key(0), channels_last(x), False)
    return flax_train_step(bn, variables, x, mask)


def test_batch_of_one_example_without_spatial_axes():
    """Variance 0: the output is `bias`, exactly as Flax."""
    x = jnp.array([[3.0, -1.0, 7.5]])
    y, stats = ours_train(x)
    fy, fstats = flax_train(x)
    np.testing.assert_array_equal(y, 0.0)
    np.testing.assert_array_equal(y, fy)
    np.testing.assert_allclose(stats.mean, fstats["mean"], rtol=1e-6)
    np.testing.assert_allclose(stats.var, fstats["var"], rtol=1e-6)


@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_constant_input_has_zero_variance(use_fast_variance):
    x = jnp.full((16, 2, 3, 3), 0.1)
    y, stats = ours_train(x, use_fast_variance=use_fast_variance)
    np.testing.assert_array_equal(stats.var, np.float32(0.99))  # 0.99 * 1 + 0.01 * 0
    assert np.all(np.isfinite(y))
    if use_fast_variance:
        # the shift is the constant itself: mean and output are exact
        np.testing.assert_array_equal(stats.mean, np.float32(0.01) * np.float32(0.1))
        np.testing.assert_array_equal(y, 0.0)
    else:
        # Flax's two-pass mean, sum/n, is off by rounding; rsqrt(eps) magnifies it
        fy, _ = flax_train(x, use_fast_variance=False)
        np.testing.assert_allclose(y, fy, atol=1e-3)
        assert np.max(np.abs(y)) < 1e-3


def test_large_mean_relative_to_std_stays_accurate():
    """|mean| = 1e4 * std: Flax's one-pass E[x^2] - E[x]^2 loses every digit."""
    rng = np.random.default_rng(0)
    x64 = 1e4 + rng.standard_normal((64, 3, 8, 8))
    x = jnp.asarray(x64, jnp.float32)
    exact_var = np.asarray(x, np.float64).var(axis=(0, 2, 3))
    _, stats = ours_train(x, momentum=0.0)
    _, fast = flax_train(x, momentum=0.0, use_fast_variance=True)
    _, two_pass = flax_train(x, momentum=0.0, use_fast_variance=False)
    # eqx_bn's shifted one-pass variance is as good as the two-pass one ...
    np.testing.assert_allclose(stats.var, exact_var, rtol=1e-4)
    np.testing.assert_allclose(two_pass["var"], exact_var, rtol=1e-4)
    # ... where Flax's fast variance is off by more than 10%.
    assert np.max(np.abs(fast["var"] / exact_var - 1)) > 0.1


def test_large_mean_under_vmap_with_masked_first_example():
    """The shift comes from valid elements only, even under a named axis."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(5e3 + rng.standard_normal((32, 2, 4)), jnp.float32)
    x = x.at[0].set(1e30)  # padding that the mask excludes
    mask = jnp.arange(32) > 0
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(2, momentum=0.0)
    _, state = jax.vmap(
        lambda xi, mi: bn(xi, state, mask=mi),
        axis_name="batch",
        out_axes=(0, None),
    )(x, mask)
    valid = np.asarray(x[1:], np.float64)
    stats = state.get(bn.state_index)
    np.testing.assert_allclose(stats.mean, valid.mean(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(stats.var, valid.var(axis=(0, 2)), rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_statistics_do_not_overflow(dtype):
    """x**2 of 1000 overflows float16; statistics are accumulated in float32."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(1000 + 300 * rng.standard_normal((32, 4, 4, 4)), dtype)
    y, stats = ours_train(x, dtype=dtype)
    assert y.dtype == dtype and stats.var.dtype == jnp.float32
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(
        stats.var, 0.99 + 0.01 * x64.var(axis=(0, 2, 3)), rtol=1e-5
    )
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    fy, _ = flax_train(x, dtype=dtype)
    np.testing.assert_allclose(
        np.asarray(y, np.float32),
        np.asarray(fy, np.float32),
        rtol=float(jnp.finfo(dtype).eps),
        atol=float(jnp.finfo(dtype).eps),
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_batch_keeps_running_stats_and_shows_in_output(bad):
    """Flax's baseline: the running stats become NaN for good. eqx_bn keeps the old
    running averages for the affected channel, and the output still shows the NaN."""
    x = jnp.ones((8, 2, 3)).at[3, 0, 1].set(bad)
    x = x.at[:, 1].set(jnp.arange(24.0).reshape(8, 3))
    y, stats = ours_train(x)
    fy, fstats = flax_train(x)
    assert np.isnan(fstats["mean"][0]) or np.isnan(fstats["var"][0])  # Flax: poisoned
    assert stats.mean[0] == 0.0 and stats.var[0] == 1.0  # kept
    assert not np.all(np.isfinite(y[:, 0]))  # visible in the output
    # the healthy channel is updated as Flax does
    np.testing.assert_allclose(stats.mean[1], fstats["mean"][1], rtol=1e-6)
    np.testing.assert_allclose(stats.var[1], fstats["var"][1], rtol=1e-6)
    np.testing.assert_allclose(y[:, 1], fy[:, 1], rtol=1e-6, atol=1e-6)


def test_mask_excluding_every_example():
    """Flax divides 0 by 0; eqx_bn leaves the running stats and outputs finite."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 3, 2)), jnp.float32)
    mask = jnp.zeros((4, 1, 1), bool)
    y, stats = ours_train(x, mask)
    _, fstats = flax_train(x, mask)
    assert np.all(np.isnan(fstats["mean"]))
    np.testing.assert_array_equal(stats.mean, 0.0)
    np.testing.assert_array_equal(stats.var, 1.0)
    assert np.all(np.isfinite(y))


def test_masked_out_nan_padding_is_ignored():
    """Padding rows full of NaN, masked out, affect neither stats nor valid outputs."""
    rng = np.random.default_rng(4)
    valid = jnp.asarray(rng.standard_normal((5, 2, 3)), jnp.float32)
    padded = jnp.concatenate([valid, jnp.full((3, 2, 3), jnp.nan)])
    mask = (jnp.arange(8) < 5).reshape(8, 1, 1)
    y, stats = ours_train(padded, mask)
    y_valid, stats_valid = ours_train(valid)
    np.testing.assert_allclose(stats.mean, stats_valid.mean, rtol=1e-6)
    np.testing.assert_allclose(stats.var, stats_valid.var, rtol=1e-6)
    np.testing.assert_allclose(y[:5], y_valid, rtol=1e-6, atol=1e-6)

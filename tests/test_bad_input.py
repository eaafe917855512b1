"""Bad input never escapes as a raw JAX/numpy error or a silent wrong result."""

import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from helpers import flax_promotion

import eqx_bn
from eqx_bn.interop import CheckpointError, read_msgpack


def make(*args, **kwargs):
    return eqx.nn.make_with_state(eqx_bn.BatchNorm)(*args, **kwargs)


def vmapped(bn, **kwargs):
    return jax.vmap(
        lambda x, s, m: bn(x, s, mask=m, **kwargs),
        axis_name="batch",
        in_axes=(0, None, 0),
        out_axes=(0, None),
    )


def running(bn, state):
    return jnp.stack(state.get(bn.state_index))


# --- empty input: an empty output and the running averages left as they are ---


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0)])
def test_empty_input_gives_empty_output_and_keeps_running_stats(shape):
    batch_bn, batch_state = make(3, axis_name=None, momentum=0.5)
    y, new = batch_bn(jnp.ones(shape), batch_state)
    assert y.shape == shape
    np.testing.assert_array_equal(running(batch_bn, new), [[0.0] * 3, [1.0] * 3])
    # The same as the layer's vmap twin does.
    bn, state = make(3, momentum=0.5)
    y_twin, twin = vmapped(bn)(jnp.ones(shape), state, jnp.ones(shape[0], bool))
    assert y_twin.shape == shape
    np.testing.assert_array_equal(running(bn, twin), running(batch_bn, new))
    # Inference has nothing to average either: an empty output.
    y_eval, _ = batch_bn(jnp.ones(shape), new, inference=True)
    assert y_eval.shape == shape


def test_empty_batch_has_zero_gradients():
    bn, state = make(3, axis_name=None)
    grads = eqx.filter_grad(lambda m, x: jnp.sum(m(x, state)[0]))(bn, jnp.ones((0, 3)))
    np.testing.assert_array_equal(grads.scale, np.zeros(3))


def test_flax_turns_running_stats_into_nan_on_an_empty_batch():
    layer = nn.BatchNorm(use_running_average=False)
    with flax_promotion():
        variables = layer.init(jax.random.key(0), jnp.ones((4, 3)))
        _, updates = layer.apply(variables, jnp.ones((0, 3)), mutable=["batch_stats"])
    assert np.isnan(updates["batch_stats"]["mean"]).all()


# --- configuration ---


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_size=3.0), "input_size must be a positive int, got 3.0"),
        (dict(input_size=True), "input_size must be a positive int, got True"),
        (dict(input_size=3, eps=float("nan")), "eps must be >= 0 and finite, got nan"),
        (dict(input_size=3, eps=float("inf")), "eps must be >= 0 and finite, got inf"),
        (
            dict(input_size=3, momentum=float("nan")),
            "momentum must be in .0, 1., got nan",
        ),
        (dict(input_size=3, momentum="0.9"), "momentum must be a real number"),
        (dict(input_size=3, dtype=jnp.int32), "dtype must be a floating-point dtype"),
        (dict(input_size=3, dtype="uint8"), "dtype must be a floating-point dtype"),
        (dict(input_size=3, param_dtype=jnp.int8), "param_dtype must be a floating"),
    ],
)
def test_bad_configuration_gets_the_library_message(kwargs, message):
    with pytest.raises(ValueError, match=f"^BatchNorm: {message}"):
        eqx_bn.BatchNorm(**kwargs)


@pytest.mark.parametrize("size", [np.int64(3), jnp.array(3)], ids=["numpy", "jax"])
def test_integer_scalars_are_accepted_as_numbers(size):
    bn = eqx_bn.BatchNorm(size, momentum=jnp.array(0.9), eps=np.float32(1e-3))
    assert bn.input_size == 3 and type(bn.input_size) is int
    assert type(bn.momentum) is float and bn.momentum == pytest.approx(0.9)


def test_flax_refuses_an_integer_dtype_too():
    layer = nn.BatchNorm(use_running_average=False, dtype=jnp.int32)
    with pytest.raises(ValueError, match="Dtype must be inexact"), flax_promotion():
        layer.init(jax.random.key(0), jnp.ones((4, 3)))


# --- dtypes of x and mask ---


def test_integer_x_says_how_to_convert():
    bn, state = make(3, axis_name=None)
    with pytest.raises(TypeError, match=re.escape("x.astype(jnp.float32)")) as e:
        bn(jnp.ones((4, 3), jnp.uint8), state)
    assert "got uint8 of shape (4, 3)" in str(e.value)


def test_float_mask_says_how_to_convert():
    bn, state = make(3, axis_name=None)
    with pytest.raises(TypeError, match=re.escape("mask.astype(bool)")) as e:
        bn(jnp.ones((4, 3)), state, mask=jnp.ones((4, 1)))
    assert "got float32 of shape (4, 1)" in str(e.value)


# --- a (batch,) mask with axis_name=None, as its vmap twin ---


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 4)])
def test_one_flag_per_example_mask_matches_the_vmap_twin(shape):
    x = jax.random.normal(jax.random.key(1), shape)
    mask = jnp.array([True, False, True, True])
    per_example = jnp.reshape(mask, (4,) + (1,) * (x.ndim - 1))
    bn, state = make(3, axis_name=None)
    _, fresh = make(3, axis_name=None)
    twin, twin_state = make(3)

    @jax.jit
    def run(x, mask, per_example):
        y, new = bn(x, state, mask=mask)
        # (4, 3, 4): the last axis has 4 entries too; it is not what the mask means.
        explicit, _ = bn(x, fresh, mask=per_example)
        y_twin, new_twin = vmapped(twin)(x, twin_state, mask)
        return y, explicit, y_twin, running(bn, new), running(twin, new_twin)

    y, explicit, y_twin, stats, stats_twin = run(x, mask, per_example)
    np.testing.assert_array_equal(y, explicit)
    np.testing.assert_allclose(y, y_twin, rtol=1e-6, atol=1e-6)
    # Absolutely too: a mean of a few 1e-5 (of inputs of size 1) carries the
    # rounding of its sums, which the two add in another order.
    np.testing.assert_allclose(stats, stats_twin, rtol=1e-6, atol=1e-6)


def test_other_one_dimensional_mask_broadcasts_as_usual():
    # A (time,) mask shared by every example is a plain broadcast (a regression:
    # every 1-d mask but (batch,) was refused for a while).
    bn, state = make(3, axis_name=None)
    x = jax.random.normal(jax.random.key(2), (4, 3, 7))
    mask = jnp.arange(7) < 5
    y, _ = bn(x, jax.tree.map(lambda a: a, state), mask=mask)
    explicit, _ = bn(x, state, mask=mask.reshape(1, 1, 7))
    np.testing.assert_array_equal(y, explicit)


def test_one_dimensional_mask_that_fits_nothing_says_which_shapes_work():
    bn, state = make(3, axis_name=None)
    with pytest.raises(ValueError, match=re.escape("mask of shape (3,)")) as e:
        bn(jnp.ones((4, 3, 2)), state, mask=jnp.ones(3, bool))
    assert "or (4,), one flag per example" in str(e.value)


# --- the vmap hint is not given when the layer is already under vmap ---


def test_doubly_batched_input_under_vmap_says_batched_twice():
    bn, state = make(3)
    with pytest.raises(ValueError, match="x has 4 channels") as e:
        jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            jnp.ones((2, 4, 3)), state
        )
    assert "batched twice" in str(e.value)
    assert "call the layer under" not in str(e.value)


def test_batch_outside_vmap_still_says_call_it_under_vmap():
    bn, state = make(3)
    with pytest.raises(ValueError, match="call the layer under jax.vmap"):
        bn(jnp.ones((4, 3)), state)


# --- forged shapes in a msgpack file ---


def _ext(shape, dtype="float32", data=b""):
    payload = msgpack.packb([shape, dtype.encode(), data], use_bin_type=True)
    return msgpack.ExtType(1, payload)


def _chunked(shape):
    return {
        "__msgpack_chunked_array__": True,
        "shape": {str(i): d for i, d in enumerate(shape)},
        "chunks": {"0": _ext([0])},
    }


FORGED = [
    pytest.param([0, 2**62], id="product-0-huge-dim"),
    pytest.param([0, 2**63], id="dim-over-int64"),
    pytest.param([0, 2**40, 2**40], id="overflowing-product"),
    pytest.param([2**32, 2**32], id="huge-nonzero"),
    pytest.param([0] * 65, id="too-many-axes"),
]


@pytest.mark.parametrize("shape", FORGED)
@pytest.mark.parametrize("chunked", [True, False])
def test_forged_array_shape_is_a_checkpoint_error_naming_the_path(shape, chunked):
    leaf = _chunked(shape) if chunked else _ext(shape)
    data = msgpack.packb({"params": {"Dense_0": {"kernel": leaf}}}, use_bin_type=True)
    with pytest.raises(CheckpointError, match="at 'params/Dense_0/kernel'"):
        read_msgpack(data)

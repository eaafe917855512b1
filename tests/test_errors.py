"""Bad input fails at once, naming what was wrong and what was expected."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_bn


def make(*args, **kwargs):
    return eqx.nn.make_with_state(eqx_bn.BatchNorm)(*args, **kwargs)


def vmapped(bn, **kwargs):
    return jax.vmap(
        lambda x, s: bn(x, s, **kwargs),
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
    )


def test_wrong_channel_count_names_input_size_and_shape():
    bn, state = make(3)
    with pytest.raises(ValueError, match=re.escape("x has 5 channels on axis 0")) as e:
        vmapped(bn)(jnp.ones((8, 5, 2)), state)
    assert "input_size=3" in str(e.value) and "(5, 2)" in str(e.value)


def test_whole_batch_given_to_a_per_example_layer_says_how_to_fix():
    bn, state = make(3)
    with pytest.raises(ValueError, match="It looks like a whole batch") as e:
        bn(jnp.ones((8, 3, 2)), state)
    assert "axis_name=None" in str(e.value) and "jax.vmap" in str(e.value)


@pytest.mark.parametrize("layout_last", [False, True])
def test_channels_in_the_other_layout_name_the_flag(layout_last):
    bn, state = make(3, channels_last=layout_last)
    x = jnp.ones((8, 5, 4, 3)) if not layout_last else jnp.ones((8, 3, 4, 5))
    with pytest.raises(ValueError, match="x has 5 channels") as e:
        vmapped(bn)(x, state)
    assert f"build the layer with channels_last={not layout_last}" in str(e.value)
    layout = "(*spatial, input_size)" if layout_last else "(input_size, *spatial)"
    assert layout in str(e.value)


def test_batch_layer_given_one_example():
    bn, state = make(3, axis_name=None)
    with pytest.raises(ValueError, match=re.escape("(batch, input_size, *spatial)")):
        bn(jnp.ones((3,)), state)


def test_training_without_the_named_axis_says_which_axis():
    bn, state = make(3)
    with pytest.raises(ValueError, match="'batch' is not bound") as e:
        bn(jnp.ones((3, 4)), state)
    assert "jax.vmap(..., axis_name='batch')" in str(e.value)


def test_training_under_vmap_with_another_axis_name():
    bn, state = make(3, axis_name="examples")
    with pytest.raises(ValueError, match="'examples' is not bound"):
        vmapped(bn)(jnp.ones((4, 3)), state)


def test_tuple_of_names_reports_the_missing_one():
    bn, state = make(3, axis_name=("batch", "data"))
    with pytest.raises(ValueError, match="'data' is not bound"):
        vmapped(bn)(jnp.ones((4, 3)), state)


def test_errors_raise_at_trace_time_under_jit():
    bn, state = make(3)
    with pytest.raises(ValueError, match="x has 4 channels"):
        eqx.filter_jit(vmapped(bn))(jnp.ones((2, 4)), state)


def test_integer_input_is_a_type_error_with_the_fix():
    bn, state = make(3)
    with pytest.raises(TypeError, match="x must be floating point, got int32") as e:
        vmapped(bn)(jnp.ones((4, 3), jnp.int32), state)
    assert "x.astype(jnp.float32)" in str(e.value)


def test_mask_of_wrong_dtype_is_a_type_error_with_the_fix():
    bn, state = make(3, axis_name=None)
    with pytest.raises(TypeError, match="mask must be boolean, got int32") as e:
        bn(jnp.ones((4, 3)), state, mask=jnp.ones((4, 1), jnp.int32))
    assert "mask.astype(bool)" in str(e.value)


def test_mask_of_wrong_shape_names_both_shapes():
    bn, state = make(3, axis_name=None)
    with pytest.raises(ValueError, match=re.escape("mask of shape (3,)")) as e:
        bn(jnp.ones((4, 3, 2)), state, mask=jnp.ones((3,), bool))
    assert "(4, 3, 2)" in str(e.value)
    # broadcastable but bigger than x is also refused
    with pytest.raises(ValueError, match="does not broadcast"):
        bn(jnp.ones((4, 3)), state, mask=jnp.ones((2, 4, 3), bool))


def test_numpy_inputs_are_accepted():
    bn, state = make(3, axis_name=None)
    y, _ = bn(np.ones((4, 3), np.float32), state, mask=np.ones((4, 1), bool))
    assert isinstance(y, jax.Array) and y.shape == (4, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_size=0), "input_size must be a positive int"),
        (dict(input_size=3, momentum=1.5), "momentum must be in"),
        (dict(input_size=3, eps=-1.0), "eps must be >= 0"),
        (
            dict(input_size=3, axis_name=None, axis_index_groups=[[0], [1]]),
            "axis_index_groups needs an axis_name",
        ),
    ],
)
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        eqx_bn.BatchNorm(**kwargs)


def test_failed_call_leaves_the_state_usable():
    bn, state = make(3)
    with pytest.raises(ValueError):
        vmapped(bn)(jnp.ones((4, 2)), state)
    y, new_state = vmapped(bn)(jnp.ones((4, 3)), state)
    assert y.shape == (4, 3)
    np.testing.assert_allclose(new_state.get(bn.state_index).mean, 0.01)

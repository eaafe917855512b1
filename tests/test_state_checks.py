"""The State is checked against the layer, in training and in inference.

`state.get` returns whatever the State holds under the layer's key; a State of
another model, one vmapped with `out_axes=0`, or one mixed with another build used
to update silently, broadcast silently, or fail one call later.
"""

import re
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flax_promotion

import eqx_bn
from eqx_bn import _batch_norm


def make(*args, **kwargs):
    return eqx.nn.make_with_state(eqx_bn.BatchNorm)(*args, **kwargs)


def batched(bn, *, out_axes=(0, None)):
    return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=out_axes)


X = jnp.arange(12.0).reshape(4, 3)


@pytest.mark.parametrize("inference", [False, True])
def test_state_of_another_model_names_both_sizes(inference):
    bn, _ = make(3, axis_name=None)
    _, other = make(8, axis_name=None)
    with pytest.raises(ValueError, match=re.escape("mean float32[8]")) as e:
        bn(X, other, inference=inference)
    message = str(e.value)
    assert "(input_size=3) expects float32[3]" in message
    assert "input_size=8" in message and "make_with_state" in message


@pytest.mark.parametrize("inference", [False, True])
def test_state_vmapped_with_out_axes_0_says_use_out_axes_0_none(inference):
    bn, state = make(3)
    _, stacked = batched(bn, out_axes=0)(X, state)
    # The mistake itself passes (JAX stacks 4 equal copies); the next call says why.
    assert stacked.get(bn.state_index).mean.shape == (4, 3)
    layer = eqx.nn.inference_mode(bn) if inference else bn
    with pytest.raises(ValueError, match=re.escape("out_axes=(0, None)")) as e:
        batched(layer)(X, stacked)
    assert "float32[4, 3]" in str(e.value) and "extra leading axis" in str(e.value)


def test_flax_broadcasts_stacked_statistics_silently_in_inference():
    """What the check above prevents: Flax returns a wrong-shaped result."""
    layer = nn.BatchNorm(use_running_average=True)
    variables = {
        "params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
        "batch_stats": {"mean": jnp.zeros((4, 3)), "var": jnp.ones((4, 3))},
    }
    # Flax's code relies on standard dtype and rank promotion.
    with flax_promotion(), jax.numpy_rank_promotion("allow"):
        y = layer.apply(variables, X)
    assert y.shape == (1, 4, 3)  # not X's shape, and no error


def test_state_of_another_build_is_a_value_error_not_a_key_error():
    bn, _ = make(3, axis_name=None)
    raw = eqx_bn.BatchNorm(3, axis_name=None)
    with pytest.raises(ValueError, match="holds no running statistics") as e:
        bn(X, eqx.nn.State(raw))
    assert "make_with_state" in str(e.value)


def test_state_of_another_instance_is_caught_where_the_keys_differ():
    """Issue 21 item 2: a State made for another BatchNorm of the same shape, as
    docs/faq.md describes it with Equinox 0.13.8's keys."""
    # Built without make_with_state, each layer has an object key of its own.
    bn = eqx_bn.BatchNorm(3, axis_name=None)
    other = eqx_bn.BatchNorm(3, axis_name=None)
    with pytest.raises(ValueError, match="holds no running statistics") as e:
        bn(X, eqx.nn.State(other))
    assert "State holds 1 entry (an object key" in str(e.value)
    # make_with_state keys by class name and path: another class's State lacks it.
    bn, state = make(3, axis_name=None)
    _, seq_state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx_bn.BatchNorm(3, axis_name=None)]
    )
    expected = (
        "Its key is 'BatchNorm.state_index'; the State holds 1 entry "
        "('Sequential.layers[0].state_index')"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        bn(X, seq_state)
    # The same class built again has the same keys: its State is accepted (by
    # Equinox's design, so that a rebuilt model takes a saved State).
    _, twin_state = make(3, axis_name=None)
    y, twin_state = bn(X, twin_state)
    assert y.shape == X.shape


def test_eqx_batch_norm_gives_a_bare_key_error_for_another_build():
    ebn, _ = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    other = eqx.nn.State(eqx.nn.BatchNorm(3, "batch", mode="batch"))
    with pytest.raises(KeyError):
        batched(ebn)(X, other)


@pytest.mark.parametrize("inference", [False, True])
def test_state_cast_to_another_dtype_says_cast_it_back(inference):
    bn, state = make(3, axis_name=None)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), state)
    with pytest.raises(ValueError, match=re.escape("bfloat16[3]")) as e:
        bn(X, half, inference=inference)
    assert "a.astype(jnp.float32)" in str(e.value)


def test_float64_param_dtype_without_x64_accepts_its_own_state():
    """Without x64 JAX stores float64 as float32; the check expects what the layer
    really put in its State (a regression: every call was refused)."""
    with warnings.catch_warnings():  # JAX's own warnings that float64 is float32
        warnings.filterwarnings("ignore", "Explicitly requested dtype float64")
        bn, state = make(
            3, axis_name=None, param_dtype=jnp.float64, force_float32_reductions=False
        )
        y, state = bn(X, state)
        y, _ = bn(X, state, inference=True)
    assert y.dtype == jnp.float32


def test_ensemble_with_one_state_per_member_still_works():
    """in_axes=0 over a stacked State is the right way to keep several; not refused."""

    @eqx.filter_vmap
    def build(key):
        return make(3, key=key)

    bns, states = build(jax.random.split(jax.random.key(0), 2))
    run = eqx.filter_vmap(
        lambda m, s, x: batched(m)(x, s), in_axes=(eqx.if_array(0), 0, None)
    )
    y, new = run(bns, states, X)
    assert y.shape == (2, 4, 3)
    assert new.get(bns.state_index).mean.shape == (2, 3)


def test_state_check_adds_nothing_to_the_compiled_step(monkeypatch):
    """The check reads shapes and dtypes only: the traced step is the same without."""
    bn, state = make(3)

    def jaxpr():
        return str(jax.make_jaxpr(batched(bn))(X, state))

    checked = jaxpr()
    monkeypatch.setattr(_batch_norm, "check_running", lambda *args: None)
    assert checked == jaxpr()


def test_state_checks_raise_at_trace_time_under_jit():
    bn, _ = make(3, axis_name=None)
    _, other = make(8, axis_name=None)
    with pytest.raises(ValueError, match="input_size=8"):
        eqx.filter_jit(bn)(X, other)
    np.testing.assert_array_equal(other.get(bn.state_index).mean, np.zeros(8))

"""`eqx_bn.models`: the seed MLP and the ResNet mirror Flax's module trees."""

import functools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_reference import ResNet as FlaxResNet, numpy_init
from helpers import channels_first, channels_last, flax_promotion

from eqx_bn.interop import flax_paths, load_flax
from eqx_bn.models import (
    ResNet,
    ResNet18,
    ResNet34,
    ResNetBlock,
    SeedMLP,
    channels_last_conv,
)
from eqx_bn.models._resnet import max_pool


def _max_pool(x):
    return max_pool(x, ResNet.pool_padding)  # Flax's "SAME"


def _flat(variables):
    return {
        "/".join(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
    }


@pytest.mark.parametrize(
    "make, stage_sizes", [(ResNet18, (2, 2, 2, 2)), (ResNet34, (3, 4, 6, 3))]
)
def test_resnet_tree_is_flaxs(make, stage_sizes):
    # Abstract on both sides: only names, shapes and dtypes are compared.
    x = jnp.ones((1, 32, 32, 3))
    flax_module = FlaxResNet(stage_sizes=stage_sizes, num_classes=10, num_filters=4)
    with flax_promotion():
        shapes = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), x, False))
    model, state = eqx.filter_eval_shape(
        lambda: eqx.nn.make_with_state(make)(10, num_filters=4, key=jax.random.key(0))
    )
    assert set(flax_paths(model)) == set(_flat(shapes))
    # Every shape agrees too, or this strict load raises.
    loaded, _ = load_flax(model, state, numpy_init(shapes))
    assert len(loaded.blocks) == sum(stage_sizes)
    paths = flax_paths(model)
    first_proj = stage_sizes[0]  # the first block of the second stage
    assert paths[f"params/ResNetBlock_{first_proj}/conv_proj/kernel"] == (
        f"model.blocks[{first_proj}].conv_proj.weight"
    )
    last = sum(stage_sizes) - 1
    assert paths[f"batch_stats/ResNetBlock_{last}/BatchNorm_1/mean"] == (
        f"state[model.blocks[{last}].norm_1.state_index].mean"
    )
    assert paths["params/conv_init/kernel"] == "model.conv_init.weight"
    assert paths["batch_stats/bn_init/var"] == "state[model.bn_init.state_index].var"
    assert paths["params/Dense_0/kernel"] == "model.head.weight"


@pytest.mark.parametrize("size", [8, 9])
def test_max_pool_pads_as_flax(size):
    # Negative inputs: the padding must be -inf, and on even sizes only at the end.
    rng = np.random.default_rng(0)
    x = jnp.asarray(-np.abs(rng.normal(size=(2, size, size, 3))) - 1.0, jnp.float32)
    expected = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    np.testing.assert_array_equal(jax.vmap(_max_pool)(x), expected)


def test_resnet_blocks_follow_flax():
    model = eqx.filter_eval_shape(
        ResNet, (1, 1), 3, num_filters=2, key=jax.random.key(0)
    )
    first, second = model.blocks
    assert first.conv_proj is None and first.norm_proj is None
    assert second.conv_proj is not None and second.conv_proj.stride == (2, 2)
    assert second.conv_0.stride == (2, 2) and second.conv_0.padding == "SAME"
    assert model.conv_init.padding == ((3, 3), (3, 3))
    assert model.conv_init.use_bias is False
    assert model.bn_init.momentum == 0.9 and model.bn_init.eps == 1e-5
    assert model.head.in_features == 4 and model.head.out_features == 3


def _logits(model, state, x):
    train = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, new_state = train(x, state)
    infer = eqx.nn.inference_mode(model)
    y_eval, _ = jax.vmap(infer, in_axes=(0, None), out_axes=(0, None))(x, new_state)
    return y, y_eval, new_state


def test_channels_last_resnet_is_the_same_model():
    """Same parameters, state and Flax names; NHWC images give exactly the logits
    and statistics that the channels-first model gives on NCHW images (XLA's CPU
    backend runs both as the same channels-last convolution)."""
    make = eqx.nn.make_with_state(ResNet)
    first, state = make((1, 1), 5, num_filters=4, key=jax.random.key(0))
    last, state_last = make(
        (1, 1), 5, num_filters=4, channels_last=True, key=jax.random.key(0)
    )
    assert flax_paths(first) == flax_paths(last)
    # Only the static layout flag differs: the same leaves, in the same order.
    leaves = jax.tree.leaves((first, state))
    leaves_last = jax.tree.leaves((last, state_last))
    assert len(leaves) == len(leaves_last)
    for a, b in zip(leaves, leaves_last):
        np.testing.assert_array_equal(a, b)
    # Both compute channels last inside; only the layout of the images differs.
    for model in (first, last):
        assert model.bn_init.channels_last
        assert all(b.norm_0.channels_last for b in model.blocks)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 19, 17)), jnp.float32)
    run = eqx.filter_jit(_logits)
    y, y_eval, new = run(first, state, x)
    y_l, y_eval_l, new_l = run(last, state_last, channels_last(x))
    np.testing.assert_array_equal(y_l, y)
    np.testing.assert_array_equal(y_eval_l, y_eval)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new_l), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resnet_block_in_either_layout():
    """A block used on its own keeps Equinox's channels-first default; channels last
    it gives the same numbers, moved."""
    make = eqx.nn.make_with_state(ResNetBlock)
    first, state = make(3, 4, 2, key=jax.random.key(0))
    last, state_last = make(3, 4, 2, channels_last=True, key=jax.random.key(0))
    assert not first.norm_0.channels_last and last.norm_0.channels_last
    assert first.conv_proj is not None  # the projection path runs too
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 9, 8)), jnp.float32)

    @eqx.filter_jit
    def run(block, state, x):
        call = functools.partial(block, inference=False)
        return jax.vmap(call, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            x, state
        )

    y, new = run(first, state, x)
    y_last, new_last = run(last, state_last, channels_last(x))
    assert y.shape == (4, 4, 5, 4)
    np.testing.assert_array_equal(channels_first(y_last), y)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new_last), strict=True):
        np.testing.assert_array_equal(a, b)


def test_last_scale_of_a_block_starts_at_zero():
    block = ResNetBlock(1, 1, key=jax.random.key(0))
    np.testing.assert_array_equal(block.norm_1.scale, jnp.zeros(1))
    np.testing.assert_array_equal(block.norm_0.scale, jnp.ones(1))


def test_resnet_rejects_empty_stages():
    with pytest.raises(ValueError, match="stage_sizes"):
        ResNet((), 10, key=jax.random.key(0))


@eqx.filter_jit
def _train_and_eval(model, state, x):
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, new_state = batched(x, state)
    inference = jax.vmap(
        eqx.nn.inference_mode(model), in_axes=(0, None), out_axes=(0, None)
    )
    y_eval, same = inference(x, new_state)
    return y, new_state, y_eval, same


def test_seed_mlp_under_vmap():
    model, state = eqx.nn.make_with_state(SeedMLP)(
        3, momentum=0.9, key=jax.random.key(0)
    )
    assert model.norm.momentum == 0.9 and model.norm.axis_name == "batch"
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
    y, new_state, y_eval, same = _train_and_eval(model, state, x)
    assert y.shape == y_eval.shape == (5, 1)
    stats = new_state.get(model.norm.state_index)
    assert not np.allclose(stats.mean, 0.0)
    # Inference leaves the state alone.
    np.testing.assert_array_equal(same.get(model.norm.state_index).var, stats.var)


def test_max_pool_is_differentiable_under_jit():
    """Regression: a jnp-array init made reduce_window lose its reverse-mode rule
    under jit, so the ResNet could not be trained in a jitted step."""
    x = jnp.arange(5 * 5 * 2, dtype=jnp.float32).reshape(5, 5, 2)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(_max_pool(x))))(x)
    assert grad.shape == x.shape and float(jnp.sum(grad)) == 2 * 3 * 3


@pytest.mark.parametrize(
    "dims, kwargs",
    [
        (1, dict(kernel_size=3, stride=2, padding="SAME", use_bias=True)),
        (2, dict(kernel_size=(3, 2), stride=(1, 2), padding=((2, 0), (1, 1)))),
        (2, dict(kernel_size=3, dilation=2, groups=2, padding="VALID")),
        (3, dict(kernel_size=2, padding=1, use_bias=True)),
    ],
)
def test_channels_last_conv_is_the_module_on_moved_axes(dims, kwargs):
    conv = eqx.nn.Conv(dims, 4, 6, key=jax.random.key(0), **kwargs)
    if conv.bias is not None:  # a non-zero bias, so that its layout is checked
        conv = eqx.tree_at(
            lambda c: c.bias,
            conv,
            conv.bias + jnp.arange(6.0).reshape((6,) + (1,) * dims),
        )
    x = jnp.asarray(
        np.random.default_rng(0).normal(size=(4,) + (7,) * dims), jnp.float32
    )
    expected = jnp.moveaxis(conv(x), 0, -1)
    actual = channels_last_conv(conv, jnp.moveaxis(x, 0, -1))
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def test_channels_last_conv_rejects_what_it_cannot_run():
    conv = eqx.nn.Conv2d(3, 2, 3, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"in_channels=3 last, got shape \(3, 8, 8\)"):
        channels_last_conv(conv, jnp.ones((3, 8, 8)))
    reflect = eqx.nn.Conv2d(
        3, 2, 3, padding=1, padding_mode="REFLECT", key=jax.random.key(0)
    )
    with pytest.raises(ValueError, match="padding_mode='REFLECT'"):
        channels_last_conv(reflect, jnp.ones((8, 8, 3)))

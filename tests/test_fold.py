"""`eqx_bn.fold_batch_norms`: folded models give the unfolded inference outputs.

Every BatchNorm gets random running statistics, scale and bias first, so that a fold
that forgot any of them (or applied them to the wrong axis) would be far off.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_bn
from eqx_bn.models import (
    ChannelsLastConv,
    ChannelsLastConv2d,
    ResNet,
    SeedMLP,
    TorchResNet,
)

EPS = float(jnp.finfo(jnp.float32).eps)


def _is_bn(v) -> bool:
    return isinstance(v, eqx_bn.BatchNorm)


def _randomise(model, state, seed: int = 0):
    """Every BatchNorm with random scale, bias and running statistics."""
    rng = np.random.default_rng(seed)

    def norm(bn):
        nonlocal state
        c = bn.input_size
        state = state.set(
            bn.state_index,
            eqx_bn.RunningStats(
                jnp.asarray(rng.normal(0, 0.5, c), jnp.float32),
                jnp.asarray(rng.uniform(0.3, 2.0, c), jnp.float32),
            ),
        )
        if bn.scale is not None:
            scale = jnp.asarray(rng.normal(1, 0.3, c), jnp.float32)
            bn = eqx.tree_at(lambda b: b.scale, bn, scale)
        if bn.bias is not None:
            bias = jnp.asarray(rng.normal(0, 0.3, c), jnp.float32)
            bn = eqx.tree_at(lambda b: b.bias, bn, bias)
        return bn

    model = jax.tree.map(lambda v: norm(v) if _is_bn(v) else v, model, is_leaf=_is_bn)
    return eqx.nn.inference_mode(model), state


def _per_example(model, x, state):
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)[0]


def _within_rounding(folded, reference, magnitude, terms: int):
    """|folded - reference| within the float32 rounding bound of a sum of `terms`
    products (gamma_n = n eps, Higham) of absolute size `magnitude`, for each of
    the two computations."""
    bound = 2 * (terms + 4) * EPS * magnitude
    np.testing.assert_array_less(np.abs(folded - reference), bound + 1e-30)


def _abs_layer(layer):
    """The layer with |weights| and |bias|: its output bounds the terms' sizes."""
    return jax.tree.map(lambda v: jnp.abs(v) if eqx.is_array(v) else v, layer)


def _pair(kind: str, dims: int, use_bias: bool, key):
    if kind == "linear":
        return eqx.nn.Linear(6, 5, use_bias=use_bias, key=key), (6,), 6
    groups = 2 if dims == 2 else 1
    cls = ChannelsLastConv if kind == "channels_last_conv" else eqx.nn.Conv
    conv = cls(
        dims, 4, 6, 3, stride=2 if dims == 2 else 1, padding=1, groups=groups,
        use_bias=use_bias, key=key,
    )  # fmt: skip
    example = (7,) * dims + (4,) if cls is ChannelsLastConv else (4,) + (7,) * dims
    return conv, example, 4 // groups * 3**dims


@pytest.mark.parametrize(
    "kind, dims, use_bias",
    [("linear", 0, True), ("linear", 0, False)]
    + [("conv", d, b) for d in (1, 2, 3) for b in (True, False)]
    + [("channels_last_conv", d, b) for d in (1, 2) for b in (True, False)],
)
def test_sequential_pair_matches_unfolded(kind, dims, use_bias, key):
    layer, shape, fan_in = _pair(kind, dims, use_bias, key)
    last = kind == "channels_last_conv"
    bn = eqx_bn.BatchNorm(5 if kind == "linear" else 6, channels_last=last)
    relu = eqx.nn.Lambda(jax.nn.relu)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([layer, bn, relu])
    model, state = _randomise(model, state)
    folded = eqx_bn.fold_batch_norms(model, state)

    assert isinstance(folded.layers[1], eqx_bn.FoldedBatchNorm)
    assert folded.layers[0].use_bias and type(folded.layers[0]) is type(layer)
    x = jax.random.normal(jax.random.key(1), (3, *shape))
    y = _per_example(folded, x, state)
    ref = _per_example(model, x, state)
    # Size of every term: (|layer|(|x|) + |mean|) * |mul| + |beta|.
    norm = model.layers[1]
    stats = state.get(norm.state_index)
    mul = np.abs(norm.scale) / np.sqrt(stats.var + norm.eps)
    absolute = np.asarray(jax.vmap(_abs_layer(model.layers[0]))(jnp.abs(x)))
    chan = (1,) * (dims + 1) + (-1,) if last else (1, -1) + (1,) * dims
    magnitude = (absolute + np.abs(stats.mean).reshape(chan)) * mul.reshape(chan)
    magnitude = magnitude + np.abs(norm.bias).reshape(chan)
    _within_rounding(y, ref, magnitude, fan_in)
    assert jnp.all(y == jax.nn.relu(y))  # the layers after the pair still run


def test_sequential_folds_only_adjacent_pairs(key):
    k0, k1 = jax.random.split(key)
    conv = eqx.nn.Conv2d(3, 4, 3, key=k0)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Sequential([conv, eqx_bn.BatchNorm(4)]),  # nested: folded
            eqx.nn.Lambda(jax.nn.relu),
            eqx_bn.BatchNorm(4),  # follows a relu: stays a BatchNorm
            eqx.nn.Conv2d(4, 2, 1, key=k1),
        ]
    )
    model, state = _randomise(model, state)
    folded = eqx_bn.fold_batch_norms(model, state)
    assert isinstance(folded.layers[0].layers[1], eqx_bn.FoldedBatchNorm)
    assert isinstance(folded.layers[2], eqx_bn.BatchNorm)
    assert folded.layers[3].weight is model.layers[3].weight
    x = jax.random.normal(jax.random.key(1), (2, 3, 6, 6))
    np.testing.assert_allclose(
        _per_example(folded, x, state), _per_example(model, x, state), rtol=0,
        atol=64 * EPS * float(jnp.max(jnp.abs(_per_example(model, x, state)))),
    )  # fmt: skip


class _Block(eqx.Module):
    """A user model declaring its pairs, one of them optional."""

    conv: eqx.nn.Conv2d
    norm: eqx_bn.BatchNorm = eqx.field(metadata={"fold_into": "conv"})
    dense: eqx.nn.Linear
    dense_norm: eqx_bn.BatchNorm = eqx.field(metadata={"fold_into": "dense"})
    extra: eqx.nn.Conv2d | None = None
    extra_norm: eqx_bn.BatchNorm | None = eqx.field(
        default=None, metadata={"fold_into": "extra"}
    )

    def __init__(self, key):
        k0, k1 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(3, 4, 3, use_bias=False, key=k0)
        self.norm = eqx_bn.BatchNorm(4)
        self.dense = eqx.nn.Linear(4, 2, key=k1)
        self.dense_norm = eqx_bn.BatchNorm(2)

    def __call__(self, x, state):
        y, state = self.norm(self.conv(x), state)
        y = jnp.mean(jax.nn.relu(y), axis=(1, 2))
        return self.dense_norm(self.dense(y), state)


def test_user_model_declared_pairs(key):
    model, state = eqx.nn.make_with_state(_Block)(key)
    models = (model, model)  # in a container: found and folded too
    models, state = _randomise(models, state)
    folded = eqx_bn.fold_batch_norms(models, state)
    for m in folded:
        assert isinstance(m.norm, eqx_bn.FoldedBatchNorm)
        assert isinstance(m.dense_norm, eqx_bn.FoldedBatchNorm)
        assert m.extra is None and m.extra_norm is None
    x = jax.random.normal(jax.random.key(1), (4, 3, 8, 8))
    ref = _per_example(models[0], x, state)
    y = _per_example(folded[0], x, state)
    np.testing.assert_allclose(y, ref, rtol=0, atol=64 * EPS * jnp.max(jnp.abs(ref)))


@pytest.fixture(scope="module")
def resnets():
    """A small ResNet in each layout, random statistics, folded and unfolded."""
    out = {}
    for channels_last in (False, True):
        model, state = eqx.nn.make_with_state(ResNet)(
            (1, 1), 5, num_filters=4, channels_last=channels_last,
            key=jax.random.key(2),
        )  # fmt: skip
        model, state = _randomise(model, state)
        out[channels_last] = model, state, eqx_bn.fold_batch_norms(model, state)
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_matches_unfolded(resnets, channels_last):
    model, state, folded = resnets[channels_last]
    left = jax.tree.leaves(folded, is_leaf=_is_bn)
    assert not any(_is_bn(v) for v in left), "every ResNet BatchNorm follows a conv"
    is_folded = lambda v: isinstance(v, eqx_bn.FoldedBatchNorm)  # noqa: E731
    n_folded = sum(map(is_folded, jax.tree.leaves(folded, is_leaf=is_folded)))
    assert n_folded == 1 + 2 * 2 + 1  # stem, two blocks, one projection
    x = jax.random.normal(jax.random.key(3), (3, 3, 16, 16))
    if channels_last:
        x = jnp.moveaxis(x, 1, -1)
    # Both jitted: eagerly, each operation of the network compiles on its own.
    ref = eqx.filter_jit(_per_example)(model, x, state)
    y = eqx.filter_jit(_per_example)(folded, x, state)
    # Four convolutions deep, each within its own rounding (<= 64 ulps of the
    # output's scale); a missing statistic would be off by O(1).
    np.testing.assert_allclose(y, ref, rtol=0, atol=64 * EPS * jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_torchvision_resnet_folds_every_norm(block):
    """torchvision's layout declares every pair, the projection's too."""
    model, state = eqx.nn.make_with_state(TorchResNet)(
        block, (1, 1, 1, 1), 5, width=4, key=jax.random.key(4)
    )
    model, state = _randomise(model, state)
    folded = eqx_bn.fold_batch_norms(model, state)
    assert not any(_is_bn(v) for v in jax.tree.leaves(folded, is_leaf=_is_bn))
    x = jax.random.normal(jax.random.key(5), (2, 3, 32, 32))
    ref = eqx.filter_jit(_per_example)(model, x, state)
    y = eqx.filter_jit(_per_example)(folded, x, state)
    np.testing.assert_allclose(y, ref, rtol=0, atol=64 * EPS * jnp.max(jnp.abs(ref)))


def test_seed_mlp_and_state_unchanged(key):
    model, state = eqx.nn.make_with_state(SeedMLP)(2, key=key)
    model, state = _randomise(model, state)
    folded = eqx_bn.fold_batch_norms(model, state)
    assert isinstance(folded.norm, eqx_bn.FoldedBatchNorm)
    x = jax.random.normal(jax.random.key(1), (5, 2))
    y, new_state = jax.vmap(folded, in_axes=(0, None), out_axes=(0, None))(x, state)
    ref = _per_example(model, x, state)
    np.testing.assert_allclose(y, ref, rtol=0, atol=64 * EPS * jnp.max(jnp.abs(ref)))
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new_state, state)
    )


def test_folding_twice_changes_nothing(resnets):
    model, state, folded = resnets[True]
    again = eqx_bn.fold_batch_norms(folded, state)
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, again, folded))


def test_folded_norm_checks_channels():
    norm = eqx_bn.FoldedBatchNorm(4, channel_axis=0)
    state = eqx.nn.State(norm)
    y, same = norm(jnp.ones((4, 3)), state)
    assert y.shape == (4, 3) and same is state
    with pytest.raises(ValueError, match="has no 4 channels on axis 0"):
        norm(jnp.ones((3, 4)), state)


def test_norm_without_scale_or_bias(key):
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx.nn.Linear(3, 4, key=key), eqx_bn.BatchNorm(4, use_scale=False,
                                                         use_bias=False)]
    )  # fmt: skip
    model, state = _randomise(model, state)
    folded = eqx_bn.fold_batch_norms(model, state)
    x = jax.random.normal(jax.random.key(1), (5, 3))
    ref = _per_example(model, x, state)
    y = _per_example(folded, x, state)
    np.testing.assert_allclose(y, ref, rtol=0, atol=64 * EPS * jnp.max(jnp.abs(ref)))


def test_training_mode_is_refused(key):
    model, state = eqx.nn.make_with_state(SeedMLP)(2, key=key)
    with pytest.raises(ValueError, match=r"training mode.*model\.norm.*inference_mode"):
        eqx_bn.fold_batch_norms(model, state)
    folded = eqx_bn.fold_batch_norms(eqx.nn.inference_mode(model), state)
    x = jnp.ones((2, 2))
    with pytest.raises(ValueError, match="only run in inference"):
        jax.vmap(lambda x: folded(x, state, inference=False), axis_name="batch")(x)
    with pytest.raises(ValueError, match="only run in inference"):
        _per_example(eqx.nn.inference_mode(folded, False), x, state)


class _Declared(eqx.Module):
    conv: eqx.Module
    norm: eqx_bn.BatchNorm = eqx.field(metadata={"fold_into": "conv"})


def _declared(conv, norm):
    model, state = eqx.nn.make_with_state(_Declared)(conv, norm)
    return eqx.nn.inference_mode(model), state


def test_absent_optional_norm_is_left_alone(key):
    """Issue 21 item 1: a declared BatchNorm field that holds None (an optional
    norm, absent here) has nothing to fold; it was refused as "a NoneType"."""

    class Optional(eqx.Module):
        conv: eqx.nn.Conv2d
        norm: eqx_bn.BatchNorm | None = eqx.field(metadata={"fold_into": "conv"})

        def __call__(self, x, state):
            return self.conv(x), state

    model, state = eqx.nn.make_with_state(Optional)(
        eqx.nn.Conv2d(3, 4, 1, key=key), None
    )
    folded = eqx_bn.fold_batch_norms(model, state)
    assert folded.norm is None
    assert folded is model  # nothing to fold: the very same model


@pytest.mark.parametrize(
    "conv, norm, error, match",
    [
        (eqx.nn.Lambda(jax.nn.relu), eqx_bn.BatchNorm(4),
         TypeError, "follows a Lambda"),
        (eqx.nn.Conv2d(3, 4, 1, key=jax.random.key(0)), eqx_bn.BatchNorm(5),
         ValueError, "gives 4 output channels, but the BatchNorm normalises 5"),
        (eqx.nn.Linear(3, "scalar", key=jax.random.key(0)), eqx_bn.BatchNorm(1),
         ValueError, "gives a scalar"),
        (eqx.nn.Conv2d(3, 4, 1, key=jax.random.key(0)), eqx.nn.Identity(),
         TypeError, "not an eqx_bn.BatchNorm"),
        (eqx.nn.Conv2d(3, 4, 1, key=jax.random.key(0)),
         eqx_bn.BatchNorm(4, dtype=jnp.bfloat16), ValueError, "outputs bfloat16"),
        # float32 scale and bias promote a bfloat16 layer's output (a regression:
        # folding silently changed the output dtype).
        (eqx.nn.Linear(3, 4, dtype=jnp.bfloat16, key=jax.random.key(0)),
         eqx_bn.BatchNorm(4), ValueError, "outputs float32"),
    ],
)  # fmt: skip
def test_incompatible_declared_pair(conv, norm, error, match):
    model, state = _declared(conv, norm)
    with pytest.raises(error, match=match):
        eqx_bn.fold_batch_norms(model, state)


def test_a_state_that_is_not_the_layers_is_refused(key):
    """The State check of the BatchNorm itself, not a broadcast error (or, with a
    batch of one, a silent fold) for a State vmapped with out_axes=0."""
    model, state = _declared(eqx.nn.Conv2d(3, 4, 1, key=key), eqx_bn.BatchNorm(4))
    stacked = jax.tree.map(lambda a: jnp.stack([a]), state)
    with pytest.raises(ValueError, match=re.escape("out_axes=(0, None)")):
        eqx_bn.fold_batch_norms(model, stacked)


def test_tuple_of_one_array_is_left_alone(key):
    # A regression: comparing leaves with `==` failed on a one-array tuple.
    class WithTuple(eqx.Module):
        extra: tuple
        layers: eqx.nn.Sequential

    model, state = eqx.nn.make_with_state(WithTuple)(
        (jnp.arange(3.0),),
        eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=key), eqx_bn.BatchNorm(4)]),
    )
    folded = eqx_bn.fold_batch_norms(eqx.nn.inference_mode(model), state)
    np.testing.assert_array_equal(folded.extra[0], model.extra[0])
    assert isinstance(folded.layers.layers[1], eqx_bn.FoldedBatchNorm)


def test_declaration_errors(key):
    class Missing(eqx.Module):
        norm: eqx_bn.BatchNorm = eqx.field(metadata={"fold_into": "conv"})

    class Twice(eqx.Module):
        conv: eqx.nn.Conv2d
        a: eqx_bn.BatchNorm = eqx.field(metadata={"fold_into": "conv"})
        b: eqx_bn.BatchNorm = eqx.field(metadata={"fold_into": "conv"})

    model, state = eqx.nn.make_with_state(Missing)(eqx_bn.BatchNorm(4))
    with pytest.raises(ValueError, match="has no field 'conv' to fold into"):
        eqx_bn.fold_batch_norms(eqx.nn.inference_mode(model), state)
    conv = eqx.nn.Conv2d(3, 4, 1, key=key)
    model, state = eqx.nn.make_with_state(Twice)(
        conv, eqx_bn.BatchNorm(4), eqx_bn.BatchNorm(4)
    )
    with pytest.raises(ValueError, match="'conv' is already the layer of 'a'"):
        eqx_bn.fold_batch_norms(eqx.nn.inference_mode(model), state)


_LAST, _FIRST = eqx_bn.BatchNorm(4, channels_last=True), eqx_bn.BatchNorm(4)


@pytest.mark.parametrize(
    "conv, norm, match",
    [
        (eqx.nn.Conv2d, _LAST, "first, but .* for channels last"),
        (eqx.nn.Conv2d, eqx_bn.BatchNorm(4, axis_name=None), r"\(axis_name=None\)"),
        (ChannelsLastConv2d, _FIRST, "last, but .* for channels first"),
    ],
)
def test_sequential_layout_mismatch(conv, norm, match, key):
    seq = [conv(3, 4, 1, key=key), norm]
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(seq)
    with pytest.raises(ValueError, match=match):
        eqx_bn.fold_batch_norms(eqx.nn.inference_mode(model), state)

"""`eqx_bn.models`: the seed MLP and the ResNet mirror Flax's module trees."""

import functools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax_reference import ResNet as FlaxResNet, numpy_init
from helpers import channels_first, channels_last, flax_promotion

import eqx_bn
from eqx_bn.interop import export_flax, flax_paths, load_flax
from eqx_bn.models import (
    ChannelsLastConv,
    ChannelsLastConv2d,
    ResNet,
    ResNet18,
    ResNet34,
    ResNetBlock,
    SeedMLP,
    TorchResNet,
    TorchResNet18,
    channels_last_conv,
)
from eqx_bn.models._resnet import max_pool


def _max_pool(x):
    return max_pool(x, ResNet._pool_padding)  # Flax's "SAME"


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


_CONV_CASES = [
    (1, dict(kernel_size=3, stride=2, padding="SAME", use_bias=True)),
    (2, dict(kernel_size=(3, 2), stride=(1, 2), padding=((2, 0), (1, 1)))),
    (2, dict(kernel_size=3, dilation=2, groups=2, padding="VALID")),
    (3, dict(kernel_size=2, padding=1, use_bias=True)),
]


@pytest.mark.parametrize("dims, kwargs", _CONV_CASES)
def test_channels_last_conv_layer_is_equinox_conv_laid_out_as_flax(dims, kwargs):
    """`ChannelsLastConv` is `eqx.nn.Conv` (same arguments, same key: the same
    initial weights) with the kernel `(*kernel, in, out)` and the bias `(out,)`,
    and gives its outputs on the channels-last example."""
    conv = eqx.nn.Conv(dims, 4, 6, key=jax.random.key(0), **kwargs)
    ours = ChannelsLastConv(dims, 4, 6, key=jax.random.key(0), **kwargs)
    np.testing.assert_array_equal(
        ours.weight, np.moveaxis(conv.weight, (0, 1), (-1, -2))
    )
    if conv.bias is not None:  # a non-zero bias, so that its layout is checked
        bias = jnp.arange(6.0)
        conv = eqx.tree_at(lambda c: c.bias, conv, bias.reshape((6,) + (1,) * dims))
        ours = eqx.tree_at(lambda c: c.bias, ours, bias)
    else:
        assert ours.bias is None
    x = jnp.asarray(
        np.random.default_rng(0).normal(size=(4,) + (7,) * dims), jnp.float32
    )
    expected = jnp.moveaxis(conv(x), 0, -1)
    actual = ours(jnp.moveaxis(x, 0, -1))
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def test_channels_last_conv_layer_matches_flax_conv():
    """Flax's `nn.Conv` kernel and bias, as they are, give Flax's output."""
    flax_conv = nn.Conv(6, (3, 3), strides=2, padding="SAME")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(9, 9, 4)), jnp.float32)
    params = flax_conv.init(jax.random.key(1), x[None])["params"]
    params = {**params, "bias": params["bias"] + jnp.arange(6.0)}
    ours = ChannelsLastConv2d(4, 6, 3, 2, padding="SAME", key=jax.random.key(0))
    ours = eqx.tree_at(
        lambda c: (c.weight, c.bias), ours, (params["kernel"], params["bias"])
    )
    expected = flax_conv.apply({"params": params}, x[None])[0]
    np.testing.assert_allclose(ours(x), expected, rtol=1e-6, atol=1e-6)


def test_channels_last_conv_layer_rejects_what_it_cannot_run():
    conv = ChannelsLastConv2d(3, 2, 3, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"in_channels=3 last, got shape \(3, 8, 8\)"):
        conv(jnp.ones((3, 8, 8)))
    with pytest.raises(TypeError, match="padding_mode"):  # zero padding only
        ChannelsLastConv2d(3, 2, 3, padding_mode="REFLECT", key=jax.random.key(0))


# ------------------------------------------- construction (issue 22) and input


def _ks(ours, reference, what, limit=20000):
    """Two-sample Kolmogorov-Smirnov test that `ours` is drawn as `reference` is
    (at most `limit` values of each). The keys are fixed, so the outcome is too;
    a p-value under 1e-3 means another distribution: at 20000 values a
    difference of D > 0.02 between the two CDFs (a scale off by 5%), at 200000
    D > 0.006 (a plain normal for a truncated one)."""
    ours, reference = np.ravel(ours)[:limit], np.ravel(reference)[:limit]
    p = scipy.stats.ks_2samp(ours, reference, method="asymp").pvalue
    assert p > 1e-3, f"{what}: p={p:.2g}, std {ours.std():.4g} vs {reference.std():.4g}"


def _constant(values):
    values = np.asarray(values)
    return values.size > 0 and bool(np.all(values == values.flat[0]))


@pytest.mark.live  # importing torch alone takes seconds
@pytest.mark.parametrize("case", ["resnet18", "resnext_zero_init"])
def test_torchvision_named_weights_are_drawn_as_torchvision_draws_them(case):
    """Every array of a TorchResNet against the same one of torchvision's model,
    by its state_dict name: the constants equal (BatchNorm weight 1 or, with
    zero_init_residual, 0; bias 0; running statistics), the rest drawn from the
    same distribution (kaiming_normal_ fan_out for the convolutions, grouped ones
    too; nn.Linear's default for fc)."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from eqx_bn.interop import export_torch

    torch.manual_seed(0)
    if case == "resnet18":
        net = torchvision.models.resnet18(num_classes=100)
        make = functools.partial(TorchResNet18, 100)
    else:
        kwargs = dict(groups=4, width_per_group=32, zero_init_residual=True)
        bottleneck = torchvision.models.resnet.Bottleneck
        net = torchvision.models.ResNet(bottleneck, [1, 1, 1, 1], 100, **kwargs)
        make = functools.partial(TorchResNet, "bottleneck", (1, 1, 1, 1), 100, **kwargs)
    model, state = eqx.nn.make_with_state(make)(key=jax.random.key(0))
    ours = export_torch(model, state, num_batches_tracked=None)
    theirs = {
        k: v.numpy() for k, v in net.state_dict().items() if "num_batches" not in k
    }
    assert list(ours) == list(theirs)
    for name, reference in theirs.items():
        if _constant(reference):
            np.testing.assert_array_equal(ours[name], reference, err_msg=name)
        else:
            _ks(ours[name], reference, name)
    if case == "resnext_zero_init":
        assert np.all(ours["layer4.0.bn3.weight"] == 0)


def test_flax_named_weights_are_drawn_as_flax_draws_them():
    """Every kernel against Flax's own default initialiser (`lecun_normal`, the
    `kernel_init` of nn.Conv and nn.Dense): scaled by the square root of Flax's
    fan-in (all but the output axis of the Flax kernel), each is distributed as
    that initialiser's draw at fan-in 1, a truncated normal. The Dense bias and
    BatchNorm bias start at 0, the scales at 1 but the last of each block (the
    example's `scale_init=zeros_init()`), the statistics at 0 and 1."""
    lecun = nn.Conv.__dataclass_fields__["kernel_init"].default
    assert nn.Dense.__dataclass_fields__["kernel_init"].default is lecun
    unit = np.asarray(lecun(jax.random.key(1), (1, 200000)))
    model, state = eqx.nn.make_with_state(ResNet18)(
        100, num_filters=32, key=jax.random.key(0)
    )
    variables = export_flax(model, state)
    pooled = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        name = "/".join(k.key for k in path)
        if name.endswith("kernel"):
            pooled.append(leaf * np.sqrt(np.prod(leaf.shape[:-1])))
            _ks(pooled[-1], unit, name)
            continue
        zero = name.endswith(("bias", "mean")) or "BatchNorm_1/scale" in name
        np.testing.assert_array_equal(leaf, np.full(leaf.shape, 0.0 if zero else 1.0))
    # Every kernel together: the shape of the distribution, truncation included.
    rng = np.random.default_rng(0)
    pooled = rng.permutation(np.concatenate([np.ravel(p) for p in pooled]))
    _ks(pooled, unit, "all kernels", limit=200000)


def test_seed_mlp_weights_are_drawn_as_equinox_draws_them():
    model = SeedMLP(5000, key=jax.random.key(0))
    linear = eqx.nn.Linear(5000, 4, key=jax.random.key(1))
    _ks(model.dense_0.weight, linear.weight, "dense_0.weight")
    assert model.dense_0.bias.shape == (4,)
    assert np.all(np.abs(model.dense_0.bias) <= 1 / np.sqrt(5000))


def test_batch_norms_start_as_batch_norm_builds_them():
    """The models fill their BatchNorms without running BatchNorm.__init__'s
    arrays (models/_init.py restates them): they must stay the same."""
    model, state = eqx.nn.make_with_state(SeedMLP)(3, key=jax.random.key(0))
    bn, bn_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(4, momentum=0.99)
    for a, b in ((model.norm.scale, bn.scale), (model.norm.bias, bn.bias)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    ours, theirs = state.get(model.norm.state_index), bn_state.get(bn.state_index)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def _tiny(kind, key):
    if kind == "flax":
        return ResNet((1, 1), 3, num_filters=2, key=key)
    if kind == "torch":
        return TorchResNet("bottleneck", (1, 1, 1, 1), 3, width=4, key=key)
    return SeedMLP(3, key=key)


def _same(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["flax", "torch", "mlp"])
def test_a_key_gives_its_weights_eagerly_and_under_jit(kind):
    key, other = jax.random.key(0), jax.random.key(1)
    model = _tiny(kind, key)
    _same(_tiny(kind, key), model)
    # Under jit the key is a tracer and the draw a pure_callback: the same numbers.
    _same(eqx.filter_jit(_tiny)(kind, key), model)
    # Another key: every weight drawn at random differs.
    changed = _tiny(kind, other)
    drawn = lambda m: [  # noqa: E731
        leaf.weight
        for leaf in jax.tree.leaves(m, is_leaf=lambda x: isinstance(x, eqx.nn.Linear))
        if isinstance(leaf, eqx.nn.Conv | eqx.nn.Linear)
    ]
    assert drawn(model)
    for a, b in zip(drawn(model), drawn(changed), strict=True):
        assert not np.any(a == b)


def test_an_ensemble_built_under_vmap_has_each_keys_weights():
    keys = jax.random.split(jax.random.key(0), 2)
    ensemble = eqx.filter_vmap(lambda k: _tiny("mlp", k))(keys)
    for i in range(2):
        member = jax.tree.map(lambda x: x[i], eqx.filter(ensemble, eqx.is_array))
        _same(member, eqx.filter(_tiny("mlp", keys[i]), eqx.is_array))


def test_building_compiles_nothing():
    """Issue 22: each eager jax.random initialiser compiled once per shape (a cold
    TorchResNet18 took 18.6 s, a TorchResNet50 30-95 s). Now a model is drawn
    with no XLA compile at all (benchmarks/build_time.py times it)."""
    key = jax.random.key(7)
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for make, args in (
            (TorchResNet, ("bottleneck", (1, 1, 1, 1), 17)),
            (TorchResNet18, (13,)),
            (ResNet, ((1, 2), 11)),
            (SeedMLP, (9,)),
            (ResNetBlock, (5, 6, 2)),
        ):
            eqx.nn.make_with_state(make)(*args, key=key)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []


def test_models_take_numpy_input():
    """Issue 21: the bundled models refused NumPy arrays (BatchNorm and eqx.nn
    layers take them)."""
    model, state = eqx.nn.make_with_state(SeedMLP)(3, key=jax.random.key(0))
    x = np.random.default_rng(0).normal(size=3).astype(np.float32)
    y, _ = model(x, state, inference=True)  # eagerly, as a user in a notebook
    np.testing.assert_array_equal(y, model(jnp.asarray(x), state, inference=True)[0])
    image = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    for kind in ("flax", "torch"):
        model, state = eqx.nn.make_with_state(_tiny)(kind, jax.random.key(0))
        # The NumPy image reaches the model as it is (closed over, not traced).
        out, _ = jax.eval_shape(lambda s: model(image, s, inference=True), state)
        assert out.shape == (3,)

"""`load_flax`, `export_flax`, `flax_paths`: each layer kind against Flax, the naming
scheme, overrides, and every way a load can fail (one error listing everything,
nothing loaded, the input untouched)."""

import re

import equinox as eqx
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from flax_reference import Blocks, SeedMLP as FlaxSeedMLP, SetupList, init
from helpers import (
    apply_channels_first,
    apply_per_example,
    apply_tokens,
    assert_bitwise,
    flax_promotion,
    normal,
)
from jaxtyping import Array

import eqx_bn
from eqx_bn.interop import (
    ConversionError,
    export_flax,
    flax_paths,
    load_flax,
    read_msgpack,
)
from eqx_bn.models import SeedMLP


def _flat_paths(variables):
    return {
        "/".join(k.key for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(variables)
    }


@eqx.filter_jit
def _each(model, x):
    return jax.vmap(model)(x)


# (Flax module, Equinox factory, Flax input, how the Equinox layer is applied)
LAYERS = {
    "dense": (
        nn.Dense(3),
        lambda k: eqx.nn.Linear(5, 3, key=k),
        normal((2, 5)),
        apply_per_example,
    ),
    "dense_no_bias": (
        nn.Dense(3, use_bias=False),
        lambda k: eqx.nn.Linear(5, 3, use_bias=False, key=k),
        normal((2, 5)),
        apply_per_example,
    ),
    "conv1d": (
        nn.Conv(4, (3,)),
        lambda k: eqx.nn.Conv1d(5, 4, 3, padding="SAME", key=k),
        normal((2, 8, 5)),
        apply_channels_first,
    ),
    # Stride 2, "SAME" on an even and an odd size: Flax pads (0, 1) and (1, 1).
    "conv2d_stride2_even": (
        nn.Conv(4, (3, 3), strides=2, use_bias=False),
        lambda k: eqx.nn.Conv2d(3, 4, 3, 2, padding="SAME", use_bias=False, key=k),
        normal((2, 6, 6, 3)),
        apply_channels_first,
    ),
    "conv2d_stride2_odd": (
        nn.Conv(4, (3, 3), strides=2),
        lambda k: eqx.nn.Conv2d(3, 4, 3, 2, padding="SAME", key=k),
        normal((2, 7, 7, 3)),
        apply_channels_first,
    ),
    "conv3d_groups": (
        nn.Conv(4, (2, 2, 2), feature_group_count=2),
        lambda k: eqx.nn.Conv3d(2, 4, 2, padding="SAME", groups=2, key=k),
        normal((1, 4, 4, 4, 2)),
        apply_channels_first,
    ),
    "layer_norm": (
        nn.LayerNorm(),
        lambda k: eqx.nn.LayerNorm(6, eps=1e-6),
        normal((2, 6)),
        apply_per_example,
    ),
    "group_norm": (
        nn.GroupNorm(num_groups=2),
        lambda k: eqx.nn.GroupNorm(2, 6, eps=1e-6),
        normal((2, 4, 4, 6)),
        apply_channels_first,
    ),
    "rms_norm": (
        nn.RMSNorm(),
        lambda k: eqx.nn.RMSNorm(6, eps=1e-6, use_bias=False),
        normal((2, 6)),
        apply_per_example,
    ),
    "embed": (
        nn.Embed(7, 3),
        lambda k: eqx.nn.Embedding(7, 3, key=k),
        jnp.array([[0, 3, 6], [2, 2, 5]]),
        apply_tokens,
    ),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_layer_kind_matches_flax(kind):
    module, make, x, run = LAYERS[kind]
    # Jitted and abstract where possible: one compile per side, no RNG kernels.
    with flax_promotion():
        variables = init(module, x)
        expected = jax.jit(module.apply)(variables, x)
    layer, state = eqx.filter_eval_shape(
        lambda: eqx.nn.make_with_state(make)(jax.random.key(0))
    )
    loaded, state = load_flax(layer, state, variables)
    got = eqx.filter_jit(run)(loaded, x)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert_bitwise(export_flax(loaded, state), variables)


@pytest.fixture(scope="module")
def flax_mlp():
    """The seed MLP's Flax variables, as numpy arrays (as a msgpack file gives)."""
    with flax_promotion():
        variables = init(FlaxSeedMLP(), jnp.ones((4, 3)), train=False)
    return jax.tree_util.tree_map(np.asarray, variables)


@pytest.fixture
def eqx_mlp():
    return eqx.nn.make_with_state(SeedMLP)(3, key=jax.random.key(0))


def _edit(variables, **changes):
    """A deep copy of `variables` with `path=value` changes (`None` deletes)."""
    out = jax.tree_util.tree_map(lambda a: a, variables)
    for path, value in changes.items():
        *scopes, name = path.split("__")
        node = out
        for scope in scopes:
            node = node.setdefault(scope, {})
        if value is None:
            del node[name]
        else:
            node[name] = value
    return out


def _snapshot(model, state):
    return [np.array(leaf) for leaf in jax.tree_util.tree_leaves((model, state))]


def _assert_untouched(model, state, snapshot):
    # Same values, and the State object still usable (State.set would invalidate it).
    assert_bitwise(
        [np.asarray(x) for x in jax.tree_util.tree_leaves((model, state))], snapshot
    )
    state.get(model.norm.state_index)


def test_flax_paths_lists_the_pairing(eqx_mlp, flax_mlp):
    model, _ = eqx_mlp
    assert flax_paths(model) == {
        "params/Dense_0/kernel": "model.dense_0.weight",
        "params/Dense_0/bias": "model.dense_0.bias",
        "params/BatchNorm_0/scale": "model.norm.scale",
        "params/BatchNorm_0/bias": "model.norm.bias",
        "batch_stats/BatchNorm_0/mean": "state[model.norm.state_index].mean",
        "batch_stats/BatchNorm_0/var": "state[model.norm.state_index].var",
        "params/Dense_1/kernel": "model.dense_1.weight",
        "params/Dense_1/bias": "model.dense_1.bias",
    }
    assert set(flax_paths(model)) == _flat_paths(flax_mlp)


def test_load_returns_new_objects_and_leaves_input_untouched(eqx_mlp, flax_mlp):
    model, state = eqx_mlp
    before = _snapshot(model, state)
    loaded, new_state = load_flax(model, state, flax_mlp)
    _assert_untouched(model, state, before)
    np.testing.assert_array_equal(
        loaded.dense_0.weight, flax_mlp["params"]["Dense_0"]["kernel"].T
    )
    stats = new_state.get(loaded.norm.state_index)
    assert isinstance(stats, eqx_bn.RunningStats)
    np.testing.assert_array_equal(
        stats.var, flax_mlp["batch_stats"]["BatchNorm_0"]["var"]
    )
    # The returned State is a fresh object: updating it leaves the input usable.
    new_state.set(loaded.norm.state_index, stats)
    state.get(model.norm.state_index)


def test_missing_entries_are_listed(eqx_mlp, flax_mlp):
    model, state = eqx_mlp
    before = _snapshot(model, state)
    bad = _edit(
        flax_mlp, params__Dense_1__bias=None, batch_stats__BatchNorm_0__var=None
    )
    with pytest.raises(ConversionError) as info:
        load_flax(model, state, bad)
    message = str(info.value)
    assert "Missing from the Flax variables" in message
    assert "params/Dense_1/bias -> model.dense_1.bias: expected float32[1]" in message
    assert (
        "batch_stats/BatchNorm_0/var -> state[model.norm.state_index].var: "
        "expected float32[4]" in message
    )
    assert len(info.value.missing) == 2
    _assert_untouched(model, state, before)


def test_unexpected_entries_are_listed(eqx_mlp, flax_mlp):
    model, state = eqx_mlp
    bad = _edit(flax_mlp, params__Dense_2__kernel=np.zeros((1, 1), np.float32))
    with pytest.raises(
        ConversionError, match=re.escape("params/Dense_2/kernel: float32[1, 1]")
    ):
        load_flax(model, state, bad)


def test_misshaped_entries_are_listed_in_flax_layout(eqx_mlp, flax_mlp):
    model, state = eqx_mlp
    bad = _edit(flax_mlp, params__Dense_0__kernel=np.zeros((3, 5), np.float32))
    with pytest.raises(ConversionError) as info:
        load_flax(model, state, bad)
    assert (
        "params/Dense_0/kernel -> model.dense_0.weight: expected float32[3, 4] "
        "(in Flax's layout), got float32[3, 5]"
    ) in str(info.value)
    assert len(info.value.mismatched) == 1


def test_wrong_dtype_is_an_error_unless_cast(eqx_mlp, flax_mlp):
    model, state = eqx_mlp
    bias = np.arange(4, dtype=np.float64)
    bad = _edit(flax_mlp, params__Dense_0__bias=bias)
    with pytest.raises(ConversionError) as info:
        load_flax(model, state, bad)
    assert (
        "params/Dense_0/bias -> model.dense_0.bias: expected float32[4], got "
        "float64[4]\n"
    ) in str(info.value)
    assert info.value.castable
    assert "dtype alone: pass cast=True to convert them." in str(info.value)
    loaded, _ = load_flax(model, state, bad, cast=True)
    assert loaded.dense_0.bias.dtype == jnp.float32
    np.testing.assert_array_equal(loaded.dense_0.bias, bias.astype(np.float32))


def test_every_problem_in_one_error(eqx_mlp, flax_mlp):
    model, state = eqx_mlp
    before = _snapshot(model, state)
    bad = _edit(
        flax_mlp,
        params__Dense_1__bias=None,
        params__Extra_0__kernel=np.zeros((2,), np.float32),
        params__Dense_0__kernel=np.zeros((4, 3), np.float32),
        step=np.int32(3),
    )
    with pytest.raises(ConversionError) as info:
        load_flax(model, state, bad)
    error = info.value
    assert isinstance(error, ValueError)
    assert str(error).startswith(
        "Cannot load the Flax variables into SeedMLP:\n4 problems."
    )
    assert len(error.missing) == len(error.unexpected) == len(error.mismatched) == 1
    assert error.extra == ("step",)
    assert "pass ignore_extra=True" in str(error) and "flax_paths" in str(error)
    _assert_untouched(model, state, before)


class _TrainState(train_state.TrainState):
    batch_stats: dict


def test_train_state_extras_need_ignore_extra(eqx_mlp, flax_mlp):
    model, state = eqx_mlp
    ts = _TrainState.create(
        apply_fn=None,
        params=flax_mlp["params"],
        tx=optax.sgd(0.1, momentum=0.9),
        batch_stats=flax_mlp["batch_stats"],
    )
    saved = read_msgpack(flax.serialization.to_bytes(ts))
    assert set(saved) == {"step", "params", "opt_state", "batch_stats"}
    with pytest.raises(ConversionError) as info:
        load_flax(model, state, saved)
    assert info.value.extra == ("opt_state", "step")
    assert "opt_state, step; pass ignore_extra=True" in str(info.value)
    loaded, new_state = load_flax(model, state, saved, ignore_extra=True)
    assert_bitwise(export_flax(loaded, new_state), flax_mlp)


def test_whole_variables_as_train_state_params(eqx_mlp, flax_mlp):
    # `TrainState.create(params=variables)`, which Flax users do, nests them once more.
    model, state = eqx_mlp
    ts = train_state.TrainState.create(
        apply_fn=None, params=flax_mlp, tx=optax.sgd(0.1)
    )
    saved = flax.serialization.to_state_dict(ts)
    loaded, new_state = load_flax(model, state, saved, ignore_extra=True)
    assert_bitwise(export_flax(loaded, new_state), flax_mlp)


def test_not_strict_loads_what_matches(eqx_mlp, flax_mlp):
    model, state = eqx_mlp
    partial = _edit(
        flax_mlp,
        params__Dense_1__kernel=None,
        params__Other_0__w=np.zeros(2, np.float32),
    )
    loaded, _ = load_flax(model, state, partial, strict=False)
    np.testing.assert_array_equal(loaded.dense_1.weight, model.dense_1.weight)
    np.testing.assert_array_equal(
        loaded.dense_1.bias, flax_mlp["params"]["Dense_1"]["bias"]
    )
    # Shapes are still checked.
    bad = _edit(partial, params__Dense_1__bias=np.zeros(2, np.float32))
    with pytest.raises(ConversionError, match="Mismatched"):
        load_flax(model, state, bad, strict=False)


def test_state_of_another_model_is_an_error(eqx_mlp, flax_mlp):
    # (States of two models of the same architecture are interchangeable: Equinox
    # numbers the state indices in order.)
    model, _ = eqx_mlp
    _, other_state = eqx.nn.make_with_state(eqx.nn.Linear)(2, 2, key=jax.random.key(1))
    with pytest.raises(ConversionError, match="not made for this model"):
        load_flax(model, other_state, flax_mlp)


class _Named(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(3)(x))
        gain = self.param("gain", nn.initializers.ones, (2,))
        return nn.Dense(2, name="head")(x) * gain[None]


class _EqxNamed(eqx.Module):
    body: eqx.nn.Linear
    out: eqx.nn.Linear
    gain: Array

    def __init__(self, key):
        k0, k1 = jax.random.split(key)
        self.body = eqx.nn.Linear(4, 3, key=k0)
        self.out = eqx.nn.Linear(3, 2, key=k1)
        self.gain = jnp.zeros(2)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.body(x))) * self.gain


def test_mapping_overrides_names(flax_mlp):
    model, state = eqx.filter_eval_shape(
        lambda: eqx.nn.make_with_state(_EqxNamed)(jax.random.key(0))
    )
    x = normal((2, 4))
    with flax_promotion():
        variables = init(_Named(), x)
        expected = jax.jit(_Named().apply)(variables, x)
    # Automatically `out` would be Dense_1; the array field is `self.param("gain")`.
    assert flax_paths(model)["params/Dense_1/kernel"] == "model.out.weight"
    assert flax_paths(model)["params/gain"] == "model.gain"
    with pytest.raises(ConversionError, match="params/head/kernel"):
        load_flax(model, state, variables)
    mapping = {"head": lambda m: m.out}
    assert (
        flax_paths(model, mapping=mapping)["params/head/kernel"] == "model.out.weight"
    )
    loaded, state = load_flax(model, state, variables, mapping=mapping)
    got = _each(loaded, x)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert_bitwise(export_flax(loaded, state, mapping=mapping), variables)


def test_mapping_to_none_leaves_a_scope_out(eqx_mlp, flax_mlp):
    # E.g. a new head: the checkpoint's is not read, the model's keeps its values.
    model, state = eqx_mlp
    other = _edit(flax_mlp, params__Dense_1__kernel=np.zeros((4, 7), np.float32))
    loaded, new_state = load_flax(model, state, other, mapping={"Dense_1": None})
    np.testing.assert_array_equal(loaded.dense_1.weight, model.dense_1.weight)
    np.testing.assert_array_equal(
        loaded.dense_0.bias, flax_mlp["params"]["Dense_0"]["bias"]
    )
    assert (
        "Dense_1"
        not in export_flax(loaded, new_state, mapping={"Dense_1": None})["params"]
    )


@pytest.mark.parametrize(
    "mapping, match",
    [
        (
            {"Dense_0": lambda m: eqx.nn.Linear(3, 4, key=jax.random.key(0))},
            "not part of the model",
        ),
        ({"Dense_0": lambda m: m.missing}, "selector raised AttributeError"),
        ({"Dense_0": lambda m: 3}, "returned an int"),
        ({"": lambda m: m.dense_0}, "empty Flax scope"),
        ({"a": lambda m: m.dense_0, "b": lambda m: m.dense_0}, "select the same part"),
    ],
)
def test_bad_mapping_is_a_value_error(eqx_mlp, mapping, match):
    model, _ = eqx_mlp
    with pytest.raises(ValueError, match=match):
        flax_paths(model, mapping=mapping)


class Block(eqx.Module):
    """Named as `flax_reference.Block`: the class name is the Flax scope's."""

    linear: eqx.nn.Linear


class _Deep(eqx.Module):
    blocks: list[Block]


def test_lists_of_submodules_pair_with_numbered_scopes():
    keys = jax.random.split(jax.random.key(0), 12)
    model, state = eqx.nn.make_with_state(_Deep)(
        [Block(eqx.nn.Linear(2, 2, key=k)) for k in keys]
    )
    shapes = jax.eval_shape(Blocks(12).init, jax.random.key(0), jnp.ones((1, 2)))
    paths = list(flax_paths(model))
    assert set(paths) == _flat_paths(shapes)
    # The model's order, not the string order of a msgpack file's keys.
    assert paths.index("params/Block_2/Dense_0/kernel") < paths.index(
        "params/Block_10/Dense_0/kernel"
    )
    # Errors list paths in the same natural order.
    bad = {"params": {f"Extra_{i}": {"w": np.zeros(1)} for i in (10, 2, 1)}}
    with pytest.raises(ConversionError) as info:
        load_flax(model, state, bad, strict=True)
    assert [u.split("/")[1] for u in info.value.unexpected] == [
        "Extra_1",
        "Extra_2",
        "Extra_10",
    ]


class _SetupList(eqx.Module):
    layers: list[eqx.nn.Linear] = eqx.field(metadata={"flax_name": "layers"})
    head: eqx.nn.Linear = eqx.field(metadata={"flax_name": "head"})


def test_declared_names_mirror_setup_style_attributes():
    model, _ = eqx.filter_eval_shape(
        lambda: eqx.nn.make_with_state(_SetupList)(
            [eqx.nn.Linear(2, 2, key=jax.random.key(i)) for i in range(2)],
            eqx.nn.Linear(2, 1, key=jax.random.key(2)),
        )
    )
    shapes = jax.eval_shape(SetupList().init, jax.random.key(0), jnp.ones((1, 2)))
    paths = flax_paths(model)
    assert set(paths) == _flat_paths(shapes)
    assert paths["params/layers_1/kernel"] == "model.layers[1].weight"
    assert paths["params/head/bias"] == "model.head.bias"


def test_top_level_sequential_names_layers_by_position():
    module = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    x = normal((2, 4))
    with flax_promotion():
        variables = init(module, x)
        expected = jax.jit(module.apply)(variables, x)
    model, state = eqx.filter_eval_shape(
        lambda: eqx.nn.make_with_state(eqx.nn.Sequential)(
            [
                eqx.nn.Linear(4, 3, key=jax.random.key(0)),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Linear(3, 2, key=jax.random.key(1)),
            ]
        )
    )
    assert set(flax_paths(model)) == _flat_paths(variables)
    loaded, _ = load_flax(model, state, variables)
    np.testing.assert_allclose(_each(loaded, x), expected, rtol=1e-6, atol=1e-6)


class _WithTranspose(eqx.Module):
    up: eqx.nn.ConvTranspose2d
    norm: eqx.nn.BatchNorm


def test_layers_without_a_rule_are_reported():
    # Abstract (no initialisation to run): only the layer kinds matter here.
    model, state = eqx.filter_eval_shape(
        lambda: eqx.nn.make_with_state(_WithTranspose)(
            eqx.nn.ConvTranspose2d(2, 2, 3, key=jax.random.key(0)),
            eqx.nn.BatchNorm(2, "batch", mode="batch"),
        )
    )
    with pytest.raises(ConversionError) as info:
        load_flax(model, state, {"params": {}})
    message = str(info.value)
    assert "model.up: ConvTranspose2d has no conversion rule" in message
    assert "model.norm: BatchNorm has no conversion rule" in message
    assert "use eqx_bn.BatchNorm" in message
    with pytest.raises(ConversionError, match="ConvTranspose2d"):
        export_flax(model, state)


def test_round_trip_from_equinox(eqx_mlp):
    model, state = eqx_mlp
    loaded, new_state = load_flax(model, state, export_flax(model, state))
    assert_bitwise(
        jax.tree_util.tree_leaves((loaded, new_state)),
        jax.tree_util.tree_leaves((model, state)),
    )

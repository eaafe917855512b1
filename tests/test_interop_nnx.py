"""Flax NNX <-> Equinox with `load_flax` and `export_nnx`, against real `flax.nnx`.

The seed guide's MLP and a small CNN are written in NNX, trained a few SGD steps,
saved (pure-dict msgpack and Orbax), read back and loaded into the matching Equinox
models with Flax blocked; their eval outputs, a training call's outputs and running
statistics match NNX's, and `export_nnx` gives NNX back the Equinox model. Then each
layer kind alone, the layout detection, and every way a load can fail.
"""

import contextlib
import sys
import warnings

import equinox as eqx
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import (
    apply_channels_first,
    apply_per_example,
    apply_tokens,
    assert_bitwise,
    channels_first,
    eval_batch,
    flax_promotion,
    normal,
    train_batch,
)

import eqx_bn
from eqx_bn.interop import (
    ConversionError,
    cli,
    export_flax,
    export_nnx,
    load_flax,
    nnx_paths,
    read_checkpoint,
    read_msgpack,
    write_msgpack,
)
from eqx_bn.models import SeedMLP

RTOL = ATOL = 1e-5
LEARNING_RATE = 0.1
SGD = optax.sgd(LEARNING_RATE)


@contextlib.contextmanager
def flax_blocked():
    """Any `import flax...` fails inside, and Flax's loaded modules are hidden."""
    saved = {
        name: module
        for name, module in sys.modules.items()
        if name == "flax" or name.startswith("flax.")
    }
    sys.modules.update(dict.fromkeys(saved))
    try:
        yield
    finally:
        sys.modules.update(saved)


# -- The NNX models --------------------------------------------------------------------


class NnxMLP(nnx.Module):
    """The seed guide's `Dense(4) -> BatchNorm -> relu -> Dense(1)`, in NNX."""

    def __init__(self, in_features, *, rngs):
        self.dense_0 = nnx.Linear(in_features, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=0.99, rngs=rngs)
        self.dense_1 = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.dense_1(nnx.relu(self.norm(self.dense_0(x))))


class NnxBlock(nnx.Module):
    def __init__(self, features, *, rngs):
        self.conv = nnx.Conv(features, features, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(features, rngs=rngs)

    def __call__(self, x):
        return x + nnx.relu(self.norm(self.conv(x)))


class NnxCNN(nnx.Module):
    """8x8 images, channels last: conv/BatchNorm, a list of residual blocks, a
    pooled `nnx.Sequential` head with a LayerNorm."""

    def __init__(self, *, rngs):
        self.conv_0 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.norm_0 = nnx.BatchNorm(8, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(8, rngs=rngs) for _ in range(2)])
        self.head = nnx.Sequential(
            nnx.Linear(8, 16, rngs=rngs),
            nnx.relu,
            nnx.LayerNorm(16, rngs=rngs),
            nnx.Linear(16, 10, rngs=rngs),
        )

    def __call__(self, x):
        x = nnx.relu(self.norm_0(self.conv_0(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


# -- The Equinox models they correspond to ---------------------------------------------


class Block(eqx.Module):
    conv: eqx.nn.Conv2d
    norm: eqx_bn.BatchNorm

    def __init__(self, features, *, key):
        self.conv = eqx.nn.Conv2d(features, features, 3, padding=1, key=key)
        self.norm = eqx_bn.BatchNorm(features)

    def __call__(self, x, state):
        y, state = self.norm(self.conv(x), state)
        return x + jax.nn.relu(y), state


class CNN(eqx.Module):
    """One image `(1, 8, 8)`, channels first, under `jax.vmap(axis_name="batch")`."""

    conv_0: eqx.nn.Conv2d
    norm_0: eqx_bn.BatchNorm
    blocks: list[Block]
    head: eqx.nn.Sequential

    def __init__(self, *, key):
        keys = jax.random.split(key, 5)
        self.conv_0 = eqx.nn.Conv2d(1, 8, 3, padding=1, key=keys[0])
        self.norm_0 = eqx_bn.BatchNorm(8)
        self.blocks = [Block(8, key=k) for k in keys[1:3]]
        self.head = eqx.nn.Sequential(
            [
                eqx.nn.Linear(8, 16, key=keys[3]),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.LayerNorm(16, eps=1e-6),  # NNX's default epsilon
                eqx.nn.Linear(16, 10, key=keys[4]),
            ]
        )

    def __call__(self, x, state):
        x, state = self.norm_0(self.conv_0(x), state)
        x = jax.nn.relu(x)
        for block in self.blocks:
            x, state = block(x, state)
        return self.head(jnp.mean(x, axis=(1, 2))), state


@nnx.jit
def _nnx_sgd_step(model, optimizer, x, y):
    def loss(model):
        return jnp.mean((model(x) - y) ** 2)

    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)


@nnx.jit
def _nnx_apply(model, x):
    return model(x)


class Case:
    """An NNX model trained a few SGD steps, its checkpoints, and the references.

    - `state`: `nnx.state(model)` after training; `pure` its `nnx.to_pure_dict`.
    - `eval_out`: eval-mode outputs; `train_out`, `train_stats`: one more
        train-mode call's outputs and the running statistics it leaves (in a
        clone, so that `state` stays the checkpoint); `stepped`: the pure dict
        after one more SGD step (in another clone).
    - `msgpack`, `orbax`: the checkpoint files (pure dict and `nnx.State`).
    """

    def __init__(self, make_nnx, make_eqx, x, out_features, tmp, steps=3):
        self.make_nnx = make_nnx
        self.x = x  # NNX's layout (channels last)
        self.labels = labels = normal((x.shape[0], out_features), seed=7)
        model = make_nnx()
        optimizer = nnx.Optimizer(model, SGD, wrt=nnx.Param)
        with flax_promotion():
            for _ in range(steps):
                _nnx_sgd_step(model, optimizer, x, labels)
            self.state = nnx.state(model)
            self.pure = nnx.to_pure_dict(self.state)
            twin = nnx.clone(model)
            self.train_out = _nnx_apply(twin, x)
            self.train_stats = nnx.to_pure_dict(nnx.state(twin, nnx.BatchStat))
            twin = nnx.clone(model)
            _nnx_sgd_step(twin, nnx.Optimizer(twin, SGD, wrt=nnx.Param), x, labels)
            self.stepped = nnx.to_pure_dict(nnx.state(twin))
            model.eval()
            self.eval_out = _nnx_apply(model, x)
        self.msgpack = tmp / "nnx.msgpack"
        self.msgpack.write_bytes(flax.serialization.to_bytes(self.pure))
        self.orbax = tmp / "nnx_orbax"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(self.orbax, self.state)
        # An abstract model: the loader needs only shapes and dtypes.
        self.eqx_model, self.eqx_state = eqx.filter_eval_shape(make_eqx)
        with flax_blocked():
            restored = read_checkpoint(self.msgpack)
            self.model, self.loaded_state = load_flax(
                self.eqx_model, self.eqx_state, restored
            )

    @property
    def x_eqx(self):
        return channels_first(self.x) if self.x.ndim > 2 else self.x


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return Case(
        lambda: NnxMLP(3, rngs=nnx.Rngs(0)),
        lambda: eqx.nn.make_with_state(SeedMLP)(3, key=jax.random.key(2)),
        normal((8, 3)),
        1,
        tmp_path_factory.mktemp("nnx_mlp"),
    )


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return Case(
        lambda: NnxCNN(rngs=nnx.Rngs(0)),
        lambda: eqx.nn.make_with_state(CNN)(key=jax.random.key(2)),
        normal((6, 8, 8, 1)),
        10,
        tmp_path_factory.mktemp("nnx_cnn"),
    )


@pytest.fixture(params=["mlp", "cnn"])
def case(request):
    return request.getfixturevalue(request.param)


# -- The trained models, both ways -----------------------------------------------------


def test_training_moved_the_statistics(case):
    # Otherwise the comparisons below would not see the statistics being loaded.
    for path, leaf in jax.tree_util.tree_leaves_with_path(case.pure):
        if jax.tree_util.keystr(path).endswith(("['mean']", "['var']")):
            assert not np.allclose(leaf, 0.0) and not np.allclose(leaf, 1.0)


def test_eval_outputs_match_nnx(case):
    out = eval_batch(case.model, case.loaded_state, case.x_eqx)
    np.testing.assert_allclose(out, case.eval_out, rtol=RTOL, atol=ATOL)


def test_training_call_outputs_and_statistics_match_nnx(case):
    out, state = train_batch(case.model, case.loaded_state, case.x_eqx)
    np.testing.assert_allclose(out, case.train_out, rtol=RTOL, atol=ATOL)
    stats = export_nnx(case.model, state)
    got = {
        jax.tree_util.keystr(p): v
        for p, v in jax.tree_util.tree_leaves_with_path(stats)
    }
    want = jax.tree_util.tree_leaves_with_path(case.train_stats)
    assert want
    for path, value in want:
        np.testing.assert_allclose(
            got[jax.tree_util.keystr(path)], value, rtol=RTOL, atol=ATOL
        )


@eqx.filter_jit
def _sgd_step(model, state, x, y):
    def loss(model):
        out, new_state = train_batch(model, state, x)
        return jnp.mean((out - y) ** 2), new_state

    grads, state = eqx.filter_grad(loss, has_aux=True)(model)
    step = jax.tree.map(lambda g: -LEARNING_RATE * g, grads)
    return eqx.apply_updates(model, step), state


def test_one_sgd_step_matches_nnx(case):
    model, state = _sgd_step(case.model, case.loaded_state, case.x_eqx, case.labels)
    got = export_nnx(model, state)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(
        case.stepped
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(case.stepped)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    # The step moved every parameter that has a gradient.
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), case.pure, got)
    assert sum(jax.tree.leaves(moved)) > len(jax.tree.leaves(moved)) // 2


def _load(case, tree, **kwargs):
    return load_flax(case.eqx_model, case.eqx_state, tree, **kwargs)


@pytest.mark.parametrize(
    "form",
    [
        "pure",
        "state",
        "flax_msgpack",
        "msgpack_serialize",
        "eqx_bn_msgpack",
        "orbax_state",
    ],
)
def test_every_form_of_the_state_loads_the_same(case, form, tmp_path):
    if form == "pure":
        tree = case.pure
    elif form == "msgpack_serialize":
        # Issue 21.1: saved the natural way, list items keep their integer keys
        # in the file; Flax's own `msgpack_restore` reads them back as ints.
        raw = flax.serialization.msgpack_serialize(case.pure)
        (tmp_path / "int_keys.msgpack").write_bytes(raw)
        with flax_blocked():
            tree = read_msgpack(tmp_path / "int_keys.msgpack")
        assert_bitwise(tree, flax.serialization.msgpack_restore(raw))
    elif form == "state":
        tree = case.state  # an nnx.State: needs Flax, which the caller has
    elif form == "flax_msgpack":
        with flax_blocked():
            tree = read_msgpack(case.msgpack)
    elif form == "eqx_bn_msgpack":
        write_msgpack(tmp_path / "w.msgpack", case.pure)
        with flax_blocked():
            tree = read_msgpack(tmp_path / "w.msgpack")
    else:
        with flax_blocked():
            tree = read_checkpoint(case.orbax)  # leaves come back as {"value": a}
        assert jax.tree_util.tree_leaves_with_path(tree)[0][0][-1].key == "value"
    if form == "state":
        loaded = _load(case, tree)
    else:
        with flax_blocked():
            loaded = _load(case, tree)
    assert_bitwise(loaded, (case.model, case.loaded_state))


def test_orbax_pure_dict_with_string_int_keys(case, tmp_path):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "pure", case.pure)
        restored = checkpointer.restore(tmp_path / "pure")  # Orbax's own restore
    with flax_blocked():
        loaded = _load(case, restored)
    assert_bitwise(loaded, (case.model, case.loaded_state))


def test_export_is_the_pure_dict_nnx_saved(case):
    assert_bitwise(export_nnx(case.model, case.loaded_state), case.pure)


def test_nnx_reproduces_the_equinox_outputs_after_export(case):
    # A training call in Equinox first: the running statistics are Equinox's own.
    _, state = train_batch(case.model, case.loaded_state, case.x_eqx)
    expected = eval_batch(case.model, state, case.x_eqx)
    target = case.make_nnx()
    _, nnx_state = nnx.split(target)
    nnx.replace_by_pure_dict(nnx_state, export_nnx(case.model, state))
    nnx.update(target, nnx_state)
    target.eval()
    with flax_promotion():
        out = _nnx_apply(target, case.x)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


# -- Each layer kind alone -------------------------------------------------------------


def _whole_batch(layer, x):
    return layer(x, eqx.nn.State(layer), inference=True)[0]


def _stats_loaded(layer, state, x):
    return layer(x, state, inference=True)[0]


KEY = jax.random.key(5)
# (NNX layer, Equinox factory, NNX input, how the Equinox layer is applied)
LAYERS = {
    "linear": (
        lambda: nnx.Linear(5, 3, rngs=nnx.Rngs(0)),
        lambda k: eqx.nn.Linear(5, 3, key=k),
        normal((2, 5)),
        apply_per_example,
    ),
    "linear_no_bias": (
        lambda: nnx.Linear(5, 3, use_bias=False, rngs=nnx.Rngs(0)),
        lambda k: eqx.nn.Linear(5, 3, use_bias=False, key=k),
        normal((2, 5)),
        apply_per_example,
    ),
    "conv1d": (
        lambda: nnx.Conv(5, 4, (3,), rngs=nnx.Rngs(0)),
        lambda k: eqx.nn.Conv1d(5, 4, 3, padding="SAME", key=k),
        normal((2, 8, 5)),
        apply_channels_first,
    ),
    # Stride 2, "SAME" on an even size: NNX pads (0, 1), as linen does.
    "conv2d_stride2_no_bias": (
        lambda: nnx.Conv(3, 4, (3, 3), strides=2, use_bias=False, rngs=nnx.Rngs(0)),
        lambda k: eqx.nn.Conv2d(3, 4, 3, 2, padding="SAME", use_bias=False, key=k),
        normal((2, 6, 6, 3)),
        apply_channels_first,
    ),
    "conv3d_groups": (
        lambda: nnx.Conv(2, 4, (2, 2, 2), feature_group_count=2, rngs=nnx.Rngs(0)),
        lambda k: eqx.nn.Conv3d(2, 4, 2, padding="SAME", groups=2, key=k),
        normal((1, 4, 4, 4, 2)),
        apply_channels_first,
    ),
    "batch_norm": (
        lambda: nnx.BatchNorm(6, use_running_average=True, rngs=nnx.Rngs(0)),
        lambda k: eqx_bn.BatchNorm(6, axis_name=None, channels_last=True),
        normal((4, 6)),
        _stats_loaded,
    ),
    "layer_norm": (
        lambda: nnx.LayerNorm(6, rngs=nnx.Rngs(0)),
        lambda k: eqx.nn.LayerNorm(6, eps=1e-6),  # NNX's default epsilon
        normal((2, 6)),
        apply_per_example,
    ),
    "group_norm": (
        lambda: nnx.GroupNorm(6, num_groups=2, rngs=nnx.Rngs(0)),
        lambda k: eqx.nn.GroupNorm(2, 6, eps=1e-6),
        normal((2, 4, 4, 6)),
        apply_channels_first,
    ),
    "rms_norm": (
        lambda: nnx.RMSNorm(6, rngs=nnx.Rngs(0)),
        lambda k: eqx.nn.RMSNorm(6, eps=1e-6, use_bias=False),
        normal((2, 6)),
        apply_per_example,
    ),
    # A model that is an nnx.Sequential: `layers/0`, `layers/2` (relu has none).
    "sequential": (
        lambda: nnx.Sequential(
            nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
            nnx.relu,
            nnx.Linear(3, 1, rngs=nnx.Rngs(0)),
        ),
        lambda k: _sequential(k),
        normal((4, 2)),
        apply_per_example,
    ),
    "embed": (
        lambda: nnx.Embed(7, 3, rngs=nnx.Rngs(0)),
        lambda k: eqx.nn.Embedding(7, 3, key=k),
        jnp.array([[0, 3, 6], [2, 2, 5]]),
        apply_tokens,
    ),
}


def _randomised(make):
    """The NNX layer with random values everywhere (scales and statistics too, which
    start as ones and zeros), so that a swapped or mis-laid array shows. Built
    abstractly: no random initialisation to compile."""
    layer = nnx.eval_shape(make)
    _, state = nnx.split(layer)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree_util.tree_flatten(pure)
    rng = np.random.default_rng(3)
    new = [jnp.asarray(0.5 + np.abs(rng.normal(size=a.shape)), a.dtype) for a in leaves]
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new))
    nnx.update(layer, state)
    return layer, nnx.to_pure_dict(state)


@pytest.mark.parametrize("kind", LAYERS)
def test_layer_kind_matches_nnx(kind):
    make_nnx, make_eqx, x, apply = LAYERS[kind]
    layer, pure = _randomised(make_nnx)
    with flax_promotion():
        expected = layer(x)
    model, state = eqx.filter_eval_shape(eqx.nn.make_with_state(make_eqx), KEY)
    with flax_blocked():
        model, state = load_flax(model, state, pure)
    if apply is _stats_loaded:
        got = apply(model, state, x)
    else:
        got = apply(model, x)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert_bitwise(export_nnx(model, state), pure)


def _sequential(key):
    k0, k1 = jax.random.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(2, 3, key=k0),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(3, 1, key=k1),
        ]
    )


def test_a_top_level_sequential_is_nnx_sequential(key):
    model = eqx.filter_eval_shape(_sequential, key)
    assert nnx_paths(model) == {
        "layers/0/kernel": "model.layers[0].weight",
        "layers/0/bias": "model.layers[0].bias",
        "layers/2/kernel": "model.layers[2].weight",
        "layers/2/bias": "model.layers[2].bias",
    }


# -- Linen or NNX ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_mlp():
    return eqx.nn.make_with_state(SeedMLP)(3, key=jax.random.key(4))


def test_linen_variables_and_nnx_state_each_load_as_what_they_are(seed_mlp, mlp):
    model, state = seed_mlp
    # The NNX checkpoint's values, written out as linen variables and as NNX state.
    linen = export_flax(mlp.model, mlp.loaded_state)
    assert set(linen) == {"params", "batch_stats"}
    from_linen = load_flax(model, state, linen)
    from_nnx = load_flax(model, state, mlp.pure)
    assert_bitwise(from_linen, from_nnx)
    assert_bitwise(from_linen, (mlp.model, mlp.loaded_state))
    # Said explicitly, the same.
    assert_bitwise(load_flax(model, state, linen, layout="linen"), from_linen)
    assert_bitwise(load_flax(model, state, mlp.pure, layout="nnx"), from_nnx)


def test_the_wrong_explicit_layout_is_an_error_not_a_misread(seed_mlp, mlp):
    model, state = seed_mlp
    with pytest.raises(ConversionError, match="Missing from the NNX state"):
        load_flax(model, state, export_flax(mlp.model, mlp.loaded_state), layout="nnx")
    with pytest.raises(ConversionError, match="Missing from the Flax variables"):
        load_flax(model, state, mlp.pure, layout="linen")


class HasParams(eqx.Module):
    """An Equinox model whose NNX state has a top-level `params`, as linen's does."""

    params: eqx.nn.Linear
    norm: eqx_bn.BatchNorm

    def __init__(self, key):
        self.params = eqx.nn.Linear(2, 2, key=key)
        self.norm = eqx_bn.BatchNorm(2)


def test_a_tree_that_could_be_either_is_read_as_the_one_that_fits(key):
    model, state = eqx.nn.make_with_state(HasParams)(key)
    doubled = jax.tree.map(lambda a: 2 * a if eqx.is_array(a) else a, (model, state))
    nnx_tree = export_nnx(*doubled)
    linen_tree = export_flax(*doubled)
    assert set(nnx_tree) == {"params", "norm"}
    assert set(linen_tree) == {"params", "batch_stats"}
    assert_bitwise(load_flax(model, state, nnx_tree), doubled)
    assert_bitwise(load_flax(model, state, linen_tree), doubled)
    # One that fits neither: the error names the fix.
    del nnx_tree["norm"]["mean"]
    with pytest.raises(ConversionError, match="layout='linen' or layout='nnx'"):
        load_flax(model, state, nnx_tree)
    with pytest.raises(ConversionError, match=r"norm/mean -> state\[model.norm"):
        load_flax(model, state, nnx_tree, layout="nnx")


def test_linen_params_on_their_own_get_a_hint(seed_mlp, mlp):
    model, state = seed_mlp
    params = export_flax(mlp.model, mlp.loaded_state)["params"]
    with pytest.raises(ConversionError, match="linen `params` collection on its own"):
        load_flax(model, state, params)


def test_a_tree_nothing_pairs_with_is_an_error_even_when_not_strict(seed_mlp):
    model, state = seed_mlp
    tree = {"encoder": {"kernel": np.zeros((3, 4), np.float32)}}
    with pytest.raises(ConversionError, match="read as Flax NNX state") as info:
        load_flax(model, state, tree, strict=False)
    assert "layout='linen'" in str(info.value)
    assert info.value.unexpected == ("encoder/kernel",)


def test_a_linen_train_state_with_integer_keys_in_opt_state_is_linen(seed_mlp, mlp):
    # optax.multi_transform with integer labels keeps `inner_states: {0: ..., 1: ...}`:
    # integer keys outside `params`/`batch_stats` say nothing about the layout.
    model, state = seed_mlp
    linen = export_flax(mlp.model, mlp.loaded_state)
    labels = jax.tree.map(lambda _: 0, linen["params"])
    tx = optax.multi_transform({0: optax.sgd(0.1), 1: optax.adam(1e-3)}, labels)
    # As Orbax restores it: the dict keys as they were (`to_state_dict` would
    # make them strings).
    inner = tx.init(linen["params"]).inner_states
    opt_state = {
        "inner_states": {
            k: flax.serialization.to_state_dict(v) for k, v in inner.items()
        }
    }
    assert 0 in opt_state["inner_states"]
    tree = {**linen, "step": np.array(3), "opt_state": opt_state}
    loaded = load_flax(model, state, tree, ignore_extra=True)
    assert_bitwise(loaded, load_flax(model, state, linen))


def test_an_unpaired_tree_says_why_it_was_read_as_nnx(seed_mlp):
    model, state = seed_mlp
    tree = {"encoder": {0: {"kernel": np.zeros((3, 4), np.float32)}}}
    with pytest.raises(ConversionError, match="because they have integer keys"):
        load_flax(model, state, tree)
    tree = {"encoder": {"kernel": np.zeros((3, 4), np.float32)}}
    with pytest.raises(ConversionError, match="because they have no `params`"):
        load_flax(model, state, tree)


# -- Strictness and errors -------------------------------------------------------------


def _edit(pure, *path, value=None, drop=False):
    tree = jax.tree.map(np.asarray, pure)
    node = tree
    for key in path[:-1]:
        node = node[key]
    if drop:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


def test_every_problem_in_one_error_with_nnx_names(cnn):
    tree = _edit(cnn.pure, "blocks", 1, "norm", "var", drop=True)
    tree = _edit(tree, "conv_0", "kernel", value=np.zeros((3, 3, 2, 8), np.float32))
    tree = _edit(tree, "head", "layers", 3, "bias", value=np.zeros(10, np.float64))
    tree = _edit(tree, "head", "layers", 5, value={"kernel": np.zeros((2, 2))})
    with pytest.raises(ConversionError) as info:
        load_flax(cnn.eqx_model, cnn.eqx_state, tree)
    error = info.value
    assert str(error).startswith("Cannot load the NNX state into CNN:\n4 problems.")
    assert error.missing == (
        "blocks/1/norm/var -> state[model.blocks[1].norm.state_index].var: "
        "expected float32[8]",
    )
    assert error.mismatched == (
        "conv_0/kernel -> model.conv_0.weight: expected float32[3, 3, 1, 8] (in "
        "Flax NNX's layout), got float32[3, 3, 2, 8]",
        "head/layers/3/bias -> model.head.layers[3].bias: expected float32[10], got "
        "float64[10]",
    )
    assert error.castable
    assert error.unexpected == ("head/layers/5/kernel: float64[2, 2]",)
    assert "eqx_bn.interop.nnx_paths(model)" in str(error)


def test_not_strict_loads_what_matches_and_cast_converts(mlp, cnn, seed_mlp):
    model, state = seed_mlp
    tree = _edit(mlp.pure, "norm", "var", drop=True)
    loaded, loaded_state = load_flax(model, state, tree, strict=False)
    index = model.norm.state_index
    np.testing.assert_array_equal(loaded_state.get(index).var, state.get(index).var)
    np.testing.assert_array_equal(loaded_state.get(index).mean, tree["norm"]["mean"])
    np.testing.assert_array_equal(loaded.dense_1.bias, tree["dense_1"]["bias"])
    as64 = jax.tree.map(lambda a: np.asarray(a, np.float64), cnn.pure)
    assert_bitwise(
        load_flax(cnn.eqx_model, cnn.eqx_state, as64, cast=True),
        (cnn.model, cnn.loaded_state),
    )


class Renamed(eqx.Module):
    body: eqx.nn.Linear = eqx.field(metadata={"nnx_name": "linear"})
    head: eqx.nn.Linear

    def __init__(self, key):
        k0, k1 = jax.random.split(key)
        self.body = eqx.nn.Linear(2, 3, key=k0)
        self.head = eqx.nn.Linear(3, 1, key=k1)


def test_declared_names_and_mapping_use_nnx_names(key):
    model, state = eqx.nn.make_with_state(Renamed)(key)
    mapping = {"classifier/out": lambda m: m.head}
    assert nnx_paths(model, mapping=mapping) == {
        "linear/kernel": "model.body.weight",
        "linear/bias": "model.body.bias",
        "classifier/out/kernel": "model.head.weight",
        "classifier/out/bias": "model.head.bias",
    }
    tree = export_nnx(*jax.tree.map(lambda a: a + 1, (model, state)), mapping=mapping)
    loaded, _ = load_flax(model, state, tree, mapping=mapping)
    np.testing.assert_array_equal(loaded.head.weight, model.head.weight + 1)
    # A scope mapped to None is left out on both sides: a new head keeps its values.
    del tree["classifier"]
    loaded, _ = load_flax(model, state, tree, mapping={"head": None})
    np.testing.assert_array_equal(loaded.head.weight, model.head.weight)
    np.testing.assert_array_equal(loaded.body.weight, model.body.weight + 1)


class WithDropout(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(2, 2, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.rngs = rngs


class EqxWithDropout(eqx.Module):
    linear: eqx.nn.Linear
    drop: eqx.nn.Dropout

    def __init__(self, key):
        self.linear = eqx.nn.Linear(2, 2, key=key)
        self.drop = eqx.nn.Dropout(0.1)


def test_random_streams_are_extra_entries(key):
    nnx_state = nnx.state(WithDropout(nnx.Rngs(0, dropout=1)))
    model, state = eqx.nn.make_with_state(EqxWithDropout)(key)
    for tree in (nnx_state, nnx.to_pure_dict(nnx_state)):
        with pytest.raises(ConversionError) as info:
            load_flax(model, state, tree)
        assert info.value.extra == (
            "drop/rngs/count (random-stream state)",
            "drop/rngs/key (random-stream state)",
            "rngs/default/count (random-stream state)",
            "rngs/default/key (random-stream state)",
            "rngs/dropout/count (random-stream state)",
            "rngs/dropout/key (random-stream state)",
        )
        assert "ignore_extra=True" in str(info.value)
        # Issue 21.6: named for what it is, not as the rest of a TrainState.
        assert "NNX random-stream state (`nnx.Rngs` keys" in str(info.value)
        assert "TrainState" not in str(info.value)
        loaded, _ = load_flax(model, state, tree, ignore_extra=True)
        np.testing.assert_array_equal(
            loaded.linear.weight.T, nnx_state["linear"]["kernel"].get_value()
        )


class Sowing(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, x):
        y = self.linear(x)
        self.sow(nnx.Intermediate, "features", y)
        return y


class EqxLinear(eqx.Module):
    linear: eqx.nn.Linear


def test_sown_intermediates_are_extra_entries(key, tmp_path):
    """Issue 21.6: values stored with `sow` are in `nnx.state(model)` after a
    call; they are no parameters: reported as NNX intermediates, skipped with
    ignore_extra=True, in every form the state comes in."""
    nnx_model = Sowing(nnx.Rngs(0))
    with warnings.catch_warnings():  # sow outside nnx.capture: deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        nnx_model(jnp.ones((1, 2)))
    nnx_state = nnx.state(nnx_model)
    pure = nnx.to_pure_dict(nnx_state)
    assert isinstance(pure["features"], tuple)
    model = EqxLinear(eqx.nn.Linear(2, 2, key=key))
    state = eqx.nn.State(model)
    forms = {
        "state": nnx_state,
        "pure": pure,
        "to_bytes": read_msgpack(flax.serialization.to_bytes(pure)),
    }
    for form, tree in forms.items():
        with pytest.raises(ConversionError) as info:
            load_flax(model, state, tree)
        message = str(info.value)
        assert "NNX intermediates (values stored with `sow`" in message, form
        assert "ignore_extra=True" in message and "TrainState" not in message, form
        assert all(e.endswith("(intermediate)") for e in info.value.extra), form
        loaded, _ = load_flax(model, state, tree, ignore_extra=True)
        np.testing.assert_array_equal(
            loaded.linear.weight.T, pure["linear"]["kernel"], err_msg=form
        )


def test_optimizer_state_is_named_with_what_to_pass(key):
    """Issue 21.6: `nnx.state(optimizer)` is the optimiser's state, not the
    model's: the error says so and what to pass, not layout='linen'."""
    nnx_model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(nnx_model, optax.adam(1e-3), wrt=nnx.Param)
    opt_state = nnx.state(optimizer)
    model = eqx.nn.Linear(2, 2, key=key)
    state = eqx.nn.State(model)
    for tree in (opt_state, nnx.to_pure_dict(opt_state)):
        with pytest.raises(ConversionError) as info:
            load_flax(model, state, tree)
        message = str(info.value)
        assert "an `nnx.Optimizer`'s state (`step` and `opt_state`" in message
        assert "`nnx.state(model)`" in message and "layout='linen'" not in message
    loaded, _ = load_flax(model, state, nnx.to_pure_dict(nnx.state(nnx_model)))
    np.testing.assert_array_equal(loaded.weight.T, nnx_model.kernel.get_value())


def test_a_partly_wrapped_tree_keeps_attributes_called_value(key):
    # Only a tree whose every leaf is {"value": a} is Orbax-wrapped NNX state.
    class Value(eqx.Module):
        value: jax.Array
        other: jax.Array

    model = Value(jnp.zeros(2), jnp.zeros(3))
    tree = {"value": np.ones(2, np.float32), "other": np.full(3, 2, np.float32)}
    loaded, _ = load_flax(model, eqx.nn.State(model), tree)
    np.testing.assert_array_equal(loaded.value, tree["value"])
    wrapped = {k: {"value": v} for k, v in tree.items()}
    loaded, _ = load_flax(model, eqx.nn.State(model), wrapped)
    np.testing.assert_array_equal(loaded.other, tree["other"])


# -- The command line ------------------------------------------------------------------

CLI_MODELS = """
import equinox as eqx
import jax

from eqx_bn.models import SeedMLP


def make():
    return eqx.nn.make_with_state(SeedMLP)(3, key=jax.random.key(0))
"""


def test_the_converter_takes_nnx_checkpoints(mlp, tmp_path, capsys):
    models = tmp_path / "nnx_models.py"
    models.write_text(CLI_MODELS)
    factory = f"{models}:make"
    for checkpoint in (mlp.orbax, mlp.msgpack):
        out = tmp_path / f"{checkpoint.name}.eqx"
        with flax_blocked():
            assert cli.main([str(checkpoint), str(out), "--model", factory]) == 0
        like = eqx.nn.make_with_state(SeedMLP)(3, key=jax.random.key(0))
        assert_bitwise(
            eqx.tree_deserialise_leaves(out, like), (mlp.model, mlp.loaded_state)
        )
    out = tmp_path / "linen.eqx"
    assert (
        cli.main([str(mlp.orbax), str(out), "--model", factory, "--layout", "linen"])
        == 2
    )
    assert "Missing from the Flax variables" in capsys.readouterr().err
    assert not out.exists()


# -- The example -----------------------------------------------------------------------


@pytest.mark.slow  # trains and compiles two CNNs and their steps
def test_nnx_to_equinox_example_agrees(tmp_path, capsys):
    import nnx_to_equinox

    with flax_promotion():
        result = nnx_to_equinox.main(["--smoke", "--out", str(tmp_path)])
    assert result["same_files"]
    assert result["nnx_steps"] == result["eqx_steps"] > 0
    # Converted: NNX's logits; carried on and sent back: Equinox's, to rounding.
    assert result["logit_diff"] <= ATOL
    assert result["back_diff"] <= ATOL
    assert result["end_diff"] <= ATOL  # after a few more SGD steps on each side
    assert (tmp_path / "nnx_digits" / "_METADATA").is_file()
    assert "exported back to NNX" in capsys.readouterr().out

"""Flax NNX <-> Equinox with `load_flax` and `export_nnx`, against real `flax.nnx`.

The seed guide's MLP and a small CNN are written in NNX, trained a few SGD steps,
saved (pure-dict msgpack and Orbax), read back and loaded into the matching Equinox
models with Flax blocked; their eval outputs, a training call's outputs and running
statistics match NNX's, and `export_nnx` gives NNX back the Equinox model. Then each
layer kind alone, the layout detection, and every way a load can fail.
"""

import contextlib
import sys

import equinox as eqx
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import channels_first, flax_promotion

import eqx_bn
from eqx_bn.interop import (
    ConversionError,
    export_flax,
    export_nnx,
    load_flax,
    read_checkpoint,
    read_msgpack,
    write_msgpack,
)
from eqx_bn.models import SeedMLP

RTOL = ATOL = 1e-5


def _normal(shape, seed=1):
    # numpy, not jax.random: no RNG kernel to compile.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _assert_bitwise(got, expected):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    for a, b in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)
    ):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


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


# -- The NNX models -------------------------------------------------------------


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


# -- The Equinox models they correspond to ---------------------------------------


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


@eqx.filter_jit
def _eval(model, state, x):
    model = eqx.nn.inference_mode(model)
    out, _ = jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)
    return out


@eqx.filter_jit
def _train(model, state, x):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )


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
        clone, so that `state` stays the checkpoint).
    - `msgpack`, `orbax`: the checkpoint files (pure dict and `nnx.State`).
    """

    def __init__(self, make_nnx, make_eqx, x, out_features, tmp, steps=3):
        self.make_nnx = make_nnx
        self.x = x  # NNX's layout (channels last)
        labels = _normal((x.shape[0], out_features), seed=7)
        model = make_nnx()
        optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        with flax_promotion():
            for _ in range(steps):
                _nnx_sgd_step(model, optimizer, x, labels)
            self.state = nnx.state(model)
            self.pure = nnx.to_pure_dict(self.state)
            twin = nnx.clone(model)
            self.train_out = _nnx_apply(twin, x)
            self.train_stats = nnx.to_pure_dict(nnx.state(twin, nnx.BatchStat))
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
        _normal((8, 3)),
        1,
        tmp_path_factory.mktemp("nnx_mlp"),
    )


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return Case(
        lambda: NnxCNN(rngs=nnx.Rngs(0)),
        lambda: eqx.nn.make_with_state(CNN)(key=jax.random.key(2)),
        _normal((6, 8, 8, 1)),
        10,
        tmp_path_factory.mktemp("nnx_cnn"),
    )


@pytest.fixture(params=["mlp", "cnn"])
def case(request):
    return request.getfixturevalue(request.param)


# -- The trained models, both ways ------------------------------------------------


def test_training_moved_the_statistics(case):
    # Otherwise the comparisons below would not see the statistics being loaded.
    for path, leaf in jax.tree_util.tree_leaves_with_path(case.pure):
        if jax.tree_util.keystr(path).endswith(("['mean']", "['var']")):
            assert not np.allclose(leaf, 0.0) and not np.allclose(leaf, 1.0)


def test_eval_outputs_match_nnx(case):
    out = _eval(case.model, case.loaded_state, case.x_eqx)
    np.testing.assert_allclose(out, case.eval_out, rtol=RTOL, atol=ATOL)


def test_training_call_outputs_and_statistics_match_nnx(case):
    out, state = _train(case.model, case.loaded_state, case.x_eqx)
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


def _load(case, tree, **kwargs):
    return load_flax(case.eqx_model, case.eqx_state, tree, **kwargs)


@pytest.mark.parametrize(
    "form", ["pure", "state", "flax_msgpack", "eqx_bn_msgpack", "orbax_state"]
)
def test_every_form_of_the_state_loads_the_same(case, form, tmp_path):
    if form == "pure":
        tree = case.pure
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
    _assert_bitwise(loaded, (case.model, case.loaded_state))


def test_orbax_pure_dict_with_string_int_keys(case, tmp_path):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "pure", case.pure)
        restored = checkpointer.restore(tmp_path / "pure")  # Orbax's own restore
    with flax_blocked():
        loaded = _load(case, restored)
    _assert_bitwise(loaded, (case.model, case.loaded_state))


def test_export_is_the_pure_dict_nnx_saved(case):
    _assert_bitwise(export_nnx(case.model, case.loaded_state), case.pure)


def test_nnx_reproduces_the_equinox_outputs_after_export(case):
    # A model trained on in Equinox, so that the values are Equinox's own.
    _, state = _train(case.model, case.loaded_state, case.x_eqx)
    expected = _eval(case.model, state, case.x_eqx)
    target = case.make_nnx()
    graph, nnx_state = nnx.split(target)
    nnx.replace_by_pure_dict(nnx_state, export_nnx(case.model, state))
    nnx.update(target, nnx_state)
    target.eval()
    with flax_promotion():
        out = _nnx_apply(target, case.x)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)

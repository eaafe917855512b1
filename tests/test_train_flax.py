"""`TrainState.from_flax` / `to_flax`: resuming a Flax training run exactly, and back.

Flax trains a tiny MLP (`Dense(4, no bias) -> BatchNorm -> relu -> Dense(1)`) for two
steps with each optimiser and saves its `TrainState` with
`flax.serialization.to_bytes`; `eqx_bn.interop.read_msgpack` reads it and
`TrainState.from_flax` resumes it. Then both go on from the same batches and must
agree (parameters, running statistics, optimiser state, step) to float32 rounding;
finally `to_flax` hands the Equinox state back to Flax (`from_bytes`), and both take
one more step. (No bias before the BatchNorm: its exact gradient is 0, and Adam
turns two libraries' different rounding noise in it into different steps, see
`test_train.py`.)
"""

import equinox as eqx
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import checkpoints, train_state
from helpers import flax_promotion

import eqx_bn
from eqx_bn.interop import (
    ConversionError,
    read_checkpoint,
    read_msgpack,
    to_msgpack_bytes,
)
from eqx_bn.train import TrainState, make_train_step

BATCH = 16
# Measured: differences after 2-3 steps are a few float32 ulps (<= ~3e-7 relative).
RTOL = 1e-6
ATOL = 1e-7


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(1)(nn.relu(x))


class Net(eqx.Module):
    dense_0: eqx.nn.Linear
    norm: eqx_bn.BatchNorm
    dense_1: eqx.nn.Linear

    def __init__(self, key, in_size=3):
        k0, k1 = jax.random.split(key)
        self.dense_0 = eqx.nn.Linear(in_size, 4, use_bias=False, key=k0)
        self.norm = eqx_bn.BatchNorm(4, axis_name="batch")
        self.dense_1 = eqx.nn.Linear(4, 1, key=k1)

    def __call__(self, x, state):
        x, state = self.norm(self.dense_0(x), state)
        return self.dense_1(jax.nn.relu(x)), state


class FlaxTrainState(train_state.TrainState):
    batch_stats: dict


def loss_fn(model, state, batch):
    x, y = batch
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    pred, state = batched(x, state)
    return jnp.mean((pred - y) ** 2), (state, None)


@jax.jit
def flax_step(fts, batch):
    def loss(params):
        pred, updates = fts.apply_fn(
            {"params": params, "batch_stats": fts.batch_stats},
            batch[0],
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean((pred - batch[1]) ** 2), updates["batch_stats"]

    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(fts.params)
    return fts.apply_gradients(grads=grads).replace(batch_stats=stats), value


TRAIN_STEP = make_train_step(loss_fn)

OPTIMIZERS = {
    "sgd": optax.sgd(0.1),
    "sgd momentum": optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": optax.adam(0.05),
    "adamw": optax.adamw(0.05, weight_decay=0.1),
    "chain clip adamw": optax.chain(
        optax.clip_by_global_norm(0.5), optax.adamw(0.05, weight_decay=0.1)
    ),
    "inject_hyperparams": optax.inject_hyperparams(optax.adam)(learning_rate=0.05),
    "schedule": optax.adam(optax.exponential_decay(0.05, 1, 0.5)),
    "MultiSteps": optax.MultiSteps(optax.adam(0.05), every_k_schedule=2),
}


def batches(n):
    x = np.random.default_rng(0).standard_normal((n, BATCH, 3), np.float32)
    return [(x[i], np.sin(x[i].sum(-1, keepdims=True))) for i in range(n)]


@pytest.fixture(scope="module")
def start():
    """Flax's initial variables, and an Equinox model of the same shapes."""
    with flax_promotion():
        init = jax.jit(FlaxNet().init, static_argnames="train")
        variables = init(jax.random.key(0), np.zeros((2, 3), np.float32), train=False)
    model, state = eqx.filter_jit(eqx.nn.make_with_state(Net))(jax.random.key(1))
    return variables, model, state


def flax_train_state(variables, tx):
    return FlaxTrainState.create(
        apply_fn=FlaxNet().apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
    )


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def assert_flax_equal(got: dict, want, exact=False):
    """`got` (a state dict) holds `want`'s (a Flax TrainState) values everywhere."""
    want = as_numpy(flax.serialization.to_state_dict(want))
    got = as_numpy(got)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)
    ):
        where = jax.tree_util.keystr(path)
        assert g.shape == w.shape, where
        if exact:
            np.testing.assert_array_equal(g, w.astype(g.dtype), err_msg=where)
        else:
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=where)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_flax_and_hand_back(start, name):
    variables, model, state = start
    tx = OPTIMIZERS[name]
    data = batches(5)
    fts = flax_train_state(variables, tx)
    with flax_promotion():
        for batch in data[:2]:
            fts, _ = flax_step(fts, batch)

        # Flax -> Equinox: the checkpoint's values, exactly, in the model's layout.
        checkpoint = read_msgpack(flax.serialization.to_bytes(fts))
        ts = TrainState.from_flax(model, state, checkpoint, tx)
        assert int(ts.step) == 2
        assert_flax_equal(ts.to_flax(), fts, exact=True)
        # The optimiser state did move (the comparison above is not of zeros).
        assert any(np.any(np.asarray(x) != 0) for x in ts.opt_arrays) or name == "sgd"

        # Both carry on identically.
        for batch in data[2:4]:
            fts, flax_loss = flax_step(fts, batch)
            ts, loss, _ = TRAIN_STEP(ts, batch)
            np.testing.assert_allclose(loss, flax_loss, rtol=RTOL)
            assert_flax_equal(ts.to_flax(), fts)
        assert int(ts.step) == int(fts.step) == 4

        # Equinox -> Flax: restored by Flax's own deserialiser, it carries on too.
        target = flax_train_state(variables, tx)
        back = flax.serialization.from_bytes(target, to_msgpack_bytes(ts.to_flax()))
        assert int(back.step) == 4
        back, back_loss = flax_step(back, data[4])
        ts, loss, _ = TRAIN_STEP(ts, data[4])
        np.testing.assert_allclose(loss, back_loss, rtol=RTOL)
        assert_flax_equal(ts.to_flax(), back)


def test_hyperparameters_and_schedule_carry_over(start):
    """`inject_hyperparams`' learning rate and a schedule's count come from Flax."""
    variables, model, state = start
    tx = OPTIMIZERS["inject_hyperparams"]
    fts = flax_train_state(variables, tx)
    fts = fts.replace(
        opt_state=fts.opt_state._replace(
            hyperparams={
                **fts.opt_state.hyperparams,
                "learning_rate": jnp.float32(0.01),
            }
        )
    )
    checkpoint = flax.serialization.to_state_dict(fts)
    ts = TrainState.from_flax(model, state, checkpoint, tx)
    assert float(ts.opt_state.hyperparams["learning_rate"]) == np.float32(0.01)


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_resume_from_an_orbax_checkpoint(start, tmp_path):
    """Orbax stores tuples as lists and `EmptyState()` as None: read the same."""
    variables, model, state = start
    tx = OPTIMIZERS["chain clip adamw"]
    fts = flax_train_state(variables, tx)
    with flax_promotion():
        fts, _ = flax_step(fts, batches(1)[0])
    checkpoints.save_checkpoint(tmp_path, fts, step=1)
    ts = TrainState.from_flax(
        model, state, read_checkpoint(tmp_path / "checkpoint_1"), tx
    )
    assert_flax_equal(ts.to_flax(), fts, exact=True)


def test_every_mismatch_is_listed(start):
    variables, model, state = start
    fts = flax_train_state(variables, OPTIMIZERS["adam"])
    checkpoint = flax.serialization.to_state_dict(fts)
    # The wrong optimiser: SGD with momentum's `trace` is missing, Adam's parts are
    # unexpected.
    with pytest.raises(ConversionError) as info:
        TrainState.from_flax(model, state, checkpoint, OPTIMIZERS["sgd momentum"])
    text = str(info.value)
    assert "opt_state/0/trace: expected parameters" in text
    assert "opt_state/0/mu" in text and "opt_state/0/nu" in text
    assert "Pass the optimiser the Flax TrainState was trained with" in text

    # A wrongly shaped kernel is reported in params and in both of Adam's moments,
    # with the rest of the problems, in one error.
    bad = jax.tree.map(np.asarray, checkpoint)
    for tree in (
        bad["params"],
        bad["opt_state"]["0"]["mu"],
        bad["opt_state"]["0"]["nu"],
    ):
        tree["Dense_1"]["kernel"] = np.zeros((5, 1), np.float32)
    bad["opt_state"]["0"]["count"] = np.zeros((), np.float32)
    bad["batch_stats"]["BatchNorm_0"]["mean"] = np.zeros(5, np.float32)  # listed once
    del bad["opt_state"]["0"]["nu"]["BatchNorm_0"]["scale"]
    bad["dropout_key"] = np.zeros(2, np.uint32)
    with pytest.raises(ConversionError) as info:
        TrainState.from_flax(model, state, bad, OPTIMIZERS["adam"])
    error = info.value
    assert sorted(error.mismatched) == sorted(
        [
            "opt_state/0/count: expected int32[], got float32[]",
            "batch_stats/BatchNorm_0/mean -> state[model.norm.state_index].mean: "
            "expected float32[4], got float32[5]",
            *(
                f"{where}/Dense_1/kernel -> model.dense_1.weight: expected "
                "float32[4, 1] (in Flax's layout), got float32[5, 1]"
                for where in ("params", "opt_state/0/mu", "opt_state/0/nu")
            ),
        ]
    )
    assert error.missing == (
        "opt_state/0/nu/BatchNorm_0/scale -> model.norm.scale: expected float32[4]",
    )
    assert error.extra == ("dropout_key",)
    assert "7 problems" in str(error)
    # `ignore_extra` skips the extra field only.
    with pytest.raises(ConversionError) as info:
        TrainState.from_flax(model, state, bad, OPTIMIZERS["adam"], ignore_extra=True)
    assert info.value.extra == () and len(info.value.mismatched) == 5


def test_variables_alone_are_not_a_train_state(start):
    variables, model, state = start
    with pytest.raises(ConversionError, match="not a saved Flax TrainState.*load_flax"):
        TrainState.from_flax(model, state, as_numpy(variables), optax.sgd(0.1))


def test_an_abstract_model_is_enough(start):
    """Only the structure, shapes and dtypes of the model are read, as by
    `load_flax`: a model from `eqx.filter_eval_shape` skips its initialisation."""
    variables, model, state = start
    tx = OPTIMIZERS["adam"]
    fts = flax_train_state(variables, tx)
    abstract = eqx.filter_eval_shape(eqx.nn.make_with_state(Net), jax.random.key(1))
    ts = TrainState.from_flax(*abstract, flax.serialization.to_state_dict(fts), tx)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(ts))
    assert_flax_equal(ts.to_flax(), fts, exact=True)


def test_a_stepped_flax_state_dict_is_read(start):
    """After Flax's `apply_gradients` the step is a jax.Array: `to_state_dict` of a
    stepped `TrainState` (the documented form) is read, not refused as no integer."""
    variables, model, state = start
    tx = OPTIMIZERS["sgd"]
    fts = flax_train_state(variables, tx)
    with flax_promotion():
        fts, _ = flax_step(fts, batches(1)[0])
    checkpoint = flax.serialization.to_state_dict(fts)
    assert isinstance(checkpoint["step"], jax.Array)
    ts = TrainState.from_flax(model, state, checkpoint, tx)
    assert int(ts.step) == 1
    assert_flax_equal(ts.to_flax(), fts, exact=True)
    # A bool is still no step count.
    with pytest.raises(ConversionError, match="step: expected an integer"):
        TrainState.from_flax(model, state, {**checkpoint, "step": np.True_}, tx)


def test_numpy_scalars_in_a_checkpoint_are_read(start):
    """A hyperparameter or count saved as a NumPy scalar (`np.float64` is a float
    subclass) is read as the Python scalar of its kind is."""
    variables, model, state = start
    tx = OPTIMIZERS["inject_hyperparams"]
    checkpoint = as_numpy(
        flax.serialization.to_state_dict(flax_train_state(variables, tx))
    )
    opt = checkpoint["opt_state"]
    opt["hyperparams"]["learning_rate"] = np.float64(0.01)
    opt["count"] = np.int64(3)
    ts = TrainState.from_flax(model, state, checkpoint, tx)
    assert float(ts.opt_state.hyperparams["learning_rate"]) == np.float32(0.01)
    assert int(ts.opt_state.count) == 3
    # A float scalar is still no integer count.
    opt["count"] = np.float64(3.0)
    with pytest.raises(ConversionError, match="opt_state/count: expected int32"):
        TrainState.from_flax(model, state, checkpoint, tx)


def test_adafactor_is_refused_not_resumed_wrongly():
    """Adafactor's factored `v_row`/`v_col` have the parameters' tree structure but
    not their shapes; with a square kernel (4x4 here) a layout conversion fits them
    and would swap rows and columns silently. They are reported instead."""
    tx = optax.adafactor(0.05, min_dim_size_to_factor=2)
    with flax_promotion():
        variables = FlaxNet().init(
            jax.random.key(0), np.zeros((2, 4), np.float32), train=False
        )
        checkpoint = flax.serialization.to_state_dict(flax_train_state(variables, tx))
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(1), in_size=4)
    with pytest.raises(ConversionError, match="Adafactor") as info:
        TrainState.from_flax(model, state, checkpoint, tx)
    assert any(u.startswith("opt_state/0/v_row: ") for u in info.value.unsupported)
    with pytest.raises(ConversionError, match="opt_state/0/v_row: .*Adafactor"):
        TrainState.create(model, state, tx).to_flax()


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_noisy_sgd_round_trips_with_flax(start, tmp_path):
    """Issue 21, item 1: a typed PRNG key in the optimiser state (`noisy_sgd`) made
    `from_flax` and `to_flax` fail with a bare NumPy TypeError. Flax's
    `to_state_dict` holds the key itself (its msgpack refuses one); Orbax stores
    its key data: both are read, and `to_flax` gives the key back as Flax held it.
    (Flax and Equinox do not take the same steps with noise: `random_like` draws
    one key per leaf in tree order, and the two trees are ordered differently.)"""
    variables, model, state = start
    tx = optax.noisy_sgd(0.1, key=jax.random.key(5))
    fts = flax_train_state(variables, tx)
    with flax_promotion():
        fts, _ = flax_step(fts, batches(1)[0])
    checkpoint = flax.serialization.to_state_dict(fts)
    flax_key = checkpoint["opt_state"]["0"]["rng_key"]
    assert jax.dtypes.issubdtype(flax_key.dtype, jax.dtypes.prng_key)
    ts = TrainState.from_flax(model, state, checkpoint, tx)
    assert_keys_equal(ts.opt_state[0].rng_key, flax_key)
    # As Orbax stores it: the key data.
    checkpoints.save_checkpoint(tmp_path, fts, step=1)
    from_orbax = read_checkpoint(tmp_path / "checkpoint_1")
    assert from_orbax["opt_state"]["0"]["rng_key"].dtype == np.uint32
    assert eqx.tree_equal(TrainState.from_flax(model, state, from_orbax, tx), ts)
    # Back to Flax: restored as it was, and Flax's next step is the same.
    target = flax_train_state(variables, tx)
    back = flax.serialization.from_state_dict(target, ts.to_flax())
    got, want = (keys_as_data(flax.serialization.to_state_dict(x)) for x in (back, fts))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert_keys_equal(back.opt_state[0].rng_key, flax_key)
    with flax_promotion():
        _, want = flax_step(fts, batches(2)[1])
        _, got = flax_step(back, batches(2)[1])
    assert float(got) == float(want)
    # And Equinox trains on from it.
    ts, loss, _ = TRAIN_STEP(ts, batches(2)[1])
    assert int(ts.step) == 2 and np.isfinite(float(loss))
    # A key of another implementation is listed, not fed to NumPy.
    wrong = {
        **checkpoint,
        "opt_state": {
            "0": {"count": 1, "rng_key": jax.random.key(0, impl="rbg")},
            "1": {},
        },
    }
    with pytest.raises(
        ConversionError, match=r"opt_state/0/rng_key: expected key<fry>\[\]"
    ):
        TrainState.from_flax(model, state, wrong, tx)


def keys_as_data(tree):
    """NumPy copies, typed PRNG keys as their key data (NumPy has no key dtype)."""

    def numpy(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(x))
        return np.asarray(x)

    return jax.tree.map(numpy, tree)


def assert_keys_equal(a, b):
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert a.dtype == b.dtype


def test_a_scope_left_out_starts_afresh(start):
    """Issue 21, item 3: with `mapping={scope: None}` the left-out scope's Adam
    moments came back None, and the first step failed inside Optax. They start
    as `optimizer.init` starts them; the mapped scopes are loaded."""
    variables, model, state = start
    tx = OPTIMIZERS["adam"]
    fts = flax_train_state(variables, tx)
    with flax_promotion():
        fts, _ = flax_step(fts, batches(1)[0])
    checkpoint = flax.serialization.to_state_dict(fts)
    ts = TrainState.from_flax(model, state, checkpoint, tx, mapping={"Dense_1": None})
    fresh = tx.init(eqx.filter(model, eqx.is_inexact_array))
    assert jax.tree.structure(ts.opt_state) == jax.tree.structure(fresh)
    adam = ts.opt_state[0]
    assert eqx.tree_equal(adam.mu.dense_1, fresh[0].mu.dense_1)
    np.testing.assert_array_equal(
        adam.mu.dense_0.weight, np.asarray(fts.opt_state[0].mu["Dense_0"]["kernel"]).T
    )
    assert eqx.tree_equal(ts.model.dense_1, model.dense_1)  # the head is kept
    ts, loss, _ = TRAIN_STEP(ts, batches(2)[1])
    assert np.isfinite(float(loss)) and int(ts.step) == 2
    # An abstract model has no values to keep: said so, not held as shapes.
    abstract = eqx.filter_eval_shape(eqx.nn.make_with_state(Net), jax.random.key(1))
    with pytest.raises(ConversionError, match="model.dense_1.weight: .*left out by"):
        TrainState.from_flax(*abstract, checkpoint, tx, mapping={"Dense_1": None})


def test_from_flax_copies_what_a_donating_step_consumes(start):
    """Issue 21, item 4: `from_flax` held the caller's arrays (here the head kept
    by `mapping`): a donating step deleted them. It copies, as `create` does."""
    variables, model, state = start
    tx = OPTIMIZERS["sgd"]
    checkpoint = flax.serialization.to_state_dict(flax_train_state(variables, tx))
    ts = TrainState.from_flax(model, state, checkpoint, tx, mapping={"Dense_1": None})
    donating = make_train_step(loss_fn, donate=True)
    ts, loss, _ = donating(ts, batches(1)[0])
    assert np.isfinite(float(loss))
    given = jax.tree.leaves((eqx.filter((model, state), eqx.is_array), checkpoint))
    assert not [x for x in given if isinstance(x, jax.Array) and x.is_deleted()]


def test_masked_states_are_named_both_ways(start):
    """Issue 21: `to_flax` of an `optax.masked` state raised a plain TypeError
    with no path, where docs/training.md promises a `ConversionError` naming them."""
    variables, model, state = start
    tx = optax.masked(optax.adam(0.05), lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    with pytest.raises(ConversionError) as info:
        TrainState.create(model, state, tx).to_flax()
    assert info.value.unsupported == tuple(
        f"opt_state/inner_state/0/{m}: an optimiser state node of type Net (masked "
        "or custom optimiser states are not mapped)"
        for m in ("mu", "nu")
    )
    checkpoint = flax.serialization.to_state_dict(flax_train_state(variables, tx))
    with pytest.raises(ConversionError) as info:
        TrainState.from_flax(model, state, checkpoint, tx)
    assert len(info.value.unsupported) == 2


def test_a_flax_shaped_mask_is_explained(start):
    """Issue 21: `adamw(mask=<Flax params-shaped tree>)` failed with a raw pytree
    error. The mask must be shaped like the Equinox model; a function of the
    parameters works for both, and resumes exactly."""
    variables, model, state = start
    flax_mask = jax.tree.map(lambda x: x.ndim > 1, variables["params"])
    checkpoint = flax.serialization.to_state_dict(
        flax_train_state(variables, optax.adamw(0.05, mask=flax_mask))
    )
    with pytest.raises(ConversionError, match="shaped like the Equinox model"):
        TrainState.from_flax(
            model, state, checkpoint, optax.adamw(0.05, mask=flax_mask)
        )
    # The fix the message gives: a mask made from the Equinox model.
    eqx_mask = jax.tree.map(
        lambda x: x.ndim > 1, eqx.filter(model, eqx.is_inexact_array)
    )
    TrainState.from_flax(model, state, checkpoint, optax.adamw(0.05, mask=eqx_mask))
    # Or a function, for both.
    tx = optax.adamw(0.05, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    fts = flax_train_state(variables, tx)
    data = batches(2)
    with flax_promotion():
        fts, _ = flax_step(fts, data[0])
        ts = TrainState.from_flax(
            model, state, flax.serialization.to_state_dict(fts), tx
        )
        fts, flax_loss = flax_step(fts, data[1])
        ts, loss, _ = TRAIN_STEP(ts, data[1])
    np.testing.assert_allclose(loss, flax_loss, rtol=RTOL)
    assert_flax_equal(ts.to_flax(), fts)


def test_a_dtype_mismatch_says_what_to_do(start):
    """Issue 21: the message said "pass cast=True", which `from_flax` does not take."""
    variables, model, state = start
    tx = OPTIMIZERS["sgd"]
    checkpoint = as_numpy(
        flax.serialization.to_state_dict(flax_train_state(variables, tx))
    )
    checkpoint["params"]["Dense_1"]["bias"] = checkpoint["params"]["Dense_1"][
        "bias"
    ].astype(np.float64)
    with pytest.raises(ConversionError) as info:
        TrainState.from_flax(model, state, checkpoint, tx)
    text = str(info.value)
    assert "cast=True" not in text
    assert (
        "params/Dense_1/bias -> model.dense_1.bias: expected float32[1], got float64[1]"
        in text
    )
    assert "does not convert dtypes" in text and "astype" in text

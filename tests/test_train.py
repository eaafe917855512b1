"""`eqx_bn.train` against Flax's own training loop (the BatchNorm guide's TrainState).

The seed MLP (`Dense(4) -> BatchNorm -> relu -> Dense(1)`) is trained for 100 steps in
Flax (`TrainState` with a `batch_stats` field, `mutable=["batch_stats"]`) and with
`eqx_bn.train` (`eqx_bn.models.SeedMLP`, converted by `eqx_bn.interop.load_flax`)
from the same initial values and the same Optax optimiser; losses,
running statistics and parameters must agree at every step to float32 rounding.
"""

import functools
import io
import re
import textwrap

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from helpers import flax_promotion

import eqx_bn
import eqx_bn.train as train
from eqx_bn.interop import load_flax
from eqx_bn.models import SeedMLP
from eqx_bn.train import TrainState, make_eval_step, make_train_step

STEPS = 100
BATCH = 32
# Measured differences over 100 steps are <= 2.4e-7 for O(0.1..1) values: a few ulps.
RTOL = 1e-6
ATOL = 1e-6


class FlaxMLP(nn.Module):
    """The Flax BatchNorm guide's MLP."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        return nn.Dense(1)(x)


class FlaxTrainState(train_state.TrainState):
    batch_stats: dict


def loss_fn(model, state, batch):
    x, y = batch
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    pred, state = batched(x, state)
    return jnp.mean((pred - y) ** 2), (state, pred)


def flax_loss(params, batch_stats, apply_fn, batch):
    x, y = batch
    pred, updates = apply_fn(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    return jnp.mean((pred - y) ** 2), (updates["batch_stats"], pred)


@jax.jit
def flax_train_step(state: FlaxTrainState, batch):
    grad_fn = jax.value_and_grad(flax_loss, has_aux=True)
    (loss, (batch_stats, _)), grads = grad_fn(
        state.params, state.batch_stats, state.apply_fn, batch
    )
    state = state.apply_gradients(grads=grads)
    return state.replace(batch_stats=batch_stats), loss, grads


@jax.jit
def flax_eval_step(state: FlaxTrainState, x):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return state.apply_fn(variables, x, train=False)


def from_flax(variables) -> tuple[SeedMLP, eqx.nn.State]:
    """The Flax initial values in the Equinox model, by `eqx_bn.interop.load_flax`."""
    return load_flax(*initial_model(), variables)


@functools.cache
def _initial():
    # Built under one jit rather than as many eager (each compiled) initialiser ops.
    model, state = eqx.filter_jit(
        lambda: eqx.nn.make_with_state(SeedMLP)(3, key=jax.random.key(0))
    )()
    return model, jax.tree.flatten(state)


def initial_model() -> tuple[SeedMLP, eqx.nn.State]:
    """The same initial model each time, with a State of its own (`set` consumes it)."""
    model, (leaves, treedef) = _initial()
    return model, jax.tree.unflatten(treedef, leaves)


def data(steps=STEPS):
    # NumPy: eager jax.random calls would compile once per shape.
    x = np.random.default_rng(1).standard_normal((steps, BATCH, 3), np.float32)
    return x, np.sin(x.sum(axis=-1, keepdims=True))


def running_stats(ts: TrainState):
    return ts.state.get(ts.model.norm.state_index)


def as_flax(ts: TrainState) -> dict:
    """The Equinox parameters in Flax's layout, as NumPy copies."""
    m = jax.tree.map(np.array, ts.params)
    return {
        "Dense_0": {"kernel": m.dense_0.weight.T, "bias": m.dense_0.bias},
        "BatchNorm_0": {"scale": m.norm.scale, "bias": m.norm.bias},
        "Dense_1": {"kernel": m.dense_1.weight.T, "bias": m.dense_1.bias},
    }


# One optimiser object of each kind: it is static in `TrainState`'s PyTree structure,
# so sharing it (and the step functions) lets the tests reuse each compilation.
OPTIMIZERS = {"sgd": optax.sgd(0.1), "adam": optax.adam(1e-2)}
TRAIN_STEP = make_train_step(loss_fn)
EVAL_STEP = make_eval_step(loss_fn)


@pytest.fixture(scope="module")
def runs():
    """Both trainings, once per optimiser, recorded step by step."""
    xs, ys = data()
    with flax_promotion():
        init = jax.jit(FlaxMLP().init, static_argnames="train")
        variables = init(jax.random.key(0), xs[0], train=False)
    out = {}
    for name, opt in OPTIMIZERS.items():
        fts = FlaxTrainState.create(
            apply_fn=FlaxMLP().apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=opt,
        )
        ts = TrainState.create(*from_flax(variables), opt)
        record = []
        with flax_promotion():
            for i in range(STEPS):
                fts, floss, fgrads = flax_train_step(fts, (xs[i], ys[i]))
                ts, loss, _ = TRAIN_STEP(ts, (xs[i], ys[i]))
                # Copied to NumPy now: one record per step, off the device.
                record.append(
                    numpy_copy(
                        dict(
                            flax_loss=floss,
                            loss=loss,
                            flax_stats=fts.batch_stats["BatchNorm_0"],
                            stats=running_stats(ts)._asdict(),
                            flax_params=fts.params,
                            params=as_flax(ts),
                            flax_bias_grad=fgrads["Dense_0"]["bias"],
                        )
                    )
                )
            flax_eval = flax_eval_step(fts, xs[0])
        out[name] = dict(record=record, ts=ts, fts=fts, flax_eval=flax_eval)
    return out


def numpy_copy(tree):
    return jax.tree.map(np.array, tree)


def assert_close(a, b, **kw):
    kw = dict(rtol=RTOL, atol=ATOL) | kw
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **kw), a, b)


@pytest.mark.parametrize("name", ["sgd"])
def test_matches_flax_every_step(runs, name):
    for i, r in enumerate(runs[name]["record"]):
        np.testing.assert_allclose(r["loss"], r["flax_loss"], rtol=RTOL, err_msg=f"{i}")
        assert_close(r["stats"], r["flax_stats"], err_msg=f"step {i}")
        assert_close(r["params"], r["flax_params"], err_msg=f"step {i}")
    assert int(runs[name]["ts"].step) == STEPS == int(runs[name]["fts"].step)


def test_matches_flax_adam_except_the_bias_before_batchnorm(runs):
    """With Adam all agrees except the first Dense bias and the running mean.

    Cause: BatchNorm subtracts the batch mean, so the loss does not depend on the
    bias of the Dense layer before it and its exact gradient is 0. Both libraries
    compute it as float32 rounding noise (~1e-9), different noise since Flax
    differentiates through the mean and variance and eqx_bn uses the closed form.
    Adam divides by the gradient's RMS, turning that noise into steps of ~lr in
    random directions: the two biases wander apart (harmlessly, the loss is blind to
    them). The running mean, an average of `W x + b`, inherits exactly that
    difference, which the test reconstructs; every other quantity agrees.
    """
    momentum = 0.99  # BatchNorm's default, as in the guide
    mean_gap = np.zeros(4, np.float32)
    for i, r in enumerate(runs["adam"]["record"]):
        msg = f"step {i}"
        np.testing.assert_allclose(r["loss"], r["flax_loss"], rtol=RTOL, err_msg=msg)
        assert float(jnp.max(jnp.abs(r["flax_bias_grad"]))) < 1e-6
        np.testing.assert_allclose(
            r["stats"]["var"], r["flax_stats"]["var"], rtol=RTOL, atol=ATOL
        )
        for layer in ("BatchNorm_0", "Dense_1"):
            assert_close(r["params"][layer], r["flax_params"][layer], err_msg=msg)
        assert_close(
            r["params"]["Dense_0"]["kernel"], r["flax_params"]["Dense_0"]["kernel"]
        )
        # Each step's batch mean is taken after the update of the previous step.
        bias_gap = (
            runs["adam"]["record"][i - 1]["params"]["Dense_0"]["bias"]
            - runs["adam"]["record"][i - 1]["flax_params"]["Dense_0"]["bias"]
            if i
            else np.zeros(4, np.float32)
        )
        mean_gap = momentum * mean_gap + (1 - momentum) * bias_gap
        np.testing.assert_allclose(
            r["stats"]["mean"] - r["flax_stats"]["mean"], mean_gap, atol=ATOL
        )
    # The biases did wander apart: the explanation above is not vacuous.
    last = runs["adam"]["record"][-1]
    gap = last["params"]["Dense_0"]["bias"] - last["flax_params"]["Dense_0"]["bias"]
    assert float(jnp.max(jnp.abs(gap))) > 1e-3


def test_eval_uses_running_stats_like_flax(runs):
    ts = runs["sgd"]["ts"]
    xs, ys = data(1)
    batch = (xs[0], ys[0])
    loss, (state, pred) = EVAL_STEP(ts, batch)
    # Flax's eval (use_running_average=True) of the Flax-trained model. (With Adam
    # the running means differ, see the test above, so only SGD is compared.)
    np.testing.assert_allclose(pred, runs["sgd"]["flax_eval"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, jnp.mean((pred - ys[0]) ** 2), rtol=1e-6)
    # The state is returned unchanged, and the holder is still usable (no donation).
    assert eqx.tree_equal(state, ts.state)
    assert int(ts.step) == STEPS
    # The running averages are far from this batch's own statistics, so the match
    # above would fail if eval normalised with batch statistics.
    params = jax.tree.map(np.asarray, ts.params)
    h = np.asarray(xs[0]) @ params.dense_0.weight.T + params.dense_0.bias
    running = running_stats(ts)
    assert np.max(np.abs(h.mean(0) - np.asarray(running.mean))) > 0.05
    assert np.max(np.abs(h.var(0) - np.asarray(running.var))) > 0.05


class Counter:
    def __init__(self, fn):
        self.fn = fn
        self.traces = 0

    def __call__(self, *args):
        self.traces += 1
        return self.fn(*args)


def fresh_state(opt=OPTIMIZERS["sgd"]):
    model, state = initial_model()
    return model, state, TrainState.create(model, state, opt)


def test_steps_compile_once():
    counted = Counter(loss_fn)
    train_step, eval_step = make_train_step(counted), make_eval_step(counted)
    _, _, ts = fresh_state()
    xs, ys = data(5)
    for i in range(5):
        ts, _, _ = train_step(ts, (xs[i], ys[i]))
    assert counted.traces == 1
    for i in range(3):
        eval_step(ts, (xs[i], ys[i]))
    assert counted.traces == 2
    assert int(ts.step) == 5
    # A holder made afresh the same way is the same jit cache entry: its static
    # `Structure` compares by value (same model configuration, same optimiser).
    _, _, other = fresh_state()
    assert other.structure is not ts.structure
    other, _, _ = train_step(other, (xs[0], ys[0]))
    eval_step(other, (xs[0], ys[0]))
    assert counted.traces == 2


def test_a_loss_returning_another_state_is_caught():
    _, _, ts = fresh_state()
    xs, ys = data(1)
    _, foreign = eqx.nn.make_with_state(eqx_bn.BatchNorm)(4)

    def wrong_state(model, state, batch):
        loss, (_, pred) = loss_fn(model, state, batch)
        return loss, (foreign, pred)

    with pytest.raises(ValueError, match="State returned by the loss changed"):
        make_train_step(wrong_state)(ts, (xs[0], ys[0]))


def test_state_reads_are_independent():
    """`ts.state` is rebuilt on every read: consuming one read spoils no other."""
    _, _, ts = fresh_state()
    index = ts.model.norm.state_index
    first = ts.state
    first.set(index, first.get(index))  # `set` invalidates `first` ...
    with pytest.raises(ValueError, match="old state"):
        first.get(index)
    stats = ts.state.get(index)  # ... but not the holder's State
    np.testing.assert_array_equal(stats.var, np.ones(4, np.float32))


def test_early_stopping_keeps_what_it_took_out():
    """The default step donates nothing: a model, State or whole TrainState taken
    out before more steps stays usable (`best = ts.model`, retrying from an old ts).
    """
    _, _, ts = fresh_state()
    xs, ys = data(3)
    ts, _, _ = TRAIN_STEP(ts, (xs[0], ys[0]))
    best, best_state, old = ts.model, ts.state, ts
    for i in (1, 2):
        ts, _, _ = TRAIN_STEP(ts, (xs[i], ys[i]))
    # All still alive and unchanged: evaluating them works.
    loss, _ = loss_fn(eqx.nn.inference_mode(best), best_state, (xs[0], ys[0]))
    assert np.isfinite(float(loss))
    assert eqx.tree_equal(best, old.model)
    again, _, _ = TRAIN_STEP(old, (xs[1], ys[1]))  # an old holder trains on
    assert int(again.step) == 2 and int(ts.step) == 3


def test_donation_is_opt_in_and_consumes_only_the_holder():
    model, state, ts = fresh_state()
    xs, ys = data(2)
    donating = make_train_step(loss_fn, donate=True)
    new, _, _ = donating(ts, (xs[0], ys[0]))
    # The step reused the holder's buffers in place ...
    assert all(x.is_deleted() for x in jax.tree.leaves(ts.params))
    # ... but `create` copied them: the model and state given to it are intact.
    inputs = jax.tree.leaves(eqx.filter((model, state), eqx.is_array))
    assert inputs and not any(x.is_deleted() for x in inputs)
    assert not eqx.tree_equal(new.params, eqx.filter(model, eqx.is_array))
    # Passing the donated holder again says what happened, not an XLA error.
    with pytest.raises(ValueError, match="donated to an earlier step"):
        donating(ts, (xs[1], ys[1]))
    # The step still compiles ahead of time, as `jax.jit` does.
    assert donating.lower(new, (xs[1], ys[1])).compile() is not None
    again, _, _ = donating(new, (xs[1], ys[1]))
    assert int(again.step) == 2


def test_donation_aliases_the_whole_holder_and_only_when_asked():
    """What `donate=True` changes in the compiled step: XLA's accounting shows the
    holder's every byte written in place, and nothing without it (the sizes that
    `benchmarks/donation.py` reports for the ResNet)."""
    _, _, ts = fresh_state(OPTIMIZERS["adam"])
    xs, ys = data(1)
    holder = sum(x.nbytes for x in jax.tree.leaves(ts))
    for donate, aliased in ((False, 0), (True, holder)):
        step = make_train_step(loss_fn, donate=donate)
        analysis = step.lower(ts, (xs[0], ys[0])).compile().memory_analysis()
        assert analysis.alias_size_in_bytes == aliased


def test_optax_multisteps_object_and_any_init_update_object():
    """`optax.MultiSteps` itself (not `.gradient_transformation()`), as Flax's
    TrainState takes it, and any object with `init`/`update`."""
    multi = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
    _, _, ts = fresh_state(multi)
    assert ts.tx is multi
    xs, ys = data(2)
    first = ts.params
    ts, _, _ = TRAIN_STEP(ts, (xs[0], ys[0]))
    assert eqx.tree_equal(ts.params, first)  # gradients accumulated, no update yet
    ts, _, _ = TRAIN_STEP(ts, (xs[1], ys[1]))
    assert not eqx.tree_equal(ts.params, first)

    class Halve:  # a duck-typed optimiser, no Optax base class
        def init(self, params):
            return ()

        def update(self, grads, opt_state, params=None):
            return jax.tree.map(lambda g: -0.5 * g, grads), opt_state

    _, _, ts = fresh_state(Halve())
    ts, _, _ = TRAIN_STEP(ts, (xs[0], ys[0]))
    assert int(ts.step) == 1


@pytest.mark.parametrize(
    "optimizer, fix",
    [
        (optax.adam, r"`adam` is a function that builds one: call it"),
        (0.1, r"Got a number: pass `optax.sgd\(0.1\)`"),
        ("adam", r"an object with `init` and `update`"),
    ],
)
def test_a_wrong_optimizer_gets_the_fix(optimizer, fix):
    model, state = initial_model()
    with pytest.raises(TypeError, match=fix):
        TrainState.create(model, state, optimizer)


def test_replace_changes_a_hyperparameter():
    """Mutating a read of `opt_state` is lost (every read is rebuilt); `replace`
    is the way, as in Flax."""
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    _, _, ts = fresh_state(tx)
    ts.opt_state.hyperparams["learning_rate"] = 0.0  # lost: a fresh object
    assert float(ts.opt_state.hyperparams["learning_rate"]) == np.float32(0.1)
    opt_state = ts.opt_state
    opt_state.hyperparams["learning_rate"] = 0.0  # a Python float is converted
    frozen = ts.replace(opt_state=opt_state)
    assert float(ts.opt_state.hyperparams["learning_rate"]) == np.float32(0.1)
    xs, ys = data(1)
    after, _, _ = TRAIN_STEP(frozen, (xs[0], ys[0]))
    assert eqx.tree_equal(after.params, frozen.params)  # learning rate 0: no change
    moved, _, _ = TRAIN_STEP(ts, (xs[0], ys[0]))
    assert not eqx.tree_equal(moved.params, ts.params)


def test_replace_model_state_and_step():
    model, state, ts = fresh_state()
    xs, ys = data(1)
    trained, _, _ = TRAIN_STEP(ts, (xs[0], ys[0]))
    # Flax users write ts.replace(params=..., batch_stats=..., step=...).
    back = trained.replace(model=model, state=state, step=7)
    assert eqx.tree_equal(back.params, ts.params) and int(back.step) == 7
    assert eqx.tree_equal(back.state, ts.state)
    assert back.structure is trained.structure  # same compiled steps
    # A change of configuration only (a layer frozen) is a new static structure.
    frozen = eqx.tree_at(lambda m: m.norm, model, eqx.nn.inference_mode(model.norm))
    assert trained.replace(model=frozen).model.norm.inference


def test_replace_checks_the_structure():
    model, state, ts = fresh_state()
    other, other_state = eqx.nn.make_with_state(SeedMLP)(5, key=jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"model.dense_0.weight: expected float32\[4, 3\]"
    ):
        ts.replace(model=other)
    with pytest.raises(
        ValueError, match="does not have the structure.*TrainState.create"
    ):
        ts.replace(model=eqx.nn.Linear(3, 4, key=jax.random.key(0)))
    _, foreign = eqx.nn.make_with_state(eqx_bn.BatchNorm)(4)
    with pytest.raises(ValueError, match="the new state does not have the structure"):
        ts.replace(state=foreign)
    with pytest.raises(ValueError, match="the new opt_state does not have"):
        ts.replace(opt_state=optax.adam(0.1).init(eqx.filter(model, eqx.is_array)))
    with pytest.raises(ValueError, match="`step` must be an integer"):
        ts.replace(step=1.5)
    with pytest.raises(TypeError, match="params: use model="):
        ts.replace(params=ts.params)  # Flax's name


def test_train_state_is_a_pytree_that_serialises():
    adam = OPTIMIZERS["adam"]
    _, _, ts = fresh_state(adam)
    xs, ys = data(4)
    for i in range(2):
        ts, _, _ = TRAIN_STEP(ts, (xs[i], ys[i]))
    leaves = jax.tree.leaves(ts)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)

    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, ts)
    buffer.seek(0)
    _, _, template = fresh_state(adam)
    restored = eqx.tree_deserialise_leaves(buffer, template)
    assert jax.tree.structure(restored) == jax.tree.structure(ts)
    assert eqx.tree_equal(restored, ts)
    assert int(restored.step) == 2
    # Training goes on identically from the restored holder.
    for i in (2, 3):
        ts, loss, _ = TRAIN_STEP(ts, (xs[i], ys[i]))
        restored, restored_loss, _ = TRAIN_STEP(restored, (xs[i], ys[i]))
        assert float(loss) == float(restored_loss)
    assert eqx.tree_equal(restored, ts)


def test_frozen_batchnorm_is_respected():
    """A BatchNorm put in inference mode on purpose (fine-tuning) keeps its stats."""
    model, state = initial_model()
    model = eqx.tree_at(lambda m: m.norm, model, eqx.nn.inference_mode(model.norm))
    ts = TrainState.create(model, state, OPTIMIZERS["sgd"])
    xs, ys = data(1)
    ts, _, _ = TRAIN_STEP(ts, (xs[0], ys[0]))
    assert eqx.tree_equal(running_stats(ts), state.get(model.norm.state_index))


def test_bad_loss_output_names_the_contract():
    _, _, ts = fresh_state()
    xs, ys = data(1)

    def no_state(model, state, batch):
        loss, (_, pred) = loss_fn(model, state, batch)
        return loss, pred

    with pytest.raises(TypeError, match=r"must return \(loss, \(state, aux\)\)"):
        make_train_step(no_state)(ts, (xs[0], ys[0]))


def test_docstring_examples_run():
    namespace: dict = {}
    documented = [
        train.TrainState,
        train.TrainState.create,
        train.TrainState.replace,
        train.make_train_step,
        train.make_eval_step,
        train.apply_gradients,
    ]
    for obj in documented:
        blocks = re.findall(r"```python\n(.*?)```", obj.__doc__, re.S)
        assert blocks, obj
        for block in blocks:
            exec(textwrap.dedent(block), namespace)
    assert int(namespace["ts"].step) == 2


def test_replace_refuses_a_float_in_an_integer_slot():
    """`inject_hyperparams(optax.sgd)(learning_rate=1)` holds an int32: 0.5 would be
    truncated to a learning rate of 0, silently."""
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1)
    _, _, ts = fresh_state(tx)
    opt_state = ts.opt_state
    opt_state.hyperparams["learning_rate"] = 0.5
    with pytest.raises(ValueError, match=r"int32\[\].*`learning_rate=1.0`"):
        ts.replace(opt_state=opt_state)
    opt_state.hyperparams["learning_rate"] = 2  # an int in an int slot is fine
    assert int(ts.replace(opt_state=opt_state).opt_state.hyperparams["learning_rate"])
    with pytest.raises(ValueError, match="`step` must be an integer"):
        ts.replace(step=True)
    with pytest.raises(ValueError, match="int32's range"):
        ts.replace(step=2**40)


HYPER = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)


def test_weak_types_do_not_recompile():
    """A weakly typed leaf is another jit cache key: a learning rate replaced with
    `jnp.asarray(1e-4)`, or the hyperparameters as `create` (weak, from Optax's
    `init` of Python floats) and `from_flax` (strong) give them, would each
    compile the step again."""
    counted = Counter(loss_fn)
    train_step = make_train_step(counted)
    model, state, ts = fresh_state(HYPER)
    xs, ys = data(3)
    ts, _, _ = train_step(ts, (xs[0], ys[0]))
    opt_state = ts.opt_state
    opt_state.hyperparams["learning_rate"] = jnp.asarray(1e-4)  # weak float32
    ts, _, _ = train_step(ts.replace(opt_state=opt_state), (xs[1], ys[1]))
    assert counted.traces == 1
    resumed = TrainState.from_flax(model, state, ts.to_flax(), HYPER)
    train_step(resumed, (xs[2], ys[2]))
    assert counted.traces == 1


def test_replace_copies_what_a_donating_step_consumes():
    """`replace`, like `create`, copies: a model kept aside (early stopping) and put
    back survives a donating step, and one array given for two leaves is not one
    buffer donated twice."""
    model, _, ts = fresh_state(HYPER)
    xs, ys = data(2)
    donating = make_train_step(loss_fn, donate=True)
    opt_state = ts.opt_state
    rate = jnp.float32(0.05)
    opt_state.hyperparams["learning_rate"] = opt_state.hyperparams["momentum"] = rate
    ts = ts.replace(model=model, opt_state=opt_state)
    new, _, _ = donating(ts, (xs[0], ys[0]))
    kept = jax.tree.leaves(eqx.filter(model, eqx.is_array)) + [rate]
    assert not any(x.is_deleted() for x in kept)
    assert float(new.opt_state.hyperparams["momentum"]) == np.float32(0.05)
    # An evaluation of the donated holder says what happened, not an XLA error.
    with pytest.raises(ValueError, match="eval_step: this TrainState was donated"):
        EVAL_STEP(ts, (xs[1], ys[1]))

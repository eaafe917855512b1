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
    # skeletons compare by value (same model configuration, same optimiser).
    _, _, other = fresh_state()
    assert other.model_skeleton is not ts.model_skeleton
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
    assert back.model_skeleton is trained.model_skeleton  # same compiled steps
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


class Keyed(eqx.Module):
    """A model holding a typed PRNG key (e.g. for its own dropout)."""

    linear: eqx.nn.Linear
    key: jax.Array

    def __init__(self):
        self.linear = eqx.nn.Linear(3, 1, key=jax.random.key(0))
        self.key = jax.random.key(1)

    def __call__(self, x, state):
        return self.linear(x), state


def keyed_loss(model, state, batch):
    x, y = batch
    pred, state = jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)
    return jnp.mean((pred - y) ** 2), (state, None)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (initial_model(), optax.noisy_sgd(0.1, key=jax.random.key(3))),
        lambda: (
            initial_model(),
            optax.chain(optax.add_noise(0.01, 0.55, key=7), optax.sgd(0.1)),
        ),
        lambda: (eqx.nn.make_with_state(Keyed)(), optax.sgd(0.1)),
    ],
    ids=["noisy_sgd", "chain add_noise", "model with a key field"],
)
def test_typed_prng_keys_are_held(make):
    """Issue 21, item 1: a typed PRNG key (in the optimiser state or the model) made
    `create` fail (`'PRNGKeyArray' object has no attribute 'weak_type'`); Flax's
    TrainState takes these optimisers."""
    (model, state), tx = make()
    ts = TrainState.create(model, state, tx)
    keys = [
        x
        for x in jax.tree.leaves(ts)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    ]
    assert keys
    step = make_train_step(loss_fn if isinstance(model, SeedMLP) else keyed_loss)
    xs, ys = data(2)
    after, _, _ = step(ts, (xs[0], ys[0]))
    after, _, _ = step(after, (xs[1], ys[1]))
    assert int(after.step) == 2
    # `replace` checks and copies keys like any other array.
    again = after.replace(model=after.model, opt_state=after.opt_state)
    assert eqx.tree_equal(again, after)
    if not isinstance(model, Keyed):  # the noise's key moved on at every step
        old, new = (
            jax.random.key_data(k) for k in (keys[0], after.opt_state[0].rng_key)
        )
        assert not np.array_equal(old, new)


class Layers(eqx.Module):
    """Layers in a list and a dict: an unhashable static part."""

    layers: list
    heads: dict

    def __init__(self):
        self.layers = [
            eqx.nn.Linear(3, 4, key=jax.random.key(0)),
            eqx_bn.BatchNorm(4, "batch"),
        ]
        self.heads = {"out": eqx.nn.Linear(4, 1, key=jax.random.key(1))}

    def __call__(self, x, state):
        x, state = self.layers[1](self.layers[0](x), state)
        return self.heads["out"](x), state


def test_holders_of_a_model_with_lists_are_one_structure():
    """Issue 21, item 2: with a list or dict field the static part was unhashable
    and hashed by `id`: two holders built the same way were different pytrees
    (`jax.tree.map` over both failed, `eqx.tree_equal` was False) and the step
    compiled once per `create`."""
    model, state = eqx.nn.make_with_state(Layers)()
    tx = OPTIMIZERS["sgd"]
    holders = [TrainState.create(model, state, tx) for _ in range(3)]
    first, second = holders[:2]
    assert jax.tree.structure(first) == jax.tree.structure(second)
    jax.tree.map(lambda a, b: a, first, second)
    assert bool(eqx.tree_equal(first, second))
    assert hash(first.model_skeleton) == hash(second.model_skeleton)
    counted = Counter(loss_fn)
    step = make_train_step(counted)
    xs, ys = data(1)
    for ts in holders:
        step(ts, (xs[0], ys[0]))
    assert counted.traces == 1


def test_a_donated_holder_is_refused_everywhere():
    """Issue 21: `old.replace(step=3)` of a donated holder ended in "Array has been
    deleted" at the next step, `old.to_flax()` in a raw RuntimeError; a holder
    sharing a part with a donated one (`replace` keeps what it is not given), or a
    model read from one, too."""
    _, _, ts = fresh_state()
    xs, ys = data(2)
    donating = make_train_step(loss_fn, donate=True)
    kept = ts.replace(step=5)  # shares the model, State and optimiser state
    model_read = ts.model
    new, _, _ = donating(ts, (xs[0], ys[0]))
    with pytest.raises(
        ValueError, match="TrainState.replace: this TrainState was donated"
    ):
        ts.replace(step=3)
    with pytest.raises(
        ValueError, match="TrainState.to_flax: this TrainState was donated"
    ):
        ts.to_flax()
    with pytest.raises(ValueError, match="train_step: this TrainState was donated"):
        donating(kept, (xs[1], ys[1]))
    assert not kept.step.is_deleted()  # the refused call donated none of its own
    with pytest.raises(
        ValueError, match="the model given holds arrays deleted by a donating"
    ):
        new.replace(model=model_read)
    # The holder the step returned is unaffected.
    assert int(donating(new, (xs[1], ys[1]))[0].step) == 2


def test_replace_names_every_difference():
    """`replace` reports each difference with its path (one helper,
    `eqx_bn._describe.tree_differences`, also used by `from_flax`)."""
    model, state, ts = fresh_state()
    wider = eqx.nn.make_with_state(SeedMLP)(5, key=jax.random.key(0))[0]
    with pytest.raises(ValueError) as info:
        ts.replace(model=wider)
    text = str(info.value)
    assert "model.dense_0.in_features: expected 3, got 5 (a static field)" in text
    assert "model.dense_0.weight: expected float32[4, 3], got float32[4, 5]" in text
    halved = eqx.tree_at(
        lambda m: m.dense_1.bias, model, model.dense_1.bias.astype(jnp.bfloat16)
    )
    with pytest.raises(
        ValueError,
        match=r"model.dense_1.bias: expected float32\[1\], got bfloat16\[1\]",
    ):
        ts.replace(model=halved)
    no_bias = eqx.tree_at(lambda m: m.dense_1.bias, model, None)
    with pytest.raises(
        ValueError, match=r"model.dense_1.bias: expected float32\[1\], got None"
    ):
        ts.replace(model=no_bias)


def test_tree_differences_names_each_kind():
    """The one tree-difference helper (issue 22): paths, and each kind of
    difference; typed PRNG keys named as JAX prints them."""
    from eqx_bn._describe import describe, tree_differences

    key = jax.random.key(0)
    assert describe(key) == "key<fry>[]" and describe(None) == "None"
    a = {
        "w": jnp.zeros((2, 3)),
        "k": key,
        "xs": (1.0, jnp.zeros(2)),
        "gone": jnp.zeros(1),
    }
    b = {
        "w": jnp.zeros((3, 2)),
        "k": jax.random.key_data(key),
        "xs": [1.0, jnp.zeros(2)],
        "new": 2,
    }
    assert tree_differences(a, b, where="t") == [
        "t['gone']: missing (expected float32[1])",
        "t['new']: unexpected an int",
        "t['k']: expected key<fry>[], got uint32[2]",
        "t['w']: expected float32[2, 3], got float32[3, 2]",
        "t['xs']: expected a tuple, got a list",
    ]
    assert tree_differences(a, a) == []
    # Non-array leaves are configuration: not compared.
    assert tree_differences({"f": jax.nn.relu}, {"f": jax.nn.gelu}) == []


def test_train_imports_nothing_from_interop_at_load():
    """Issue 22: `eqx_bn.train` is below `eqx_bn.interop` (nothing -> train, train
    -> core): its Flax conversion is imported on first use, inside a function."""
    import ast
    import importlib.util
    import pathlib
    import sys
    import types

    source = pathlib.Path(train.__file__)
    tree = ast.parse(source.read_text())

    def module_level(node):  # what runs at import: all but function bodies
        for child in ast.iter_child_nodes(node):
            if not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            ):
                yield child
                yield from module_level(child)

    imported = []
    for node in module_level(tree):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "eqx_bn." * (node.level > 0) + (node.module or "")
            imported += [
                f"{base}.{a.name}".replace("eqx_bn..", "eqx_bn.") for a in node.names
            ]
    assert imported and not [n for n in imported if "interop" in n], imported

    # And by running it: train.py and what it imports, as a package of their own
    # (eqx_bn's own __init__ imports interop), bring no interop module in.
    name = "eqx_bn_isolated"
    package = types.ModuleType(name)
    package.__path__ = [str(source.parent)]
    sys.modules[name] = package
    try:
        spec = importlib.util.spec_from_file_location(f"{name}.train", source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        loaded = [m for m in sys.modules if m.startswith(name)]
        assert f"{name}.train" in loaded
        assert not [m for m in loaded if "interop" in m], loaded
    finally:
        for m in [m for m in sys.modules if m.startswith(name)]:
            del sys.modules[m]

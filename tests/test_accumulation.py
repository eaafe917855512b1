"""BatchNorm under gradient accumulation (issue 23 item 5): `make_train_step(...,
accumulate=k)` and `accumulated_value_and_grad`.

The batch is split into k micro-batches. Each BatchNorm's running statistics are
updated once per optimiser step, from the pooled statistics (counts, means, squared
deviations merged as Chan et al.) of everything it saw: not k updates, not an
average of variances (`tests/data/REFERENCES.md` section 5). For the first
BatchNorm that is one step on the whole batch; deeper ones see micro-batch
normalised inputs, which only `full_batch_statistics=True` avoids: then outputs,
gradients and statistics equal the whole batch's everywhere.

"Equal" for float32 results computed in another order means: as close to a float64
evaluation of the whole batch as the whole batch's own float32 evaluation is, up to
a small factor (`assert_as_accurate`), as the PyTorch tests compare.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_bitwise, flax_promotion

import eqx_bn
from eqx_bn.train import (
    TrainState,
    accumulated_value_and_grad,
    make_train_step,
)

K = 4  # micro-batches
BATCH = 16
FACTOR = 4


class Net(eqx.Module):
    """dense-BN-relu, dense-BN-relu, dense: the first BatchNorm's input does not go
    through another BatchNorm, the second's does."""

    dense0: eqx.nn.Linear
    bn0: eqx_bn.BatchNorm
    dense1: eqx.nn.Linear
    bn1: eqx_bn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key, dtype=jnp.float32, axis_name="batch", momentum=0.9):
        k0, k1, k2 = jax.random.split(key, 3)
        bn = dict(
            param_dtype=dtype,
            force_float32_reductions=False,  # float64 stays float64 (the reference)
            axis_name=axis_name,
            momentum=momentum,
        )
        # No bias before a BatchNorm: it cancels, and its gradient is rounding
        # noise that Adam would amplify into steps in random directions.
        self.dense0 = eqx.nn.Linear(3, 6, use_bias=False, dtype=dtype, key=k0)
        self.bn0 = eqx_bn.BatchNorm(6, **bn)
        self.dense1 = eqx.nn.Linear(6, 5, use_bias=False, dtype=dtype, key=k1)
        self.bn1 = eqx_bn.BatchNorm(5, **bn)
        self.head = eqx.nn.Linear(5, 2, dtype=dtype, key=k2)

    def __call__(self, x, state):
        x, state = self.bn0(self.dense0(x), state)
        x, state = self.bn1(self.dense1(jax.nn.relu(x)), state)
        return self.head(jax.nn.relu(x)), state


def loss_fn(model, state, batch):
    """Mean squared error of a batch; the outputs as aux."""
    x, y = batch
    if model.bn0.axis_name is None:  # whole-batch layers: the model maps examples
        pred, state = _whole_batch(model, x, state)
    else:
        batched = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )
        pred, state = batched(x, state)
    return jnp.mean((pred - y) ** 2), (state, pred)


# The whole batch's loss and gradient, jitted once for every test.
WHOLE = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn, has_aux=True))


def _whole_batch(model, x, state):
    h, state = model.bn0(jax.vmap(model.dense0)(x), state)
    h, state = model.bn1(jax.vmap(model.dense1)(jax.nn.relu(h)), state)
    return jax.vmap(model.head)(jax.nn.relu(h)), state


def data(dtype=np.float32, seed=0):
    """A batch whose micro-batches differ in mean and spread, so that pooling, k
    updates and an average of variances all give different statistics."""
    rng = np.random.default_rng(seed)
    # Micro-batch i holds examples i, i + K, ...: each gets its own shift.
    shift = np.tile(np.arange(K, dtype=np.float64), BATCH // K)[:, None]
    x = rng.standard_normal((BATCH, 3)) * (1 + shift / 2) + shift
    y = rng.standard_normal((BATCH, 2))
    return x.astype(dtype), y.astype(dtype)


@functools.cache
def _built(dtype, axis_name, momentum):
    model, state = eqx.nn.make_with_state(Net)(
        jax.random.key(1), dtype=dtype, axis_name=axis_name, momentum=momentum
    )
    return model, jax.tree.flatten(state)


def make(dtype=jnp.float32, axis_name="batch", momentum=0.9):
    """The test network and a State of its own (`set` consumes a State); built
    once per configuration."""
    model, (leaves, treedef) = _built(dtype, axis_name, momentum)
    return model, jax.tree.unflatten(treedef, leaves)


def stats(ts_or_pair, layer):
    model, state = (
        (ts_or_pair.model, ts_or_pair.state)
        if isinstance(ts_or_pair, TrainState)
        else ts_or_pair
    )
    return state.get(getattr(model, layer).state_index)


def float64_reference(momentum=0.9):
    """The whole batch in float64: loss, outputs, gradients and the State after."""
    with jax.enable_x64():
        model, state = make(jnp.float64, momentum=momentum)
        batch = data(np.float64)
        (loss, (state, pred)), grads = WHOLE(model, state, batch)
        return jax.tree.map(
            np.asarray,
            dict(
                loss=loss,
                pred=pred,
                grads=eqx.filter(grads, eqx.is_array),
                bn0=stats((model, state), "bn0")._asdict(),
                bn1=stats((model, state), "bn1")._asdict(),
            ),
        )


def float32_run(fn, **kw):
    model, state = make(**kw)
    (loss, (state, pred)), grads = fn(model, state, data())
    return jax.tree.map(
        np.asarray,
        dict(
            loss=loss,
            pred=pred,
            grads=eqx.filter(grads, eqx.is_array),
            bn0=stats((model, state), "bn0")._asdict(),
            bn1=stats((model, state), "bn1")._asdict(),
        ),
    )


def assert_as_accurate(ours, whole, ref, what):
    """Each leaf of `ours` within FACTOR x (the whole batch's own float32 error +
    float32 epsilons of the value) of the float64 reference."""
    flat_ours, flat_whole, flat_ref = (
        jax.tree_util.tree_flatten_with_path(t)[0] for t in (ours, whole, ref)
    )
    for (path, a), (_, w), (_, r) in zip(flat_ours, flat_whole, flat_ref):
        a, w, r = (np.asarray(v, np.float64) for v in (a, w, r))
        if a.shape != r.shape:  # stacked per micro-batch: back in the batch's order
            a = np.swapaxes(a, 0, 1).reshape(r.shape)
        err = float(np.max(np.abs(w - r), initial=0.0))
        eps = np.finfo(np.float32).eps * float(np.max(np.abs(r), initial=0.0))
        worst = float(np.max(np.abs(a - r), initial=0.0))
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert worst <= FACTOR * (err + eps), (name, worst, err, eps)


@pytest.fixture(scope="module")
def reference():
    return float64_reference()


@pytest.fixture(scope="module")
def whole():
    """The whole batch in float32: what every mode is measured against."""
    return float32_run(WHOLE)


@pytest.fixture(scope="module")
def pooled():
    return float32_run(
        eqx.filter_jit(accumulated_value_and_grad(loss_fn, accumulate=K))
    )


@pytest.fixture(scope="module")
def exact():
    fn = accumulated_value_and_grad(loss_fn, accumulate=K, full_batch_statistics=True)
    return float32_run(eqx.filter_jit(fn))


def test_first_batch_norm_equals_one_step_on_the_whole_batch(pooled, whole, reference):
    """Regression (issue 23 item 5, pytorch/pytorch#46516): the first BatchNorm's
    running statistics after k micro-batches are one update from the statistics of
    all of them (its input does not depend on other BatchNorms)."""
    assert_as_accurate(pooled["bn0"], whole["bn0"], reference["bn0"], "bn0")


def test_first_batch_norm_equals_flax_on_the_concatenated_batch(pooled):
    """The same, against `flax.linen.BatchNorm` run on the concatenated batch."""
    nn = pytest.importorskip("flax.linen")
    model, _ = make()
    h = jax.vmap(model.dense0)(data()[0])
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    with flax_promotion():
        variables = bn.init(jax.random.key(0), h)
        _, updates = bn.apply(variables, h, mutable=["batch_stats"])
    flax_stats = updates["batch_stats"]
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            pooled["bn0"][name], flax_stats[name], rtol=1e-6, atol=1e-7
        )


def test_not_k_updates_nor_an_average_of_variances(pooled):
    """What pooling replaces would give other numbers here: k updates of the
    running averages, or one update from the mean of the micro-batch variances
    (which leaves out the spread between micro-batches)."""
    model, state = make()
    h = np.asarray(jax.vmap(model.dense0)(data()[0]), np.float64)
    micro = np.stack([h[i::K] for i in range(K)])  # micro-batch i: rows i, i + K, ...
    m = 0.9
    k_updates = np.zeros(h.shape[1])
    for part in micro:
        k_updates = m * k_updates + (1 - m) * part.var(0)
    mean_of_vars = (1 - m) * micro.var(1).mean(0) + m * 1.0
    pooled_var = (1 - m) * h.var(0) + m * 1.0
    np.testing.assert_allclose(pooled["bn0"]["var"], pooled_var, rtol=1e-5)
    for other in (k_updates, mean_of_vars):
        assert np.min(np.abs(pooled["bn0"]["var"] - other)) > 1e-3


def test_deeper_batch_norms_pool_what_they_saw(pooled, whole):
    """The second BatchNorm sees inputs normalised with each micro-batch's own
    statistics: its running statistics are one update from the pooled statistics
    of those inputs, which differ from the whole batch's."""
    model, _ = make()
    x = np.asarray(data()[0])
    seen = []
    for part in (x[i::K] for i in range(K)):
        h = np.asarray(jax.vmap(model.dense0)(part), np.float64)
        z = (h - h.mean(0)) / np.sqrt(h.var(0) + model.bn0.eps)
        z = z * np.asarray(model.bn0.scale) + np.asarray(model.bn0.bias)
        relu = np.maximum(z, 0).astype(np.float32)
        seen.append(np.asarray(jax.vmap(model.dense1)(relu), np.float64))
    seen = np.concatenate(seen)
    np.testing.assert_allclose(pooled["bn1"]["mean"], 0.1 * seen.mean(0), atol=1e-6)
    np.testing.assert_allclose(
        pooled["bn1"]["var"], 0.9 + 0.1 * seen.var(0), rtol=1e-5, atol=1e-6
    )
    assert np.max(np.abs(pooled["bn1"]["var"] - whole["bn1"]["var"])) > 1e-3


def test_full_batch_statistics_equal_the_whole_batch_everywhere(
    exact, whole, reference
):
    """`full_batch_statistics=True`: every micro-batch is normalised with the
    statistics of the whole batch, in every BatchNorm; the loss, the outputs, the
    gradients (through the whole batch's statistics) and the running statistics
    are the whole batch's."""
    for part in ("loss", "pred", "grads", "bn0", "bn1"):
        assert_as_accurate(exact[part], whole[part], reference[part], part)


def test_pooled_gradients_are_the_mean_of_the_micro_batch_gradients(pooled):
    model, state = make()
    x, y = data()
    grads = []
    for i in range(K):
        part = slice(i, None, K)
        (_, (state, _)), g = WHOLE(model, state, (x[part], y[part]))
        grads.append(eqx.filter(g, eqx.is_array))
    mean = jax.tree.map(lambda *g: np.mean(np.stack(g), 0), *grads)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        pooled["grads"],
        mean,
    )


class Traced:
    def __init__(self, fn):
        self.fn, self.traces = fn, 0

    def __call__(self, *args):
        self.traces += 1
        return self.fn(*args)


def test_optimiser_update_equals_optax_multisteps():
    """An `accumulate=k` step updates the parameters and the optimiser state as
    `optax.MultiSteps(opt, every_k_schedule=k)` fed the k micro-batches one by
    one (its emitting step): the first step bit for bit, later ones up to the
    rounding of the multiply-adds that XLA fuses differently in the two programs
    (Adam's moments, a few float32 ulps). The step compiles once."""
    opt = optax.adam(1e-2)
    counted = Traced(loss_fn)
    ours = make_train_step(counted, accumulate=K)
    ts = TrainState.create(*make(), opt)
    multi = optax.MultiSteps(opt, every_k_schedule=K)
    theirs = TrainState.create(*make(), multi)
    micro = make_train_step(loss_fn)
    for step in range(3):
        x, y = data(seed=step)
        ts, _, _ = ours(ts, (x, y))
        for i in range(K):
            part = slice(i, None, K)  # the micro-batches that accumulate=K makes
            theirs, _, _ = micro(theirs, (x[part], y[part]))
        if step == 0:
            assert_bitwise(ts.params, theirs.params)
            assert_bitwise(ts.opt_state, theirs.opt_state.inner_opt_state)
    pairs = [
        (ts.params, theirs.params),
        (ts.opt_state, theirs.opt_state.inner_opt_state),
    ]
    for ours_tree, theirs_tree in pairs:
        for a, b in zip(jax.tree.leaves(ours_tree), jax.tree.leaves(theirs_tree)):
            # A few float32 epsilons of the leaf's largest entry: its terms' size.
            scale = float(np.max(np.abs(np.asarray(b, np.float64)), initial=0.0))
            tol = 8 * np.finfo(np.float32).eps * scale
            np.testing.assert_allclose(a, b, rtol=0, atol=tol)
    assert int(ts.step) == 3 and counted.traces == 1


def test_accumulating_one_batch_is_the_plain_gradient(whole, reference):
    """With k = 1 the pooled path gives the plain step's loss, outputs and
    gradients bit for bit, and its running statistics to float32 rounding (the
    statistics are reduced inside a `lax.scan` there, which XLA may sum in
    another order)."""
    one = float32_run(eqx.filter_jit(accumulated_value_and_grad(loss_fn, accumulate=1)))
    one["pred"] = one["pred"][0]
    for part in ("loss", "pred", "grads"):
        assert_bitwise(one[part], whole[part])
    for part in ("bn0", "bn1"):
        assert_as_accurate(one[part], whole[part], reference[part], part)


def test_the_step_returns_the_mean_loss_and_each_micro_batch_aux(pooled):
    x, y = data()
    assert pooled["pred"].shape == (K, BATCH // K, 2)
    y_micro = np.stack([y[i::K] for i in range(K)])
    micro = np.mean((pooled["pred"] - y_micro) ** 2, (1, 2))
    np.testing.assert_allclose(pooled["loss"], micro.mean(), rtol=1e-6)


def test_whole_batch_layers_accumulate_too(whole, reference):
    """Layers built with `axis_name=None` (whole batches, no vmap) pool the same
    way, and the exact mode equals the whole batch with them as well."""
    fn = accumulated_value_and_grad(loss_fn, accumulate=K, full_batch_statistics=True)
    got = float32_run(eqx.filter_jit(fn), axis_name=None)
    for part in ("loss", "pred", "grads", "bn0", "bn1"):
        assert_as_accurate(got[part], whole[part], reference[part], part)


@pytest.mark.slow
def test_a_frozen_batch_norm_is_left_alone():
    """A BatchNorm in inference mode reads its running statistics in every
    micro-batch and keeps them, in both modes."""
    model, state = make()
    model = eqx.tree_at(lambda m: m.bn0, model, eqx.nn.inference_mode(model.bn0))
    before = stats((model, state), "bn0")
    for exact in (False, True):
        fn = accumulated_value_and_grad(
            loss_fn, accumulate=K, full_batch_statistics=exact
        )
        leaves, treedef = jax.tree.flatten(state)
        fresh = jax.tree.unflatten(treedef, leaves)
        (_, (new_state, _)), _ = eqx.filter_jit(fn)(model, fresh, data())
        assert_bitwise(new_state.get(model.bn0.state_index), before)


def test_momentum_none_counts_one_step_per_accumulated_step():
    """`BatchNorm(momentum=None)` (a cumulative average, PyTorch's momentum=None)
    counts one batch per optimiser step, whatever k: from fresh statistics the
    first step's running statistics are the pooled ones (factor 1)."""
    model, state = make(momentum=None)
    ts = TrainState.create(model, state, optax.sgd(0.1))
    step = make_train_step(loss_fn, accumulate=K)
    ts, _, _ = step(ts, data())
    running = stats(ts, "bn0")
    h = np.asarray(jax.vmap(model.dense0)(data()[0]), np.float64)
    np.testing.assert_allclose(running.mean, h.mean(0), rtol=1e-5, atol=1e-6)
    assert int(running.num_batches) == 1
    ts, _, _ = step(ts, data(seed=1))
    assert int(stats(ts, "bn0").num_batches) == 2


def test_full_batch_statistics_compile_once():
    counted = Traced(loss_fn)
    step = make_train_step(
        counted, accumulate=K, full_batch_statistics=True, donate=True
    )
    ts = TrainState.create(*make(), optax.adam(1e-2))
    ts, loss, _ = step(ts, data(seed=0))
    first = counted.traces
    for seed in range(1, 3):
        ts, loss, _ = step(ts, data(seed=seed))
    assert np.isfinite(float(loss)) and int(ts.step) == 3
    assert counted.traces == first  # no new trace after the first step


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(accumulate=0), r"accumulate.*positive"),
        (dict(accumulate=2.0), r"accumulate.*int"),
        (dict(full_batch_statistics=True), r"full_batch_statistics.*accumulate"),
    ],
)
def test_bad_accumulation_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_train_step(loss_fn, **kwargs)


def test_a_batch_that_does_not_split_names_the_leaf():
    model, state = make()
    ts = TrainState.create(model, state, optax.sgd(0.1))
    x, y = data()
    step = make_train_step(loss_fn, accumulate=K)
    with pytest.raises(ValueError, match=r"batch\[1\].*\(15, 2\).*4 micro-batches"):
        step(ts, (x, y[:15]))
    with pytest.raises(ValueError, match=r"no leading axis"):
        step(ts, (x, np.float32(1.0)))

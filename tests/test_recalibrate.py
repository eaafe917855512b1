"""`eqx_bn.recalibrate` (issue 23, item 2): every BatchNorm's running statistics
recomputed from batches with the weights fixed.

The reference is `tests/data/torch/update_bn.npz` (`torch.optim.swa_utils.update_bn`
on the narrow torchvision ResNet of `narrow_basic.pt`, batches of 4, 4 and 3
images; REFERENCES.md section 2), and its `population/` entries, the pooled
statistics of every BatchNorm's input over all the images.
"""

import io
import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_interop_torch import _eval, _narrow, assert_as_accurate

import eqx_bn
from eqx_bn.interop import export_torch, load_torch, read_torch

DATA = pathlib.Path(__file__).resolve().parent / "data" / "torch"


@pytest.fixture(scope="module")
def refs():
    return dict(np.load(DATA / "update_bn.npz"))


@pytest.fixture(scope="module")
def narrow():
    """The narrow torchvision ResNet with `narrow_basic.pt`'s weights, in inference
    mode, as `update_bn` gets it (`net.eval()`)."""
    model, state = _narrow("basic")
    model, state = load_torch(model, state, read_torch(DATA / "narrow_basic.pt"))
    return eqx.nn.inference_mode(model), state


def _batches(refs):
    return [jnp.asarray(refs[f"x/{i}"]) for i in range(3)]


def _clone(state):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _norms(model):
    is_bn = lambda v: isinstance(v, eqx_bn.BatchNorm)  # noqa: E731
    return [v for v in jax.tree.leaves(model, is_leaf=is_bn) if is_bn(v)]


@pytest.fixture(scope="module")
def recalibrated(narrow, refs):
    model, state = narrow
    return recalibrate_twice(model, state, _batches(refs))


def recalibrate_twice(model, state, batches):
    """The default and the population statistics, from one fixture."""
    default = eqx_bn.recalibrate(model, _clone(state), batches)
    population = eqx_bn.recalibrate(model, _clone(state), batches, population=True)
    return default, population


@pytest.mark.slow
def test_recalibrate_equals_torch_update_bn(narrow, refs, recalibrated):
    """Every BatchNorm's running mean and variance equal `update_bn`'s: the average
    over the batches of each batch's mean and unbiased variance, every layer seeing
    inputs normalised with the earlier layers' batch statistics."""
    model, _ = narrow
    state, _ = recalibrated
    exported = export_torch(model, state, num_batches_tracked=None)
    stats = [k for k in exported if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 12
    assert sorted(f"state/{k}" for k in stats) == sorted(
        k for k in refs if k.startswith("state/") and "num_batches" not in k
    )
    for key in stats:
        assert_as_accurate(exported[key], refs, f"state/{key}")
    assert_as_accurate(_eval(model, state, _batches(refs)[0]), refs, "eval_logits")


@pytest.mark.slow
def test_population_statistics_pool_every_example(narrow, refs, recalibrated):
    """`population=True`: each BatchNorm's mean and (unbiased, as the layer keeps
    it) variance over every image and position of the pass, not an average of
    per-batch values."""
    model, _ = narrow
    _, state = recalibrated
    exported = export_torch(model, state, num_batches_tracked=None)
    for key in (k for k in exported if k.endswith("running_mean")):
        bn = key.removesuffix(".running_mean")
        assert_as_accurate(exported[key], refs, f"population/{bn}.mean")
        assert_as_accurate(
            exported[f"{bn}.running_var"], refs, f"population/{bn}.var_unbiased"
        )
    # It is another quantity than the default one (REFERENCES.md: layer4.0.bn2,
    # channel 0, 0.089 against 0.071).
    default = export_torch(model, recalibrated[0], num_batches_tracked=None)
    var = "layer4.0.bn2.running_var"
    assert abs(float(default[var][0]) - float(exported[var][0])) > 0.01


@pytest.mark.slow
def test_caller_state_stays_usable_and_result_fits_the_model(narrow, refs):
    """A new State is returned; the one given is neither changed nor spent, and the
    result drives the original model (its BatchNorms' momentum unchanged)."""
    model, state = narrow
    before = jax.tree.map(np.asarray, jax.tree.leaves(state))
    new = eqx_bn.recalibrate(model, state, _batches(refs)[:1])
    after = jax.tree.leaves(state)  # raises if `state` was spent by State.set
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert all(bn.momentum == 0.9 for bn in _norms(model))
    assert all(
        type(new.get(bn.state_index)) is eqx_bn.RunningStats for bn in _norms(model)
    )
    _eval(model, new, _batches(refs)[0])


@pytest.mark.slow
def test_training_mode_model_gives_the_same_statistics(narrow, refs, recalibrated):
    model, state = narrow
    new = eqx_bn.recalibrate(
        eqx.nn.inference_mode(model, False), _clone(state), _batches(refs)
    )
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(recalibrated[0])):
        np.testing.assert_array_equal(a, b)


class _Counter:
    """Hashed by identity, so it can be a static field."""

    def __init__(self):
        self.traces = 0


class _CountingNet(eqx.Module):
    """A Linear and a BatchNorm, counting how often `__call__` is traced."""

    linear: eqx.nn.Linear
    bn: eqx_bn.BatchNorm
    counter: _Counter = eqx.field(static=True)

    def __init__(self, momentum=0.9, *, key):
        self.linear = eqx.nn.Linear(3, 4, key=key)
        self.bn = eqx_bn.BatchNorm(4, momentum=momentum)
        self.counter = _Counter()

    def __call__(self, x, state):
        self.counter.traces += 1
        return self.bn(self.linear(x), state)


def _vectors(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(2.0, 3.0, (n, 3)), jnp.float32) for n in sizes]


def test_one_compile_for_all_batches(key):
    """Batches of one shape run one compiled step; a last, shorter batch costs one
    compile more (documented), nothing else."""
    model, state = eqx.nn.make_with_state(_CountingNet)(key=key)
    eqx_bn.recalibrate(model, state, _vectors([8, 8, 8, 8]))
    assert model.counter.traces == 1
    eqx_bn.recalibrate(model, state, _vectors([8, 8, 8, 5]))
    assert model.counter.traces == 2  # the 8s are compiled already; the 5 once


def test_loader_pairs_use_their_first_element(key):
    """As `update_bn`, a batch that is a tuple or list is `(input, target, ...)`:
    the first element goes through the model."""
    model, state = eqx.nn.make_with_state(_CountingNet)(key=key)
    batches = _vectors([4, 4])
    pairs = [(x, jnp.zeros(len(x), jnp.int32)) for x in batches]
    new = eqx_bn.recalibrate(model, _clone(state), pairs)
    expected = eqx_bn.recalibrate(model, state, batches)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)


def test_custom_apply_also_compiles_once(key):
    model, state = eqx.nn.make_with_state(_CountingNet)(key=key)
    calls = []

    def apply(model, state, batch):
        calls.append(None)
        x, scale = batch
        return jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x * scale, state)

    batches = [(x, jnp.float32(2.0)) for x in _vectors([6, 6, 6])]
    new = eqx_bn.recalibrate(model, state, batches, apply=apply)
    assert len(calls) == 1
    doubled = eqx_bn.recalibrate(model, state, [x * 2.0 for x in _vectors([6, 6, 6])])
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(doubled)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_default_is_a_per_batch_cumulative_average(key):
    """Every batch weighs the same, whatever its size (as `update_bn`), while
    `population=True` weighs every example the same: checked on a BatchNorm fed
    directly, against NumPy."""
    model, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, momentum=0.9)
    batches = _vectors([2, 7, 4])
    default = eqx_bn.recalibrate(model, _clone(state), batches)
    pooled = eqx_bn.recalibrate(model, state, batches, population=True)
    xs = [np.asarray(x, np.float64) for x in batches]
    entry = default.get(model.state_index)
    np.testing.assert_allclose(entry.mean, np.mean([x.mean(0) for x in xs], 0), 1e-5)
    np.testing.assert_allclose(entry.var, np.mean([x.var(0) for x in xs], 0), 1e-5)
    entry = pooled.get(model.state_index)
    every = np.concatenate(xs)
    np.testing.assert_allclose(entry.mean, every.mean(0), rtol=1e-5)
    np.testing.assert_allclose(entry.var, every.var(0), rtol=1e-5)


def test_population_is_accurate_far_from_zero(key):
    """The pooled variance merges (count, mean, sum of squared deviations), never
    `E[x^2] - E[x]^2`: a mean of 1e4 and a standard deviation of 1 keep the
    variance to float32 rounding."""
    model, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(2, momentum=0.9)
    rng = np.random.default_rng(3)
    xs = [rng.normal(1e4, 1.0, (n, 2)) for n in (16, 16, 9, 30)]
    batches = [jnp.asarray(x, jnp.float32) for x in xs]
    entry = eqx_bn.recalibrate(model, state, batches, population=True).get(
        model.state_index
    )
    every = np.concatenate([np.asarray(b, np.float64) for b in batches])
    np.testing.assert_allclose(entry.var, every.var(0), rtol=1e-3)


def test_momentum_none_layers_count_the_batches(key):
    """A `momentum=None` layer ends with the number of batches as its count, as
    `update_bn` leaves `num_batches_tracked`; its statistics are the same as any
    other layer's."""
    model, state = eqx.nn.make_with_state(_CountingNet)(None, key=key)
    batches = _vectors([5, 5, 3])
    new = eqx_bn.recalibrate(model, state, batches)
    entry = new.get(model.bn.state_index)
    assert isinstance(entry, eqx_bn.CumulativeStats)
    assert int(entry.num_batches) == 3
    other, other_state = eqx.nn.make_with_state(_CountingNet)(0.9, key=key)
    reference = eqx_bn.recalibrate(other, other_state, batches)
    np.testing.assert_array_equal(entry.var, reference.get(other.bn.state_index).var)


def test_no_batches_leaves_reset_statistics(key):
    """An empty iterable leaves every BatchNorm reset (mean 0, variance 1, count
    0), as `update_bn` with an empty loader."""
    model, state = eqx.nn.make_with_state(_CountingNet)(None, key=key)
    _, state = jax.vmap(
        model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(_vectors([4])[0], state)
    new = eqx_bn.recalibrate(model, state, [])
    entry = new.get(model.bn.state_index)
    np.testing.assert_array_equal(entry.mean, np.zeros(4, np.float32))
    np.testing.assert_array_equal(entry.var, np.ones(4, np.float32))
    assert int(entry.num_batches) == 0


def test_whole_batch_layers_are_called_with_the_batch(key):
    """A model whose BatchNorms take whole batches (`axis_name=None`) is called on
    the batch as it is, without vmap."""
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None, momentum=0.9)
    batches = _vectors([4, 4])
    new = eqx_bn.recalibrate(bn, state, batches)
    np.testing.assert_allclose(
        new.get(bn.state_index).mean,
        np.mean([np.asarray(x).mean(0) for x in batches], 0),
        rtol=1e-5,
    )


def test_frozen_batch_norms_are_left_alone(key):
    """`update_bn` skips `FrozenBatchNorm2d` (not a `_BatchNorm`): a frozen layer's
    statistics are not recomputed."""
    model, state = eqx.nn.make_with_state(_CountingNet)(key=key)
    frozen = eqx_bn.freeze_batch_norms(model)
    new = eqx_bn.recalibrate(frozen, _clone(state), _vectors([4, 4]))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_a_model_without_batch_norm_returns_the_state(key):
    model = eqx.nn.Linear(3, 2, key=key)
    state = eqx.nn.State(model)
    new = eqx_bn.recalibrate(model, state, _vectors([2]))
    assert jax.tree.structure(new) == jax.tree.structure(state)


def test_an_array_for_batches_is_refused(key):
    model, state = eqx.nn.make_with_state(_CountingNet)(key=key)
    with pytest.raises(TypeError, match=r"iterable of batches.*\[x\]"):
        eqx_bn.recalibrate(model, state, _vectors([4])[0])


def test_apply_returning_no_state_is_refused(key):
    model, state = eqx.nn.make_with_state(_CountingNet)(key=key)
    with pytest.raises(TypeError, match=r"apply.*\(out, state\)"):
        eqx_bn.recalibrate(
            model, state, _vectors([4]), apply=lambda m, s, x: jnp.sum(x)
        )


def test_progress_bar_on_a_terminal(key, monkeypatch):
    """On a terminal a progress bar counts the batches (tqdm); elsewhere nothing
    is printed."""
    model, state = eqx.nn.make_with_state(_CountingNet)(key=key)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        eqx_bn.recalibrate(model, _clone(state), _vectors([3, 3]))
        assert ("recalibrate" in stream.getvalue()) is shown
        assert ("2/2" in stream.getvalue()) is shown

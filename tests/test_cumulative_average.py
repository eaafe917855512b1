"""`BatchNorm(momentum=None)`: PyTorch's cumulative moving average (issue 23, item 1).

The references are `tests/data/torch/cma.npz` (`nn.BatchNorm2d(3, momentum=None)`,
see `tests/data/REFERENCES.md` section 1): batches of different sizes from fresh
statistics (`fresh/`), and from loaded ones with `num_batches_tracked = 3`
(`resumed/`), where the count changes every later step.
"""

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_interop_torch import assert_as_accurate

import eqx_bn
from eqx_bn.interop import (
    export_flax,
    export_nnx,
    export_torch,
    load_flax,
    load_torch,
    torch_paths,
)

DATA = pathlib.Path(__file__).resolve().parent / "data" / "torch"


@pytest.fixture(scope="module")
def cma_ref():
    return dict(np.load(DATA / "cma.npz"))


def _steps(refs, case):
    return sum(1 for k in refs if k.startswith(f"{case}/x/"))


def _cma_layer(refs, axis_name=None):
    """PyTorch's layer. `use_fast_variance=False`: a batch's variance enters the
    cumulative average whole (factor 1 at step 1), so its float32 error shows
    undamped; the one-pass variance is some 12 ulp off on these batches, beyond
    the bound (4x torch's own error), the two-pass one is not."""
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3,
        axis_name,
        momentum=None,
        eps=1e-5,
        unbiased_running_var=True,
        use_fast_variance=False,
    )
    bn = eqx.tree_at(
        lambda b: (b.scale, b.bias),
        bn,
        (jnp.asarray(refs["weight"]), jnp.asarray(refs["bias"])),
    )
    return bn, state


def _resumed_entry(refs):
    return eqx_bn.CumulativeStats(
        jnp.asarray(refs["resumed/running_mean0"]),
        jnp.asarray(refs["resumed/running_var0"]),
        jnp.asarray(refs["resumed/num_batches_tracked0"], jnp.int32),
    )


@eqx.filter_jit
def _whole_batch(bn, state, x):
    return bn(x, state)


@eqx.filter_jit
def _per_example(bn, state, x):
    return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )


@pytest.mark.parametrize("case", ["fresh", "resumed"])
@pytest.mark.parametrize("axis_name", [None, "batch"])
def test_momentum_none_matches_torch_cumulative_average(cma_ref, case, axis_name):
    """Every step's output, running mean and variance and count equal
    `nn.BatchNorm2d(momentum=None)`'s, batches of sizes 4, 2, 5, 3, 1 (each batch
    weighs the same) and, resumed from a count of 3, 3, 6, 2."""
    bn, state = _cma_layer(cma_ref, axis_name)
    if case == "resumed":
        state = state.set(bn.state_index, _resumed_entry(cma_ref))
    step = _whole_batch if axis_name is None else _per_example
    for i in range(_steps(cma_ref, case)):
        y, state = step(bn, state, jnp.asarray(cma_ref[f"{case}/x/{i}"]))
        entry = state.get(bn.state_index)
        assert isinstance(entry, eqx_bn.CumulativeStats)
        assert_as_accurate(y, cma_ref, f"{case}/y/{i}")
        assert_as_accurate(entry.mean, cma_ref, f"{case}/running_mean/{i}")
        assert_as_accurate(entry.var, cma_ref, f"{case}/running_var/{i}")
        assert entry.num_batches.dtype == jnp.int32 and entry.num_batches.shape == ()
        assert int(entry.num_batches) == int(cma_ref[f"{case}/num_batches_tracked/{i}"])
    inference = eqx.nn.inference_mode(bn)
    x_eval = jnp.asarray(cma_ref["x_eval"])
    if axis_name is None:
        y_eval, after = inference(x_eval, state)
    else:
        y_eval, after = jax.vmap(inference, in_axes=(0, None), out_axes=(0, None))(
            x_eval, state
        )
    assert_as_accurate(y_eval, cma_ref, f"{case}/y_eval")
    # Inference neither updates the statistics nor counts the batch, as torch's eval.
    assert int(after.get(bn.state_index).num_batches) == int(entry.num_batches)


def test_first_step_overwrites_the_initial_statistics(cma_ref):
    """The count goes up before the factor 1/count is taken: step 1 has factor 1,
    so the initial mean 0 and variance 1 leave no trace (REFERENCES.md 1)."""
    bn, state = _cma_layer(cma_ref)
    x = jnp.asarray(cma_ref["fresh/x/0"])
    _, state = bn(x, state)
    entry = state.get(bn.state_index)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = np.mean(np.asarray(x, np.float64), axis=(0, 2, 3))
    var = np.var(np.asarray(x, np.float64), axis=(0, 2, 3)) * n / (n - 1)
    np.testing.assert_allclose(entry.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entry.var, var, rtol=1e-5)
    assert int(entry.num_batches) == 1


def test_momentum_none_state_entry_is_cumulative_stats():
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(4, momentum=None)
    entry = state.get(bn.state_index)
    assert type(entry) is eqx_bn.CumulativeStats
    assert entry._fields == ("mean", "var", "num_batches")
    np.testing.assert_array_equal(entry.mean, np.zeros(4, np.float32))
    np.testing.assert_array_equal(entry.var, np.ones(4, np.float32))
    assert entry.num_batches.dtype == jnp.int32 and int(entry.num_batches) == 0
    assert bn.momentum is None


def test_layers_with_a_momentum_keep_their_state_entry():
    """Regression (issue 23.1): layers with a momentum get no new State entry, so
    States and checkpoints made before keep working: two arrays per layer, a
    `RunningStats` as before."""
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(4, momentum=0.9)
    entry = state.get(bn.state_index)
    assert type(entry) is eqx_bn.RunningStats and entry._fields == ("mean", "var")
    assert len(jax.tree.leaves(state)) == 2
    # An existing State (built without the counter) still drives the layer.
    old = eqx.nn.make_with_state(eqx_bn.BatchNorm)(4, momentum=0.9)[1]
    _per_example(bn, old, jnp.ones((3, 4)) * jnp.arange(3.0)[:, None])


def test_momentum_none_rejects_a_state_without_a_count():
    cma, _ = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None, momentum=None)
    _, ema_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None, momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum=None.*CumulativeStats"):
        cma(jnp.ones((2, 3)), ema_state)
    ema, _ = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None, momentum=0.9)
    _, cma_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None, momentum=None)
    with pytest.raises(ValueError, match=r"RunningStats.*momentum=None"):
        ema(jnp.ones((2, 3)), cma_state)


def test_momentum_none_under_jit_keeps_one_compile(cma_ref):
    """The count is an array in the State, not a Python number: every step of the
    same shape reuses one compiled function."""
    bn, state = _cma_layer(cma_ref)
    traces = []

    @eqx.filter_jit
    def step(bn, state, x):
        traces.append(None)
        return bn(x, state)

    x = jnp.asarray(cma_ref["fresh/x/0"])
    for _ in range(3):
        _, state = step(bn, state, x)
    assert len(traces) == 1
    assert int(state.get(bn.state_index).num_batches) == 3


def test_bad_momentum_names_none():
    with pytest.raises(ValueError, match="None for a cumulative average"):
        eqx_bn.BatchNorm(3, momentum="none")


# ------------------------------------------------------------------------ interop


class _Net(eqx.Module):
    bn: eqx_bn.BatchNorm

    def __init__(self, momentum):
        self.bn = eqx_bn.BatchNorm(
            3, None, momentum=momentum, unbiased_running_var=True
        )

    def __call__(self, x, state):
        return self.bn(x, state)


def _torch_state_dict(refs, count):
    return {
        "bn.weight": refs["weight"],
        "bn.bias": refs["bias"],
        "bn.running_mean": refs["resumed/running_mean0"],
        "bn.running_var": refs["resumed/running_var0"],
        "bn.num_batches_tracked": np.asarray(count, np.int64),
    }


def test_load_torch_reads_the_count_and_steps_continue_as_torch(cma_ref):
    """`load_torch` puts `num_batches_tracked` into the State of a `momentum=None`
    layer, and the steps after it are torch's resumed ones."""
    model, state = eqx.nn.make_with_state(_Net)(None)
    model, state = load_torch(model, state, _torch_state_dict(cma_ref, 3))
    assert int(state.get(model.bn.state_index).num_batches) == 3
    for i in range(_steps(cma_ref, "resumed")):
        y, state = _whole_batch(model, state, jnp.asarray(cma_ref[f"resumed/x/{i}"]))
        assert_as_accurate(y, cma_ref, f"resumed/y/{i}")
    entry = state.get(model.bn.state_index)
    assert_as_accurate(entry.var, cma_ref, "resumed/running_var/2")


def test_export_torch_writes_the_count_of_each_cumulative_layer(cma_ref):
    model, state = eqx.nn.make_with_state(_Net)(None)
    model, state = load_torch(model, state, _torch_state_dict(cma_ref, 3))
    _, state = _whole_batch(model, state, jnp.asarray(cma_ref["resumed/x/0"]))
    exported = export_torch(model, state)
    assert exported["bn.num_batches_tracked"].dtype == np.int64
    assert int(exported["bn.num_batches_tracked"]) == 4
    assert "bn.num_batches_tracked" in torch_paths(model)
    # Round trip: loading it back gives the same count.
    _, again = load_torch(model, state, exported)
    assert int(again.get(model.bn.state_index).num_batches) == 4


def test_load_torch_refuses_a_count_that_does_not_fit_int32(cma_ref):
    model, state = eqx.nn.make_with_state(_Net)(None)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        load_torch(model, state, _torch_state_dict(cma_ref, 2**31))


def test_load_torch_without_a_count_keeps_the_states(cma_ref):
    """A state_dict without `num_batches_tracked` (PyTorch allows it) leaves the
    count the given State holds: 0 from make_with_state, as torch fills in 0."""
    model, state = eqx.nn.make_with_state(_Net)(None)
    sd = _torch_state_dict(cma_ref, 3)
    del sd["bn.num_batches_tracked"]
    _, state = load_torch(model, state, sd)
    assert int(state.get(model.bn.state_index).num_batches) == 0


def test_flax_export_leaves_the_count_out_and_load_keeps_the_states(cma_ref):
    """Flax's BatchNorm has no batch count: `export_flax` / `export_nnx` write the
    running mean and variance (all inference needs) and leave the count out;
    `load_flax` keeps the count of the State it is given (documented on each)."""
    model, state = eqx.nn.make_with_state(_Net)(None)
    model, state = load_torch(model, state, _torch_state_dict(cma_ref, 3))
    variables = export_flax(model, state)
    assert set(variables["batch_stats"]["BatchNorm_0"]) == {"mean", "var"}
    assert set(export_nnx(model, state)["bn"]) == {"scale", "bias", "mean", "var"}
    fresh_model, fresh_state = eqx.nn.make_with_state(_Net)(None)
    _, loaded = load_flax(fresh_model, fresh_state, variables)
    entry = loaded.get(fresh_model.bn.state_index)
    np.testing.assert_array_equal(entry.mean, cma_ref["resumed/running_mean0"])
    assert int(entry.num_batches) == 0

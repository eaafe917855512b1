"""Issue 23's tools (momentum=None, freezing, recalibrate, weight averaging,
accumulation, folding) with issue 24's variants (Batch Renormalization, Ghost
BatchNorm): what composes gives the numbers it should, and what does not is refused
with a message that says why and what to do instead.

Refused: `renorm=True` with `momentum=None`; renorm or ghost layers in accumulated
steps; renorm layers in `recalibrate`, ghost ones in `recalibrate(population=True)`.
Frozen layers take part everywhere (they normalise as in inference), as a State
entry of one kind never passes for another.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_bitwise, normal

import eqx_bn
from eqx_bn.train import (
    TrainState,
    accumulated_value_and_grad,
    ema,
    make_train_step,
    swa,
)

RENORM = dict(renorm=True, renorm_clipping={"rmax": 2.0})
GHOST = dict(virtual_batch_size=2)


def _model(bn_kwargs, key=0):
    """Linear(3 -> 4), then a BatchNorm with `bn_kwargs`, per example."""
    return eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(3, 4, key=jax.random.key(key)),
            eqx_bn.BatchNorm(4, **bn_kwargs),
        ]
    )


@eqx.filter_jit
def _train(model, state, x):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )


def _loss(model, state, batch):
    y, state = jax.vmap(
        model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(batch, state)
    return jnp.mean(y**2), (state, None)


def _batches(n=3, size=8, seed=0):
    return [normal((size, 3), seed=seed + i) * (1 + i) + i for i in range(n)]


# ------------------------------------------------------------------ refused


def test_renorm_with_momentum_none_is_refused():
    with pytest.raises(ValueError, match=r"renorm=True needs a momentum.*Pass a"):
        eqx_bn.BatchNorm(4, renorm=True, momentum=None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (RENORM, r"model\.layers\[1\] has renorm=True.*freeze the layer"),
        (GHOST, r"model\.layers\[1\] has virtual_batch_size=2.*without accumulate="),
    ],
)
@pytest.mark.parametrize("full_batch_statistics", [False, True])
def test_accumulation_refuses_renorm_and_ghost(kwargs, message, full_batch_statistics):
    """Their per-batch normalisation has no pooled counterpart: refused when the
    step is traced, not trained with other numbers than one step on the batch."""
    model, state = _model(kwargs)
    ts = TrainState.create(model, state, optax.sgd(0.1))
    step = make_train_step(
        _loss, accumulate=2, full_batch_statistics=full_batch_statistics
    )
    with pytest.raises(ValueError, match="accumulate=k: BatchNorm " + message):
        step(ts, _batches(1)[0])
    grad_fn = accumulated_value_and_grad(
        _loss, accumulate=2, full_batch_statistics=full_batch_statistics
    )
    with pytest.raises(ValueError, match=message):
        grad_fn(model, state, _batches(1)[0])


@pytest.mark.parametrize("kwargs", [RENORM, GHOST], ids=["renorm", "ghost"])
def test_accumulation_takes_frozen_renorm_and_ghost_layers(kwargs):
    """A frozen one normalises with its running statistics: nothing to pool, and
    its State entry comes back as it was."""
    model, state = _model(kwargs)
    model = eqx_bn.freeze_batch_norms(model)
    before = state.get(model.layers[1].state_index)
    grad_fn = eqx.filter_jit(accumulated_value_and_grad(_loss, accumulate=2))
    (loss, (state, _)), _ = grad_fn(model, state, _batches(1)[0])
    assert np.isfinite(float(loss))
    assert_bitwise(state.get(model.layers[1].state_index), before)


def test_recalibrate_refuses_renorm_unless_frozen():
    model, state = _model(RENORM)
    _, state = _train(model, state, _batches(1)[0])
    with pytest.raises(
        ValueError,
        match=r"recalibrate: BatchNorm model\.layers\[1\] has renorm=True.*"
        r"learning rate of 0.*frozen='statistics'",
    ):
        eqx_bn.recalibrate(model, state, _batches())
    frozen = eqx_bn.freeze_batch_norms(model, affine=False)
    new = eqx_bn.recalibrate(frozen, state, _batches())
    index = model.layers[1].state_index
    assert_bitwise(new.get(index), state.get(index))


def test_recalibrate_refuses_ghost_population():
    model, state = _model(GHOST)
    with pytest.raises(
        ValueError,
        match=r"population=True\): BatchNorm model\.layers\[1\] has "
        r"virtual_batch_size=2.*population=False",
    ):
        eqx_bn.recalibrate(model, state, _batches(), population=True)


# ------------------------------------------------------------------ composed


@pytest.mark.parametrize("unbiased", [False, True])
def test_ghost_with_momentum_none_averages_the_steps_ghost_statistics(unbiased):
    """momentum=None over ghost steps: the running statistics are the average of
    what each step's ghost statistics are (those a momentum=0 twin keeps, one step
    at a time), every step weighing the same; the count counts the steps."""
    kwargs = dict(GHOST, unbiased_running_var=unbiased)
    model, state = _model(dict(kwargs, momentum=None))
    twin, twin_state = _model(dict(kwargs, momentum=0.0))
    index, twin_index = model.layers[1].state_index, twin.layers[1].state_index
    per_step = []
    for x in _batches():
        _, state = _train(model, state, x)
        _, stepped = _train(twin, twin_state, x)
        per_step.append(stepped.get(twin_index))
    entry = state.get(index)
    assert type(entry) is eqx_bn.CumulativeStats and int(entry.num_batches) == 3
    for name in ("mean", "var"):
        want = np.mean([np.float64(getattr(s, name)) for s in per_step], 0)
        np.testing.assert_allclose(getattr(entry, name), want, rtol=1e-6, atol=1e-7)


def test_recalibrate_ghost_is_a_momentum_none_pass():
    """`recalibrate` (population=False) on a ghost layer: each batch's statistics
    taken from its virtual batches, averaged over the batches, as a
    `momentum=None` twin trained on them from a reset State."""
    model, state = _model(GHOST)
    _, state = _train(model, state, normal((8, 3), seed=9) * 5)  # stale statistics
    new = eqx_bn.recalibrate(model, state, _batches())
    twin, twin_state = _model(dict(GHOST, momentum=None))
    for x in _batches():
        _, twin_state = _train(twin, twin_state, x)
    got, want = (
        new.get(model.layers[1].state_index),
        twin_state.get(twin.layers[1].state_index),
    )
    assert type(got) is eqx_bn.RunningStats
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.var, want.var, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs", [RENORM, GHOST], ids=["renorm", "ghost"])
@pytest.mark.parametrize("affine", [True, False])
def test_frozen_renorm_and_ghost_train_as_inference(kwargs, affine):
    """Keras's and tf_keras's `trainable = False`: a frozen renorm or ghost layer
    gives its inference output in training and leaves its statistics (and bounds)
    as they were."""
    model, state = _model(kwargs)
    _, state = _train(model, state, _batches(1)[0])  # away from the initial values
    frozen = eqx_bn.freeze_batch_norms(model, affine=affine)
    x = _batches(1, seed=5)[0]
    y, new = _train(frozen, state, x)
    want, _ = _train(eqx.nn.inference_mode(model), state, x)
    np.testing.assert_array_equal(y, want)
    assert_bitwise(new, state)


def test_fold_ghost_and_frozen_renorm_layers():
    """Folding uses the running mean and variance of any kind of entry: a ghost
    layer with momentum=None (CumulativeStats), and a frozen renorm layer folded in
    a training model."""
    for kwargs, freeze in ((dict(GHOST, momentum=None), False), (RENORM, True)):
        model, state = _model(kwargs)
        for x in _batches():
            _, state = _train(model, state, x)
        model = eqx_bn.freeze_batch_norms(model) if freeze else model
        model = model if freeze else eqx.nn.inference_mode(model)
        x = _batches(1, seed=7)[0]
        want, _ = jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)
        folded = eqx_bn.fold_batch_norms(model, state)
        assert isinstance(folded.layers[1], eqx_bn.FoldedBatchNorm)
        got, _ = jax.vmap(folded, in_axes=(0, None), out_axes=(0, None))(x, state)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("averaging", [ema(0.9), swa(average_state=True)])
def test_averaging_keeps_the_latest_clipping_bounds(averaging):
    """The renorm statistics are averaged as buffers; the clipping bounds are the
    latest model's (averaged, the unbounded dmax = inf would become NaN)."""
    model, state = _model(RENORM)
    bn = model.layers[1]
    ts = TrainState.create(model, state, optax.sgd(0.1))
    avg = averaging.init(ts)
    stats = []
    for i, x in enumerate(_batches()):
        _, state = _train(model, ts.state, x)
        state = eqx_bn.set_renorm_clipping(model, state, rmax=2.0 + i)
        ts = ts.replace(state=state)
        stats.append(state.get(bn.state_index))
        avg = averaging.update(avg, ts)
    clipping = avg.state.get(bn.clipping_index)
    assert float(clipping.rmax) == 4.0 and float(clipping.rmin) == 0.0
    assert float(clipping.dmax) == np.inf
    averaged = avg.state.get(bn.state_index)
    assert type(averaged) is eqx_bn.RenormStats
    assert all(np.all(np.isfinite(a)) for a in averaged)
    assert not np.array_equal(averaged.renorm_mean, stats[-1].renorm_mean)


_KINDS = {
    "RunningStats": {},
    "CumulativeStats": dict(momentum=None),
    "RenormStats": dict(renorm=True),
}


@pytest.mark.parametrize(
    "ours, theirs", [(a, b) for a in _KINDS for b in _KINDS if a != b]
)
@pytest.mark.parametrize("inference", [False, True])
def test_a_state_entry_of_another_kind_names_both(ours, theirs, inference):
    """Each kind of layer refuses the others' entries, saying which layer keeps
    the one it got and how to carry the statistics over."""
    bn, _ = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None, **_KINDS[ours])
    other, other_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3, None, **_KINDS[theirs]
    )
    swapped = eqx.tree_at(lambda b: b.state_index, bn, other.state_index)
    with pytest.raises(ValueError) as e:
        swapped(normal((4, 3)), other_state, inference=inference)
    message = str(e.value)
    assert f"keeps {ours}(" in message and f"keeps ({theirs}(" in message
    assert f"eqx_bn.{ours}(" in message and "make_with_state" in message


def test_torch_names_a_ghost_momentum_none_layer_count():
    """Ghost BatchNorm holds nothing PyTorch lacks: a momentum=None ghost layer is
    a BatchNorm2d with its num_batches_tracked."""
    from eqx_bn.interop import export_torch

    model, state = _model(dict(GHOST, momentum=None))
    for x in _batches(2):
        _, state = _train(model, state, x)
    exported = export_torch(model, state)
    assert int(exported["1.num_batches_tracked"]) == 2
    np.testing.assert_array_equal(
        exported["1.running_mean"], state.get(model.layers[1].state_index).mean
    )

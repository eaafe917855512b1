"""Weight averaging (issue 23 item 4): `eqx_bn.train.ema` and `eqx_bn.train.swa`
against PyTorch's `torch.optim.swa_utils.AveragedModel`, with the BatchNorm
statistics averaged as buffers or recalibrated after averaging (`update_bn`).

The torch-free tier feeds the recorded trajectory of `tests/data/torch/averaging.npz`
(the `state_dict` after each of 100 SGD steps, see `tests/data/REFERENCES.md` section
4) to the averaging, one row per step, and compares with what `AveragedModel`
recorded. The live tier (torch installed) runs `AveragedModel` on the same rows and
asserts the float32 results are bitwise equal: the EMA is the same fused lerp.
"""

import contextlib
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_as_accurate as assert_within_rounding

import eqx_bn
from eqx_bn.interop import export_torch
from eqx_bn.train import Averaged, TrainState, ema, make_train_step, swa

DATA = pathlib.Path(__file__).resolve().parent / "data" / "torch"
FACTOR = 4  # how many times PyTorch's own float32 error eqx_bn may be off
STEPS = 100
EMA_DECAY = 0.99
EMA_AT = (1, 2, 10, 50, 100)
SWA_START = 50


class TinyNet(eqx.Module):
    """`make_after_training_reference.TinyNet`, one image `(2, 6, 6)` at a time:
    conv-bn-relu twice, global average pool, linear. PyTorch's BatchNorm numerics
    (momentum 0.1 there, eps 1e-5, unbiased running variance)."""

    conv1: eqx.nn.Conv2d
    bn1: eqx_bn.BatchNorm
    conv2: eqx.nn.Conv2d
    bn2: eqx_bn.BatchNorm
    fc: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        bn = dict(momentum=0.9, eps=1e-5, unbiased_running_var=True)
        self.conv1 = eqx.nn.Conv2d(2, 3, 3, padding=1, use_bias=False, key=k1)
        self.bn1 = eqx_bn.BatchNorm(3, **bn)
        self.conv2 = eqx.nn.Conv2d(3, 3, 3, padding=1, use_bias=False, key=k2)
        self.bn2 = eqx_bn.BatchNorm(3, **bn)
        self.fc = eqx.nn.Linear(3, 2, key=k3)

    def __call__(self, x, state):
        x, state = self.bn1(self.conv1(x), state)
        x, state = self.bn2(self.conv2(jax.nn.relu(x)), state)
        return self.fc(jnp.mean(jax.nn.relu(x), axis=(1, 2))), state


@pytest.fixture(scope="module")
def refs():
    return dict(np.load(DATA / "averaging.npz"))


@pytest.fixture(scope="module")
def skeleton():
    """TinyNet's structure only: every array comes from a recorded row (building it
    for real would compile each random initialiser)."""
    return eqx.filter_eval_shape(eqx.nn.make_with_state(TinyNet), jax.random.key(0))


def row(refs, step: int) -> dict:
    """The PyTorch `state_dict` after `step` SGD steps (0: the initial one)."""
    return {
        k.removeprefix("trajectory/"): v[step]
        for k, v in refs.items()
        if k.startswith("trajectory/")
    }


def fresh(skeleton):
    """The skeleton's model and a State of its own with arrays in it (`set` consumes
    a State), all to be filled."""
    model, state = skeleton
    state = jax.tree.map(lambda s: jnp.asarray(np.zeros(s.shape, s.dtype)), state)
    return model, state


PARAMS = {
    "conv1.weight": lambda m: m.conv1.weight,
    "bn1.weight": lambda m: m.bn1.scale,
    "bn1.bias": lambda m: m.bn1.bias,
    "conv2.weight": lambda m: m.conv2.weight,
    "bn2.weight": lambda m: m.bn2.scale,
    "bn2.bias": lambda m: m.bn2.bias,
    "fc.weight": lambda m: m.fc.weight,
    "fc.bias": lambda m: m.fc.bias,
}


def loaded(skeleton, refs, step: int) -> tuple[TinyNet, eqx.nn.State]:
    """The model and State of row `step`, filled by hand: no eager JAX operation,
    so nothing compiles per row (`load_torch` is tested elsewhere)."""
    model, state = fresh(skeleton)
    values = row(refs, step)
    model = eqx.tree_at(
        lambda m: [get(m) for get in PARAMS.values()],
        model,
        [jnp.asarray(values[name]) for name in PARAMS],
    )
    for bn in ("bn1", "bn2"):
        stats = eqx_bn.RunningStats(
            jnp.asarray(values[f"{bn}.running_mean"]),
            jnp.asarray(values[f"{bn}.running_var"]),
        )
        state = state.set(getattr(model, bn).state_index, stats)
    return model, state


def as_torch(model, state) -> dict:
    return {k: np.asarray(v) for k, v in export_torch(model, state).items()}


def assert_as_accurate(ours, refs, key, terms=None):
    """`helpers.assert_as_accurate` with PyTorch as the reference library: its
    float32 error is `err/<key>` (the convention of
    `make_after_training_reference.py`); `terms`, the size of the terms summed to
    make the value (else its own size)."""
    assert_within_rounding(ours, refs, key, FACTOR, "PyTorch", terms)


def averaged_run(skeleton, refs, averager, start=1) -> dict:
    """The averaging fed the recorded rows `start..100`, one update per row, as a
    training loop calls it after each step; the averaged `state_dict` (and count)
    after each step of `EMA_AT` and at the end."""
    ts = TrainState.create(*loaded(skeleton, refs, 0), optax.sgd(0.1))
    avg = averager.init(ts)
    seen = {}
    for step in range(start, STEPS + 1):
        ts = ts.replace(**dict(zip(("model", "state"), loaded(skeleton, refs, step))))
        avg = averager.update(avg, ts)
        if step in EMA_AT or step == STEPS:
            seen[step] = dict(as_torch(avg.model, avg.state), n=int(avg.count))
    return dict(seen=seen, avg=avg, ts=ts)


@pytest.fixture(scope="module")
def ema_run(skeleton, refs):
    return averaged_run(skeleton, refs, ema(EMA_DECAY))


@pytest.fixture(scope="module")
def swa_run(skeleton, refs):
    return averaged_run(skeleton, refs, swa(), start=SWA_START + 1)


def test_ema_with_state_equals_averaged_model_with_buffers(ema_run, refs):
    """`ema(0.99)` = `AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99),
    use_buffers=True)`: parameters and running statistics, after every step shown."""
    for step in EMA_AT:
        got = ema_run["seen"][step]
        assert got["n"] == int(refs[f"ema/{step}/n_averaged"]) == step
        for name in row(refs, 0):
            if name.endswith("num_batches_tracked"):
                continue  # see test_integer_leaves_are_the_latest_not_averaged
            assert_as_accurate(got[name], refs, f"ema/{step}/{name}")


def test_the_first_update_copies(ema_run, refs):
    """As `AveragedModel`: the average starts at the weights after the first step
    (W_1), not at the weights it was made from (W_0), whatever the decay."""
    got, first = ema_run["seen"][1], row(refs, 1)
    for name, value in first.items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_ema_is_torch_s_fused_lerp(skeleton, refs):
    """`ema + w * (x - ema)` with `w = float32(1 - decay)`, as torch's CPU
    `_foreach_lerp_`: bitwise the NumPy float64 evaluation of that formula rounded
    once (a fused multiply-add), step after step, from the recorded rows."""
    ts = TrainState.create(*loaded(skeleton, refs, 0), optax.sgd(0.1))
    averager = ema(EMA_DECAY)
    avg = averager.init(ts)
    name = "conv2.weight"
    w = np.float64(np.float32(1 - EMA_DECAY))
    expected = None
    for step in range(1, 21):
        ts = ts.replace(model=loaded(skeleton, refs, step)[0])
        avg = averager.update(avg, ts)
        current = row(refs, step)[name]
        if expected is None:
            expected = current
        else:
            diff = (current - expected).astype(np.float64)  # rounded to float32
            expected = (expected + w * diff).astype(np.float32)
        got = as_torch(avg.model, avg.state)[name]
        np.testing.assert_array_equal(got, expected, err_msg=f"step {step}")


def test_swa_equals_averaged_model_defaults(swa_run, refs):
    """`swa()` = `AveragedModel(model)`: the equal-weight mean of the weights after
    steps 51..100; the running statistics are the latest model's (`use_buffers=
    False` copies the buffers), ready to be recalibrated."""
    got = swa_run["seen"][STEPS]
    assert got["n"] == int(refs["swa/n_averaged"]) == STEPS - SWA_START
    latest = row(refs, STEPS)
    for name in latest:
        if name.endswith("num_batches_tracked"):
            continue
        if "running" in name:
            np.testing.assert_array_equal(got[name], latest[name], err_msg=name)
            np.testing.assert_array_equal(got[name], refs[f"swa/averaged/{name}"])
        else:
            assert_as_accurate(got[name], refs, f"swa/averaged/{name}")


def _recalibration_batches():
    """The first 4 training batches of the reference (`_batches()` there), which
    `update_bn` ran over: NumPy's legacy `RandomState` stream is fixed (NEP 19)."""
    rng = np.random.RandomState(2324)
    return rng.standard_normal((STEPS, 8, 2, 6, 6)).astype(np.float32)[:4]


def eval_logits(model, state, x):
    model = eqx.nn.inference_mode(model)
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)[0]


@pytest.mark.parametrize("name", ["swa", "ema_update_bn"])
def test_average_then_recalibrate_equals_update_bn(name, swa_run, ema_run, refs):
    """`AveragedModel` then `update_bn(loader, averaged)` = the average then
    `eqx_bn.recalibrate`: the statistics of the averaged weights, recomputed over
    the first 4 training batches, and the eval logits with them."""
    avg = (swa_run if name == "swa" else ema_run)["avg"]
    state = eqx_bn.recalibrate(avg.model, avg.state, list(_recalibration_batches()))
    got = as_torch(avg.model, state)
    for key in refs:
        if key.startswith(f"{name}/recalibrated/") and "num_batches" not in key:
            bn_name = key.removeprefix(f"{name}/recalibrated/")
            terms = None
            if bn_name.endswith("running_mean"):
                # A mean of values spread by about the standard deviation: its
                # rounding is that of those terms, not of the (small) result.
                var = refs[key.replace("running_mean", "running_var")]
                terms = float(np.max(np.abs(refs[key])) + np.max(np.sqrt(var)))
            assert_as_accurate(got[bn_name], refs, key, terms)
    logits = eval_logits(avg.model, state, refs["x_eval"])
    assert_as_accurate(logits, refs, f"{name}/eval_logits")


def test_average_state_off_and_on(skeleton, refs):
    """`average_state` chooses, for either averager, between averaging the running
    statistics as buffers and taking the latest model's."""
    runs = {
        (kind, on): averaged_run(skeleton, refs, make(average_state=on), start=91)
        for kind, make in (("ema", lambda **kw: ema(0.9, **kw)), ("swa", swa))
        for on in (False, True)
    }
    latest = row(refs, STEPS)
    for kind in ("ema", "swa"):
        off, on = runs[kind, False]["seen"][STEPS], runs[kind, True]["seen"][STEPS]
        for name in ("bn1.running_mean", "bn2.running_var"):
            np.testing.assert_array_equal(off[name], latest[name])
            assert np.max(np.abs(on[name] - latest[name])) > 1e-4, (kind, name)
        # The parameters do not depend on it.
        np.testing.assert_array_equal(off["conv1.weight"], on["conv1.weight"])
    # SWA with the state averaged = the mean of the recorded running statistics.
    means = np.mean(
        [row(refs, s)["bn2.running_var"] for s in range(91, STEPS + 1)], axis=0
    )
    np.testing.assert_allclose(
        runs["swa", True]["seen"][STEPS]["bn2.running_var"], means, rtol=1e-6
    )


class CountingNet(eqx.Module):
    """A State holding an integer leaf beside float ones (a step counter), as
    `BatchNorm(momentum=None)` holds `num_batches_tracked`."""

    linear: eqx.nn.Linear
    index: eqx.nn.StateIndex

    def __init__(self, key):
        self.linear = eqx.nn.Linear(2, 2, key=key)
        self.index = eqx.nn.StateIndex((jnp.zeros(2), jnp.array(0, jnp.int32)))

    def __call__(self, x, state):
        total, count = state.get(self.index)
        y = self.linear(x)
        return y, state.set(self.index, (total + y, count + 1))


def counting_loss(model, state, batch):
    y, state = model(batch, state)
    return jnp.sum(y**2), (state, None)


def test_integer_leaves_are_the_latest_not_averaged():
    """Decided for eqx_bn: integer leaves (counts such as `num_batches_tracked`)
    are the latest model's. PyTorch averages them in float and truncates, so with
    decay 0.99 its averaged count stays 1 for ever (recorded:
    `ema/100/bn1.num_batches_tracked == 1`), a count of nothing."""
    model, state = eqx.nn.make_with_state(CountingNet)(jax.random.key(0))
    ts = TrainState.create(model, state, optax.sgd(0.1))
    step = make_train_step(counting_loss)
    averager = ema(0.99)
    avg = averager.init(ts)
    for _ in range(5):
        ts, _, _ = step(ts, jnp.ones(2))
        avg = averager.update(avg, ts)
    total, count = avg.state.get(model.index)
    assert count.dtype == jnp.int32 and int(count) == 5 == int(avg.count)
    # The float leaves are averaged: not the latest.
    latest_total, _ = ts.state.get(model.index)
    assert not np.array_equal(np.asarray(total), np.asarray(latest_total))


@contextlib.contextmanager
def compilations():
    """The XLA compilations that happen in the block, as a list."""
    seen = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def loss_fn(model, state, batch):
    x, labels = batch
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    logits, state = batched(x, state)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), (state, None)


def test_update_compiles_once_and_survives_donation(skeleton, refs):
    """The update compiles for the first step only (the decay and the count are
    not Python values that change), and the average owns its buffers: a donating
    train step that consumes the `TrainState` it was updated from leaves it
    intact."""
    train_step = make_train_step(loss_fn, donate=True)
    ts = TrainState.create(*loaded(skeleton, refs, 0), optax.sgd(0.1, momentum=0.9))
    x = _recalibration_batches()
    labels = np.zeros((4, 8), np.int32)
    for averaging in (ema(0.99), swa()):
        avg = averaging.init(ts)
        for i in range(4):
            ts, _, _ = train_step(ts, (x[i], labels[i]))
            with compilations() as compiled:
                avg = averaging.update(avg, ts)
            assert (len(compiled) > 0) == (i == 0), (i, compiled)
        assert isinstance(avg, Averaged) and int(avg.count) == 4
        consumed = ts
        ts, _, _ = train_step(ts, (x[0], labels[0]))  # consumes the last holder
        jax.block_until_ready(avg)  # every buffer of the average is alive
        assert np.isfinite(np.asarray(avg.model.conv1.weight)).all()
        with pytest.raises(ValueError, match=r"update: this TrainState was donated"):
            averaging.update(avg, consumed)
        assert int(averaging.update(avg, ts).count) == 5  # the refusal took nothing


def test_average_is_a_pytree_that_serialises(ema_run, tmp_path, skeleton, refs):
    avg = ema_run["avg"]
    path = tmp_path / "avg.eqx"
    eqx.tree_serialise_leaves(path, avg)
    ts = TrainState.create(*loaded(skeleton, refs, 0), optax.sgd(0.1))
    like = ema(EMA_DECAY).init(ts)
    back = eqx.tree_deserialise_leaves(path, like)
    assert eqx.tree_equal(back, avg)
    assert int(back.count) == STEPS


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan")])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match=r"decay.*\[0, 1\]"):
        ema(decay)


@pytest.mark.live
def test_ema_matches_live_torch_bitwise(skeleton, refs):
    """Live: torch's own `AveragedModel` on the recorded rows, in float32, and
    eqx_bn's EMA agree to the bit, parameters and running statistics."""
    torch = pytest.importorskip("torch")
    from torch.optim import swa_utils

    class Carrier(torch.nn.Module):
        def __init__(self, state_dict):
            super().__init__()
            for name, value in state_dict.items():
                module, attr = name.rsplit(".", 1)
                holder = self
                for part in module.split("."):
                    if not hasattr(holder, part):
                        holder.add_module(part, torch.nn.Module())
                    holder = getattr(holder, part)
                tensor = torch.from_numpy(np.array(value))
                if attr in ("running_mean", "running_var", "num_batches_tracked"):
                    holder.register_buffer(attr, tensor)
                else:
                    holder.register_parameter(attr, torch.nn.Parameter(tensor))

    live = swa_utils.AveragedModel(
        Carrier(row(refs, 0)),
        multi_avg_fn=swa_utils.get_ema_multi_avg_fn(EMA_DECAY),
        use_buffers=True,
    )
    ts = TrainState.create(*loaded(skeleton, refs, 0), optax.sgd(0.1))
    averager = ema(EMA_DECAY)
    avg = averager.init(ts)
    for step in range(1, 31):
        live.update_parameters(Carrier(row(refs, step)))
        ts = ts.replace(**dict(zip(("model", "state"), loaded(skeleton, refs, step))))
        avg = averager.update(avg, ts)
    ours = as_torch(avg.model, avg.state)
    for name, value in live.module.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(ours[name], value.numpy(), err_msg=name)


def test_update_refuses_the_train_state_of_another_model(ema_run):
    model, state = eqx.nn.make_with_state(CountingNet)(jax.random.key(0))
    other = TrainState.create(model, state, optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"ema.update: the TrainState's model is not"):
        ema(EMA_DECAY).update(ema_run["avg"], other)

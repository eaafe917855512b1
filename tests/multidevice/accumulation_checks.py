"""Gradient accumulation (`make_train_step(..., accumulate=k)`, issue 23 item 5) on
a batch sharded over 8 simulated CPU devices.

Run by `tests/test_multidevice.py` in a subprocess. The micro-batches are
interleaved (micro-batch `i` holds examples `i, i + k, ...`), so a batch sharded
along its first axis gives micro-batches sharded the same way, each device holding
its part of every one; and an accumulated step on the sharded batch equals the
same step on one device, in both modes, with per-example (vmap) and whole-batch
layers.
"""

import _harness  # first: 8 CPU devices, set before JAX starts
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _harness import check, tree_close
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqx_bn
from eqx_bn._accumulation import micro_batches
from eqx_bn.train import TrainState, make_train_step

C_IN, C = 3, 4
K = 2
N = _harness.N_DEVICES * 2 * K

_rng = np.random.default_rng(11)
X = jnp.asarray(_rng.normal(0.5, 2.0, (N, C_IN)), jnp.float32)
Y = jnp.asarray(_rng.normal(size=(N, 1)), jnp.float32)


class Net(eqx.Module):
    dense: eqx.nn.Linear
    bn: eqx_bn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, axis_name, key):
        k1, k2 = jax.random.split(key)
        self.dense = eqx.nn.Linear(C_IN, C, use_bias=False, key=k1)
        self.bn = eqx_bn.BatchNorm(C, axis_name, momentum=0.9)
        self.head = eqx.nn.Linear(C, 1, key=k2)


def loss_fn(model, state, batch):
    x, y = batch
    if model.bn.axis_name is None:  # whole-batch layers
        h, state = model.bn(jax.vmap(model.dense)(x), state)
        pred = jax.vmap(model.head)(jax.nn.relu(h))
    else:

        def one(x, state):
            h, state = model.bn(model.dense(x), state)
            return model.head(jax.nn.relu(h)), state

        pred, state = jax.vmap(
            one, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)
    return jnp.mean((pred - y) ** 2), (state, pred)


def one_step(axis_name, exact, batch):
    model, state = eqx.nn.make_with_state(Net)(axis_name, jax.random.key(0))
    ts = TrainState.create(model, state, optax.sgd(0.1))
    sharding = getattr(batch[0], "sharding", None)
    if isinstance(sharding, NamedSharding):
        # The holder replicated on the batch's mesh, as a data-parallel run puts it
        # (sharding_checks.py): with Explicit axes the State must live there too.
        ts = jax.device_put(ts, NamedSharding(sharding.mesh, P()))
    step = make_train_step(loss_fn, accumulate=K, full_batch_statistics=exact)
    ts, loss, _ = step(ts, batch)
    return ts.params, ts.state.get(model.bn.state_index), loss


def on_mesh(*arrays, axis_type=AxisType.Explicit):
    """`jax.make_mesh`'s default axes are Explicit in jax 0.10; JAX cannot `psum`
    over a vmap axis sharded explicitly, so per-example layers use Auto axes (as
    `sharding_checks.py` does)."""
    mesh = jax.make_mesh((_harness.N_DEVICES,), ("data",), axis_types=(axis_type,))
    sharding = NamedSharding(mesh, P("data"))
    return tuple(jax.device_put(a, sharding) for a in arrays)


@check
def check_micro_batches_stay_sharded():
    """Every micro-batch is spread over all 8 devices, 2 examples on each."""
    (x,) = on_mesh(X)
    parts = jax.jit(lambda x: micro_batches(x, K))(x)
    for i in range(K):
        part = parts[i]
        np.testing.assert_array_equal(np.asarray(part), np.asarray(X[i::K]))
        assert len(part.sharding.device_set) == _harness.N_DEVICES
        shards = {s.data.shape[0] for s in part.addressable_shards}
        assert shards == {N // K // _harness.N_DEVICES}, shards


def _equals_one_device(axis_name, exact):
    axis_type = AxisType.Explicit if axis_name is None else AxisType.Auto
    sharded = one_step(axis_name, exact, on_mesh(X, Y, axis_type=axis_type))
    single = one_step(axis_name, exact, (X, Y))
    tree_close(sharded, single, what=f"axis_name={axis_name} exact={exact}")


@check
def check_pooled_step_sharded():
    _equals_one_device("batch", False)


@check
def check_exact_step_sharded():
    _equals_one_device("batch", True)


@check
def check_whole_batch_layers_sharded():
    _equals_one_device(None, False)
    _equals_one_device(None, True)


if __name__ == "__main__":
    _harness.run()

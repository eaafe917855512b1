"""Data parallelism with `jax.jit` and a `NamedSharding` batch: no named axes at all.

Run by `tests/test_multidevice.py` in a subprocess with 8 simulated CPU devices. The
layer has `axis_name=None` and sees the whole global batch; XLA's SPMD partitioner
splits the work over the mesh and inserts the all-reduces. A training step (loss,
gradients, optimiser update, running statistics, predictions) must equal the same
step on one device.
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

C_IN, C, L = 2, 4, 6
N = 4 * _harness.N_DEVICES


class Net(eqx.Module):
    conv: eqx.nn.Conv1d
    bn: eqx_bn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv1d(C_IN, C, 3, padding=1, key=k1)
        self.bn = eqx_bn.BatchNorm(C, axis_name=None, momentum=0.9)
        self.head = eqx.nn.Linear(C, "scalar", key=k2)

    def __call__(self, x, state, mask=None):
        h = jax.vmap(self.conv)(x)  # (N, C, L)
        h, state = self.bn(h, state, mask=mask)
        h = jnp.mean(jax.nn.relu(h), axis=-1)
        return jax.vmap(self.head)(h), state


_rng = np.random.default_rng(1)
X = jnp.asarray(1.5 + _rng.normal(size=(N, C_IN, L)), dtype=jnp.float32)
T = jnp.asarray(_rng.normal(size=(N,)), dtype=jnp.float32)
# Per example, which positions count in the statistics: uneven over the shards.
MASK = jnp.asarray(_rng.random((N, 1, L)) < np.linspace(0.1, 1.0, N)[:, None, None])

OPTIM = optax.sgd(0.1)


@eqx.filter_jit
def train_step(model, state, opt_state, x, t, mask):
    def loss_fn(model):
        pred, new_state = model(x, state, mask)
        return jnp.mean((pred - t) ** 2), new_state

    (loss, new_state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
    updates, opt_state = OPTIM.update(grads, opt_state, model)
    model = eqx.apply_updates(model, updates)
    return model, new_state, opt_state, loss, grads


def init():
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    return model, state, OPTIM.init(eqx.filter(model, eqx.is_array))


def run_step(mesh, mask):
    """One step; with a mesh, the batch is split over "data", the rest replicated."""
    model, state, opt_state = init()
    x, t = X, T
    if mesh is not None:
        batch = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        x, t = jax.device_put(x, batch), jax.device_put(t, batch)
        mask = None if mask is None else jax.device_put(mask, batch)
        model, state, opt_state = eqx.filter_shard(
            (model, state, opt_state), replicated
        )
    args = (model, state, opt_state, x, t, mask)
    model, state, opt_state, loss, grads = train_step(*args)
    return args, {
        "model": eqx.filter(model, eqx.is_array),
        "running": state.get(model.bn.state_index),
        "loss": loss,
        "grads": eqx.filter(grads, eqx.is_array),
    }


def lowered_text(args):
    """The compiled HLO of `train_step` for these arguments."""
    dynamic, static = eqx.partition(args, eqx.is_array)
    step = jax.jit(lambda d: train_step(*eqx.combine(d, static)))
    return step.lower(dynamic).compile().as_text()


_single_device = {}


def data_parallel_equals_one_device(axis_type, mask, check_hlo=False):
    mesh = jax.make_mesh((_harness.N_DEVICES,), ("data",), (axis_type,))
    args, sharded = run_step(mesh, mask)
    key = mask is None
    if key not in _single_device:
        _single_device[key] = run_step(None, mask)[1]
    tree_close(sharded, _single_device[key], what=f"{axis_type} mask={not key}")
    if check_hlo:  # it really ran data-parallel: 8 partitions, joined by all-reduces
        hlo = lowered_text(args)
        assert "num_partitions=8" in hlo and "all-reduce" in hlo, hlo[:2000]


@check
def check_explicit_mesh():
    """`jax.make_mesh`'s default axes (Explicit in jax 0.10)."""
    data_parallel_equals_one_device(AxisType.Explicit, None, check_hlo=True)


@check
def check_auto_mesh():
    data_parallel_equals_one_device(AxisType.Auto, None)


@check
def check_masks_uneven_over_shards():
    """Masked statistics are exact global ones here too."""
    data_parallel_equals_one_device(AxisType.Explicit, MASK)


@check
def check_two_steps_running_stats():
    """Running statistics carried across steps stay equal to one device's."""
    mesh = jax.make_mesh((_harness.N_DEVICES,), ("data",))
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    states = []
    for sharded in (True, False):
        model, state, opt_state = init()
        x, t = X, T
        if sharded:
            x, t = jax.device_put(x, batch), jax.device_put(t, batch)
            model, state, opt_state = eqx.filter_shard(
                (model, state, opt_state), replicated
            )
        for _ in range(2):
            model, state, opt_state, _, _ = train_step(
                model, state, opt_state, x, t, None
            )
        states.append(state.get(model.bn.state_index))
    tree_close(states[0], states[1], what="after two steps")


@check
def check_state_off_the_mesh_error():
    """An explicit mesh needs the state on it: a ValueError that says how."""
    mesh = jax.make_mesh((_harness.N_DEVICES,), ("data",))
    batch = NamedSharding(mesh, P("data"))
    model, state, opt_state = init()
    try:
        train_step(
            model,
            state,
            opt_state,
            jax.device_put(X, batch),
            jax.device_put(T, batch),
            None,
        )
    except ValueError as err:
        assert "device_put(state, NamedSharding(mesh, P()))" in str(err), str(err)
    else:
        raise AssertionError("a state off the explicit mesh should raise")


if __name__ == "__main__":
    _harness.run()

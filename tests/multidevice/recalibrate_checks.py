"""`eqx_bn.recalibrate` on batches sharded over 8 simulated CPU devices (issue 23.2).

Run by `tests/test_multidevice.py` in a subprocess. The statistics recomputed from
sharded batches must equal those from the same batches on one device: with the
default call (vmap over "batch" under jit, the batch split over a mesh), with a
whole-batch model (`axis_name=None`), with `population=True`, and with an `apply`
that runs the model under `shard_map` (the BatchNorm reducing over the mesh axis
and the vmap axis).
"""

import _harness  # first: 8 CPU devices, set before JAX starts
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _harness import check, tree_close
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_bn

C_IN, C = 3, 4
PER_DEVICE = 2
N = _harness.N_DEVICES * PER_DEVICE

_rng = np.random.default_rng(7)
BATCHES = [
    jnp.asarray(_rng.normal(1.5, 2.0, (N, C_IN, 5)), jnp.float32) for _ in range(3)
]


class Net(eqx.Module):
    conv: eqx.nn.Conv1d
    bn: eqx_bn.BatchNorm

    def __init__(self, axis_name, key):
        self.conv = eqx.nn.Conv1d(C_IN, C, 3, padding=1, key=key)
        self.bn = eqx_bn.BatchNorm(C, axis_name, momentum=0.9)

    def __call__(self, x, state):
        if self.bn.axis_name is None:  # a whole batch
            return self.bn(jax.vmap(self.conv)(x), state)
        return self.bn(self.conv(x), state)


def make(axis_name="batch"):
    return eqx.nn.make_with_state(Net)(axis_name, jax.random.key(0))


def running(model, state):
    return state.get(model.bn.state_index)


def on_mesh(batches, mesh=None):
    mesh = mesh or jax.make_mesh((_harness.N_DEVICES,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    return [jax.device_put(x, sharding) for x in batches]


def one_device(axis_name="batch", population=False):
    model, state = make(axis_name)
    new = eqx_bn.recalibrate(model, state, BATCHES, population=population)
    return running(model, new)


def sharded_equals_one_device(axis_name, population=False):
    model, state = make(axis_name)
    sharded = on_mesh(BATCHES)
    assert len(sharded[0].sharding.device_set) == _harness.N_DEVICES
    new = eqx_bn.recalibrate(model, state, sharded, population=population)
    tree_close(
        running(model, new),
        one_device(axis_name, population),
        what=f"{axis_name} population={population}",
    )


@check
def check_default_call_sharded_batches():
    """vmap over "batch" under jit; the model and State go where the batch is."""
    sharded_equals_one_device("batch")


@check
def check_whole_batch_model_sharded_batches():
    sharded_equals_one_device(None)


@check
def check_population_sharded_batches():
    sharded_equals_one_device("batch", population=True)


@check
def check_shard_map_apply():
    """An `apply` that runs the model per device under shard_map, the BatchNorm
    reducing over the vmap axis and the mesh axis: the global statistics."""
    mesh = jax.make_mesh((_harness.N_DEVICES,), ("data",))
    model, state = make(("batch", "data"))

    def apply(model, state, x):
        def body(model, state, x):
            return jax.vmap(
                model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
            )(x, state)

        return jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), P("data")),
            out_specs=(P("data"), P()),
            check_vma=False,
        )(model, state, x)

    new = eqx_bn.recalibrate(model, state, on_mesh(BATCHES, mesh), apply=apply)
    tree_close(running(model, new), one_device(), what="shard_map apply")


if __name__ == "__main__":
    _harness.run()

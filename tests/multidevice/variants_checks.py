"""Ghost BatchNorm and Batch Renormalization across devices (issue 24).

Run by `tests/test_multidevice.py` in a subprocess with 8 simulated CPU devices.
Virtual batches follow the examples that `axis_name` names, numbered as
`jax.lax.axis_index(axis_name)` numbers them (row-major over the names, in the
order given): naming the device axis makes virtual batches span devices (strided
over the global batch, as tf_keras's `synchronized=True`), naming only the vmap
axis keeps them on each device (tf_keras's default under a distribution strategy).
Each check compares a distributed training step with the single-device step it
must equal.
"""

import _harness  # first: 8 CPU devices, set before JAX starts
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _harness import check, close, tree_close
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqx_bn

C, L = 3, 4  # channels, spatial length
PER_DEVICE = 4
N = _harness.N_DEVICES * PER_DEVICE
DEVICES = _harness.N_DEVICES

_rng = np.random.default_rng(24)
# An offset per example, so that virtual batches have different statistics.
X = jnp.asarray(
    _rng.normal(0, 2, (N, 1, 1)) + _rng.normal(size=(N, C, L)), dtype=jnp.float32
)
W = jnp.asarray(_rng.normal(size=(1, C, L)), dtype=jnp.float32)  # loss weights
MASK = jnp.asarray(_rng.random(N) < 0.7)
GROUPS = ((0, 2, 4, 6), (1, 3, 5, 7))
RENORM = dict(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5})


def make(axis_name, **kwargs):
    return eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        C, axis_name=axis_name, momentum=0.9, **kwargs
    )


def params_of(bn):
    return (bn.scale, bn.bias)


def step(bn, state, params, x, mask):
    """One training step on a batch vmapped under "batch": output, statistics, and
    the gradients of a weighted sum of the outputs (parameters and input)."""

    def loss(p, x):
        layer = eqx.tree_at(lambda b: (b.scale, b.bias), bn, p)
        y, new_state = jax.vmap(
            lambda xi, mi: layer(xi, state, mask=mi),
            axis_name="batch",
            out_axes=(0, None),
        )(x, mask)
        return jnp.sum(y * W), (y, new_state)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    (dp, dx), (y, new_state) = grad(params, x)
    return {"y": y, "running": new_state.get(bn.state_index), "dp": dp, "dx": dx}


def reference(x, mask=None, **kwargs):
    """The single-device step on the concatenated batch."""
    mask = jnp.ones(x.shape[0], bool) if mask is None else mask
    bn, state = make("batch", **kwargs)
    return jax.jit(lambda p, x, m: step(bn, state, p, x, m))(params_of(bn), x, mask)


def shard_mapped(axis_name, x, mask=None, **kwargs):
    """The step under shard_map over "data" (check_vma=False: vmap inside), the
    parameter gradients summed over devices as under pmap."""
    mesh = jax.make_mesh((DEVICES,), ("data",))
    bn, state = make(axis_name, **kwargs)
    mask = jnp.ones(x.shape[0], bool) if mask is None else mask

    def body(p, state, x, mask):
        out = step(bn, state, p, x, mask)
        out["dp"] = jax.lax.psum(out["dp"], "data")
        return out

    fn = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs={"y": P("data"), "running": P(), "dp": P(), "dx": P("data")},
            check_vma=False,
        )
    )
    sharding = NamedSharding(mesh, P("data"))
    return fn(
        params_of(bn),
        state,
        jax.device_put(x, sharding),
        jax.device_put(mask, sharding),
    )


@check
def check_ghost_spans_devices_when_the_device_axis_is_named():
    """axis_name=("data", "batch"): the global batch, device by device, in virtual
    batches of 8: example i of the concatenated batch in virtual batch i % 4."""
    out = shard_mapped(("data", "batch"), X, virtual_batch_size=8)
    tree_close(out, reference(X, virtual_batch_size=8), what="ghost over devices")


@check
def check_ghost_numbering_follows_the_order_of_the_names():
    """axis_name=("batch", "data") numbers example b of device d as b * 8 + d:
    the same as a single device given the batch in that order."""
    out = shard_mapped(("batch", "data"), X, virtual_batch_size=8)
    order = np.arange(N).reshape(DEVICES, PER_DEVICE).T.reshape(-1)  # b-major
    ref = reference(X[order], virtual_batch_size=8)
    back = np.argsort(order)
    ref = dict(ref, y=ref["y"][back], dx=ref["dx"][back])
    tree_close(out, ref, what="ghost, batch-major numbering")


@check
def check_ghost_stays_on_each_device_when_only_the_vmap_axis_is_named():
    """axis_name="batch" under pmap over "data": each device's 4 examples in
    virtual batches of 2, its statistics (and State) its own."""

    def body(p, state, x, mask):
        return step(bn, state, p, x, mask)

    bn, state = make("batch", virtual_batch_size=2)
    split = X.reshape(DEVICES, PER_DEVICE, C, L)
    masks = jnp.ones((DEVICES, PER_DEVICE), bool)
    out = jax.pmap(body, axis_name="data", in_axes=(None, None, 0, 0))(
        params_of(bn), state, split, masks
    )
    for d in range(DEVICES):
        ref = reference(split[d], virtual_batch_size=2)
        tree_close(jax.tree.map(lambda a: a[d], out), ref, what=f"device {d}")


@check
def check_ghost_with_masks_over_devices():
    """Masked examples leave their virtual batch's statistics, across devices."""
    out = shard_mapped(("data", "batch"), X, MASK, virtual_batch_size=8)
    tree_close(out, reference(X, MASK, virtual_batch_size=8), what="masked ghost")


@check
def check_ghost_with_axis_index_groups():
    """axis_index_groups under pmap: each group of 4 devices (one example each)
    is a batch of its own, in virtual batches of 2 by position in the group."""
    bn, state = make("data", virtual_batch_size=2, axis_index_groups=GROUPS)

    def body(p, state, x):
        layer = eqx.tree_at(lambda b: (b.scale, b.bias), bn, p)
        y, new_state = layer(x, state)
        return y, new_state.get(bn.state_index)

    x = X[:DEVICES]
    y, running = jax.pmap(body, axis_name="data", in_axes=(None, None, 0))(
        params_of(bn), state, x
    )
    for group in GROUPS:
        ref = reference(x[np.asarray(group)], virtual_batch_size=2)
        close(y[np.asarray(group)], ref["y"], what=f"y {group}")
        for d in group:
            tree_close(
                jax.tree.map(lambda a: a[d], running), ref["running"], what=f"{d}"
            )


@check
def check_renorm_over_devices():
    """renorm=True over devices: r, d and the five statistics from the global
    batch, as on one device."""
    out = shard_mapped(("data", "batch"), X, MASK, **RENORM)
    tree_close(out, reference(X, MASK, **RENORM), what="renorm over devices")


@check
def check_ghost_and_renorm_over_devices():
    out = shard_mapped(("data", "batch"), X, virtual_batch_size=8, **RENORM)
    ref = reference(X, virtual_batch_size=8, **RENORM)
    tree_close(out, ref, what="ghost + renorm over devices")


@check
def check_ghost_whole_batch_sharded_by_jit():
    """axis_name=None under jax.jit with the batch sharded over an explicit mesh:
    the virtual batches of the global batch, as on one device."""
    mesh = jax.make_mesh((DEVICES,), ("data",), (AxisType.Explicit,))
    bn, state = make(None, virtual_batch_size=8)

    @jax.jit
    def run(p, state, x):
        def loss(p, x):
            layer = eqx.tree_at(lambda b: (b.scale, b.bias), bn, p)
            y, new_state = layer(x, state)
            return jnp.sum(y * W), (y, new_state.get(bn.state_index))

        (dp, dx), (y, running) = jax.grad(loss, (0, 1), has_aux=True)(p, x)
        return {"y": y, "running": running, "dp": dp, "dx": dx}

    replicated = NamedSharding(mesh, P())
    sharded = run(
        jax.device_put(params_of(bn), replicated),
        jax.device_put(state, replicated),
        jax.device_put(X, NamedSharding(mesh, P("data"))),
    )
    tree_close(sharded, reference(X, virtual_batch_size=8), what="jit-sharded ghost")


if __name__ == "__main__":
    _harness.run()

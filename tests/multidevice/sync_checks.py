"""Synchronised BatchNorm over named axes: shard_map, pmap, vmap inside them, groups.

Run by `tests/test_multidevice.py` in a subprocess with 8 simulated CPU devices.
Every check compares a distributed training step (output, running statistics, loss,
gradients of the parameters and of the input) with the single-device step on the
concatenated batch, or checks the error a misconfiguration gives.
"""

import _harness  # first: 8 CPU devices, set before JAX starts
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _harness import check, close, tree_close
from helpers import channels_last, flax_promotion
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_bn

C, L = 3, 4  # channels, spatial length
PER_DEVICE = 2
N = _harness.N_DEVICES * PER_DEVICE
MOMENTUM = 0.9

_rng = np.random.default_rng(0)
_offset = _rng.uniform(-3, 3, size=(1, C, 1))
X = jnp.asarray(
    _offset + _rng.uniform(0.5, 2, (1, C, 1)) * _rng.normal(size=(N, C, L)),
    dtype=jnp.float32,
)
W = jnp.asarray(_rng.normal(size=(1, C, L)), dtype=jnp.float32)  # loss weights

# Uneven valid counts per device (2 examples x L positions each), at least one.
_valid = np.zeros((N, 1, L), bool)
for d, k in enumerate([8, 1, 3, 5, 2, 7, 4, 6]):
    flat = np.zeros(PER_DEVICE * L, bool)
    flat[_rng.permutation(PER_DEVICE * L)[:k]] = True
    _valid[d * PER_DEVICE : (d + 1) * PER_DEVICE, 0] = flat.reshape(PER_DEVICE, L)
MASK = jnp.asarray(_valid)

GROUPS = ((0, 2, 4, 6), (1, 3, 5, 7))


def make(axis_name, **kwargs):
    return eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        C, axis_name=axis_name, momentum=MOMENTUM, **kwargs
    )


def with_params(bn, params):
    return eqx.tree_at(lambda m: (m.scale, m.bias), bn, params)


def params_of(bn):
    return (bn.scale, bn.bias)


def forward(bn, state, x, mask, vmapped):
    """`x` is a local batch: vmapped under the name "batch", or one example (1, ...)."""
    if vmapped:
        if mask is None:
            return jax.vmap(
                lambda xi: bn(xi, state), axis_name="batch", out_axes=(0, None)
            )(x)
        return jax.vmap(
            lambda xi, mi: bn(xi, state, mask=mi), axis_name="batch", out_axes=(0, None)
        )(x, mask)
    y, state = bn(x[0], state, mask=None if mask is None else mask[0])
    return y[None], state


def step(bn, state, params, x, mask, vmapped):
    """One training step's numbers; the loss is a weighted sum of the outputs."""

    def loss(p, x):
        y, new_state = forward(with_params(bn, p), state, x, mask, vmapped)
        return jnp.sum(y * W), (y, new_state)

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (value, (y, new_state)), (dp, dx) = grad(params, x)
    return {
        "loss": value,
        "y": y,
        "running": new_state.get(bn.state_index),
        "dp": dp,
        "dx": dx,
    }


def reference(x, mask=None):
    """The single-device step on the concatenated batch."""
    bn, state = make("batch")
    return jax.jit(lambda p, x, m: step(bn, state, p, x, m, True))(
        params_of(bn), x, mask
    )


OUT_SPECS = {"loss": P(), "y": P("data"), "running": P(), "dp": P(), "dx": P("data")}


def shard_mapped(axis_name, vmapped, check_vma, mesh=None, groups=None):
    """The step under shard_map; gradients reduced as the VMA mode requires.

    With `check_vma=True` the gradient of replicated parameters is already the
    sum over devices (the transpose of the implicit broadcast is a psum); with
    `check_vma=False` it is per device, as under pmap, and summed here.
    """
    mesh = mesh or jax.make_mesh((_harness.N_DEVICES,), ("data",))
    axes = mesh.axis_names
    bn, state = make(axis_name, axis_index_groups=groups)

    def body(p, state, x, mask):
        out = step(bn, state, p, x, mask, vmapped)
        out["loss"] = jax.lax.psum(out["loss"], axes)
        if not check_vma:
            out["dp"] = jax.lax.psum(out["dp"], axes)
        return out

    data = P(axes)
    specs = {k: (data if v == P("data") else v) for k, v in OUT_SPECS.items()}
    fn = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), data, data),
            out_specs=specs,
            check_vma=check_vma,
        )
    )
    sharding = NamedSharding(mesh, data)

    def call(x, mask=None):
        x = jax.device_put(x, sharding)
        mask = None if mask is None else jax.device_put(mask, sharding)
        return fn(params_of(bn), state, x, mask)

    return call


def pmapped(axis_name, vmapped):
    bn, state = make(axis_name)

    def body(p, state, x, mask):
        out = step(bn, state, p, x, mask, vmapped)
        out["loss"] = jax.lax.psum(out["loss"], "data")
        out["dp"] = jax.lax.psum(out["dp"], "data")
        return out

    fn = jax.pmap(body, axis_name="data", in_axes=(None, None, 0, 0))

    def call(x, mask=None):
        split = lambda a: a.reshape(_harness.N_DEVICES, -1, *a.shape[1:])  # noqa: E731
        out = fn(params_of(bn), state, split(x), None if mask is None else split(mask))
        first = lambda t: jax.tree.map(lambda a: a[0], t)  # noqa: E731
        merge = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
        return {
            "loss": out["loss"][0],
            "y": merge(out["y"]),
            "running": first(out["running"]),
            "dp": first(out["dp"]),
            "dx": merge(out["dx"]),
        }

    return call


# -- global statistics over named axes ------------------------------------------------


@check
def check_shard_map_vmap_inside():
    """`axis_name=("batch", "data")`: vmap "batch" inside shard_map over "data"."""
    out = shard_mapped(("batch", "data"), vmapped=True, check_vma=False)(X)
    tree_close(out, reference(X), what="shard_map(vmap)")


@check
def check_shard_map_mesh_axis_check_vma():
    """One example per device, `axis_name="data"`, default check_vma=True.

    The custom_jvp of the fused path and the replicated parameters pass JAX's
    varying-manual-axes checks; the parameter gradients come out summed.
    """
    x = X[: _harness.N_DEVICES]
    out = shard_mapped("data", vmapped=False, check_vma=True)(x)
    tree_close(out, reference(x), what="check_vma=True")


@check
def check_shard_map_two_mesh_axes():
    """A 4x2 mesh, the batch split over both axes, `axis_name=("data", "model")`."""
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    x = X[: _harness.N_DEVICES]
    out = shard_mapped(("data", "model"), vmapped=False, check_vma=True, mesh=mesh)(x)
    tree_close(out, reference(x), what="2d mesh")


@check
def check_pmap_vmap_inside():
    out = pmapped(("batch", "data"), vmapped=True)(X)
    tree_close(out, reference(X), what="pmap(vmap)")


@check
def check_vmap_inside_shard_map_check_vma():
    """jax 0.10 cannot collect over a vmap axis under shard_map(check_vma=True).

    The layer says so and names the fix; should a JAX release lift the
    limitation, the numbers must then be the global batch's.
    """
    try:
        out = shard_mapped(("batch", "data"), vmapped=True, check_vma=True)(X)
    except ValueError as err:
        msg = str(err)
        assert "'batch'" in msg and "check_vma=False" in msg, msg
        return
    tree_close(out, reference(X), what="shard_map(vmap), check_vma=True")


# -- masks: exact global statistics, unlike Flax's mean of per-device means ----------


def flax_distributed(mask, use_pmap=False):
    """flax.linen.BatchNorm(axis_name="data") on each device's local batch.

    Under shard_map (default check_vma=True), or pmap. Returns the output (whole
    batch, channels last) and the new running statistics.
    """
    model = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, axis_name="data")
    variables = {
        "params": {"scale": jnp.ones(C), "bias": jnp.zeros(C)},
        "batch_stats": {"mean": jnp.zeros(C), "var": jnp.ones(C)},
    }

    def body(variables, x, mask):
        with flax_promotion():
            y, updates = model.apply(variables, x, mask=mask, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    x = channels_last(X)
    m = None if mask is None else channels_last(mask)
    if use_pmap:
        split = lambda a: a.reshape(_harness.N_DEVICES, PER_DEVICE, *a.shape[1:])  # noqa: E731
        fn = jax.pmap(body, axis_name="data", in_axes=(None, 0, 0))
        y, stats = fn(variables, split(x), None if m is None else split(m))
        return y.reshape(x.shape), jax.tree.map(lambda a: a[0], stats)
    mesh = jax.make_mesh((_harness.N_DEVICES,), ("data",))
    fn = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=(P("data"), P()),
        )
    )
    sharding = NamedSharding(mesh, P("data"))
    m = None if m is None else jax.device_put(m, sharding)
    return fn(variables, jax.device_put(x, sharding), m)


def per_device_mean_of_means(mask):
    """What Flax computes: the average over devices of each device's masked moments."""
    x = np.asarray(X, np.float64).reshape(_harness.N_DEVICES, PER_DEVICE, C, L)
    m = np.broadcast_to(
        np.asarray(mask).reshape(_harness.N_DEVICES, PER_DEVICE, 1, L), x.shape
    )
    count = m.sum(axis=(1, 3))
    mean = np.mean((x * m).sum(axis=(1, 3)) / count, axis=0)
    mean2 = np.mean((x * x * m).sum(axis=(1, 3)) / count, axis=0)
    return mean, mean2 - mean * mean


@check
def check_masks_uneven_counts_exact():
    """Uneven valid counts per device: our statistics are the global batch's."""
    ref = reference(X, MASK)
    tree_close(
        shard_mapped(("batch", "data"), True, check_vma=False)(X, MASK),
        ref,
        what="shard_map",
    )
    tree_close(pmapped(("batch", "data"), True)(X, MASK), ref, what="pmap")


@check
def check_flax_matches_without_mask():
    """Equal shards, no mask: Flax's synchronised BatchNorm and ours agree."""
    ref = reference(X)
    for use_pmap in (False, True):
        y, stats = flax_distributed(None, use_pmap)
        what = "pmap" if use_pmap else "shard_map"
        close(y, channels_last(ref["y"]), what=f"y, {what}")
        close(stats["mean"], ref["running"].mean, what=f"running mean, {what}")
        close(stats["var"], ref["running"].var, what=f"running var, {what}")


@check
def check_flax_averages_device_means_with_mask():
    """With uneven masks Flax's statistics are the mean of per-device means.

    They differ from the global batch's, which ours are (previous checks).
    """
    mean, var = per_device_mean_of_means(MASK)
    ours = reference(X, MASK)["running"]
    for use_pmap in (False, True):
        _, stats = flax_distributed(MASK, use_pmap)
        what = "pmap" if use_pmap else "shard_map"
        close(stats["mean"], (1 - MOMENTUM) * mean, what=f"flax running mean, {what}")
        close(
            stats["var"],
            MOMENTUM + (1 - MOMENTUM) * var,
            what=f"flax running var, {what}",
        )
        gap = float(jnp.max(jnp.abs(stats["mean"] - ours.mean)))
        assert gap > 1e-3, f"Flax and global statistics should differ, gap {gap}"


# -- axis_index_groups ---------------------------------------------------------------


def group_references(x):
    """Per group: the single-device step on that group's examples (one per device)."""
    return [reference(x[np.asarray(g)]) for g in GROUPS]


def check_groups(out, x):
    """`out` has per-device leading axes: y, dx (8, ...), running (8, C), dp (8, C)."""
    out = jax.tree.map(np.asarray, out)  # gathers across shards: on the host
    for group, ref in zip(GROUPS, group_references(x)):
        g = np.asarray(group)
        close(out["y"][g], ref["y"], what=f"y {group}")
        close(out["dx"][g], ref["dx"], what=f"dx {group}")
        for d in group:
            tree_close(
                jax.tree.map(lambda a: a[d], out["running"]),
                ref["running"],
                what=f"running, device {d}",
            )
            tree_close(
                jax.tree.map(lambda a: a[d], out["dp"]),
                ref["dp"],
                what=f"dp, device {d}",
            )


def grouped_body(bn):
    def body(p, state, x):
        out = step(bn, state, p, x, None, False)
        out["dp"] = jax.lax.psum(out["dp"], "data", axis_index_groups=GROUPS)
        del out["loss"]
        return out

    return body


def stacked(tree):
    return jax.tree.map(lambda a: jnp.stack([a] * _harness.N_DEVICES), tree)


@check
def check_groups_pmap():
    """Each group's statistics are its own; the state is per device (in_axes=0)."""
    bn, state = make("data", axis_index_groups=GROUPS)
    x = X[: _harness.N_DEVICES, None]
    out = jax.pmap(grouped_body(bn), axis_name="data", in_axes=(None, 0, 0))(
        params_of(bn), stacked(state), x
    )
    out = dict(out, y=out["y"][:, 0], dx=out["dx"][:, 0])
    check_groups(out, X[: _harness.N_DEVICES])


@check
def check_groups_shard_map():
    bn, state = make("data", axis_index_groups=GROUPS)
    mesh = jax.make_mesh((_harness.N_DEVICES,), ("data",))
    body = grouped_body(bn)

    def per_device(p, state, x):
        out = body(p, jax.tree.map(lambda a: a[0], state), x)
        return jax.tree.map(lambda a: a[None], out)

    fn = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=P("data"),
            check_vma=False,
        )
    )
    sharding = NamedSharding(mesh, P("data"))
    x = jax.device_put(X[: _harness.N_DEVICES], sharding)
    out = fn(params_of(bn), jax.device_put(stacked(state), sharding), x)
    out = dict(out, y=out["y"][:, 0], dx=out["dx"][:, 0])
    check_groups(out, X[: _harness.N_DEVICES])


@check
def check_groups_errors():
    """Groups over a vmap axis, or under check_vma=True: a ValueError naming pmap."""
    bn, state = make("batch", axis_index_groups=((0, 1), (2, 3)))
    try:
        jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            X[:4], state
        )
    except ValueError as err:
        assert "pmap" in str(err) and "'batch'" in str(err), str(err)
    else:
        raise AssertionError("groups under vmap should raise")
    try:
        shard_mapped("data", False, check_vma=True, groups=GROUPS)(X[:8])
    except ValueError as err:
        assert "check_vma" in str(err) and "pmap" in str(err), str(err)
    else:
        raise AssertionError("groups under shard_map(check_vma=True) should raise")


@check
def check_unbiased_one_element_per_group_errors():
    """unbiased_running_var counts one group's elements, not the whole axis's: one
    element per channel in each group is refused, as PyTorch refuses it (a
    regression: the whole axis was counted and the variance silently kept)."""
    singles = tuple((d,) for d in range(_harness.N_DEVICES))
    bn, state = make("data", axis_index_groups=singles, unbiased_running_var=True)
    x = X[: _harness.N_DEVICES, :, :1]  # one element per channel per device
    try:
        jax.pmap(lambda s, x: bn(x, s), axis_name="data", in_axes=(0, 0))(
            stacked(state), x
        )
    except ValueError as err:
        assert "expected more than 1 value per channel" in str(err), str(err)
    else:
        raise AssertionError("one element per group should raise")


# -- axis names that are not bound ----------------------------------------------------


def expect_unbound(fn, name):
    try:
        fn()
    except ValueError as err:
        msg = str(err)
        assert f"{name!r} is not bound" in msg, msg
    else:
        raise AssertionError(f"{name!r} unbound should raise")


@check
def check_unbound_axis_errors():
    """A layer built for ("batch", "data") where only one of them is bound."""
    # shard_map binds "data", nothing binds "batch" (no vmap).
    expect_unbound(
        lambda: shard_mapped(("batch", "data"), vmapped=False, check_vma=True)(X[:8]),
        "batch",
    )
    # pmap binds "data", no vmap.
    expect_unbound(lambda: pmapped(("batch", "data"), vmapped=False)(X[:8]), "batch")
    # vmap binds "batch", no shard_map / pmap binds "data".
    bn, state = make(("batch", "data"))
    expect_unbound(
        lambda: jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            X, state
        ),
        "data",
    )


if __name__ == "__main__":
    _harness.run()

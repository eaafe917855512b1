"""Data-parallel training with synchronised BatchNorm, two ways, on 8 simulated CPUs.

The same model trains on a batch split over a device mesh, and each step equals the
step on one device with the whole batch: BatchNorm's statistics are the global
batch's. Two styles, both JAX's own sharding:

1. `jax.jit` + `NamedSharding` (recommended): the layer has `axis_name=None` and
   sees the whole batch; XLA splits the work over the mesh and adds the all-reduces.
   The code is the single-device code; only where the arrays live changes.
2. `jax.shard_map` + `axis_name`: you write the per-device program; the layer is
   built with `axis_name=("batch", "data")` and called under
   `jax.vmap(..., axis_name="batch")` inside a shard_map over the mesh axis "data".

Run: `python examples/data_parallel.py [--smoke] [--steps N] [--devices=N]
[--out DIR]`; the losses and differences go to `DIR/data_parallel.json` (default
`./outputs`). On a machine with several GPUs, the same code uses them (the CPU
flag set below only affects CPUs).
"""

import json
import os
import pathlib
import sys

if __name__ == "__main__":  # before JAX starts: simulated CPU devices
    _n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_n}"
    )

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import Progress, parser, runtime  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import eqx_bn  # noqa: E402

IN_CHANNELS, CHANNELS, LENGTH = 2, 8, 16


class Net(eqx.Module):
    """Conv1d -> BatchNorm -> relu -> average -> Linear: a batch `(N, 2, 16)` -> `(N,)`.

    The BatchNorm's `axis_name` decides the calling convention: `None` takes the
    whole batch, a name (or tuple of names) one example under `jax.vmap`.
    """

    conv: eqx.nn.Conv1d
    bn: eqx_bn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, axis_name, *, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv1d(IN_CHANNELS, CHANNELS, 3, padding=1, key=k1)
        self.bn = eqx_bn.BatchNorm(CHANNELS, axis_name=axis_name, momentum=0.9)
        self.head = eqx.nn.Linear(CHANNELS, "scalar", key=k2)

    def _features(self, h):
        return self.head(jnp.mean(jax.nn.relu(h), axis=-1))

    def __call__(self, x, state):
        if self.bn.axis_name is None:
            h, state = self.bn(jax.vmap(self.conv)(x), state)
            return jax.vmap(self._features)(h), state

        def one(xi, state):
            h, state = self.bn(self.conv(xi), state)
            return self._features(h), state

        return jax.vmap(one, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            x, state
        )


OPTIM = optax.sgd(0.05, momentum=0.9)


def local_step(params, static, state, opt_state, x, y, n_total, reduce):
    """One SGD step. `reduce` sums over devices (shard_map style) or does nothing."""

    def loss_fn(params):
        pred, new_state = eqx.combine(params, static)(x, state)
        return jnp.sum((pred - y) ** 2) / n_total, new_state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    loss, grads = reduce((loss, grads))
    updates, opt_state = OPTIM.update(grads, opt_state, params)
    return eqx.apply_updates(params, updates), state, opt_state, loss


def data(n, seed):
    """A toy regression: the target depends on the channel means of the input."""
    rng = np.random.default_rng(seed)
    x = 3.0 + 2.0 * rng.normal(size=(n, IN_CHANNELS, LENGTH))
    y = np.tanh(x[:, 0].mean(-1) - x[:, 1].mean(-1) - 0.5 * x[:, 0, :4].mean(-1))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def train(axis_name, steps, batches, step_fn, place, progress):
    """Trains from the same initialisation; returns losses, parameters, statistics.

    One epoch is one pass over `batches`."""
    model, state = eqx.nn.make_with_state(Net)(axis_name, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    params, state, opt_state = place((params, state, OPTIM.init(params)))
    step = step_fn(static)  # one jitted function: compiled once, on the first call
    losses = []
    epochs = -(-steps // len(batches))
    for i in range(steps):
        x, y = batches[i % len(batches)]
        params, state, opt_state, loss = step(params, state, opt_state, x, y)
        losses.append(float(loss))
        progress.step()
        if (i + 1) % len(batches) == 0 or i + 1 == steps:
            progress.epoch(-(-(i + 1) // len(batches)), epochs, loss=losses[-1])
    return {
        "loss": np.asarray(losses),
        "params": params,
        "running": state.get(model.bn.state_index),
    }


def single_device(axis_name, n_total):
    def make(static):
        return jax.jit(
            lambda p, s, o, x, y: local_step(
                p, static, s, o, x, y, n_total, lambda t: t
            )
        )

    return make


def jit_named_sharding(mesh, n_total):
    """Style 1: the single-device step, jitted; the data decide the parallelism."""
    return single_device(None, n_total)


def shard_map_axis_name(mesh, n_total):
    """Style 2: the per-device program, with the sums over devices written out.

    `check_vma=False`: in jax 0.10 collectives over a vmap axis ("batch") are not
    supported under shard_map's default `check_vma=True`. Without it the
    gradients are per device, as under pmap, so they are summed with `psum`.
    """

    def make(static):
        def step(p, s, o, x, y):
            return local_step(
                p, static, s, o, x, y, n_total, lambda t: jax.lax.psum(t, "data")
            )

        return jax.jit(
            jax.shard_map(
                step,
                mesh=mesh,
                in_specs=(P(), P(), P(), P("data"), P("data")),
                out_specs=P(),
                check_vma=False,
            )
        )

    return make


def max_difference(a, b):
    """Largest elementwise difference over all arrays (the models' configurations
    differ in `axis_name`, so leaves are compared, not trees)."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in pairs)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    with runtime("data_parallel") as timing:
        out = run(args)
    return out | {"wall_s": timing["seconds"]}


def _parser():
    result = parser(__doc__, out_help="the losses and differences (data_parallel.json)")
    result.add_argument(
        "--steps",
        type=int,
        default=50,
        help="training steps (default: %(default)s; 2 with --smoke)",
    )
    result.add_argument(
        "--devices",
        type=int,
        default=8,
        help="devices in the mesh (default: %(default)s); on the CPU this many are "
        "simulated. Write it --devices=N: it is read before JAX starts",
    )
    result.add_argument(
        "--per-device",
        type=int,
        default=4,
        help="examples per device in each batch (default: %(default)s)",
    )
    return result


def run(args) -> dict:
    steps = 2 if args.smoke else args.steps
    devices = jax.devices()[: args.devices]
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    n_total = len(devices) * args.per_device
    batches = [data(n_total, seed) for seed in range(4)]
    on_mesh = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    sharded_batches = [jax.device_put(b, on_mesh) for b in batches]
    print(f"{len(devices)} devices ({devices[0].platform}), global batch {n_total}")

    styles = {
        "jit + NamedSharding, axis_name=None": (None, jit_named_sharding),
        'shard_map + axis_name=("batch", "data")': (
            ("batch", "data"),
            shard_map_axis_name,
        ),
    }
    all_equal, results = True, {}
    for name, (axis_name, style) in styles.items():
        print(f"{name}, on the mesh:")
        with Progress(steps, name) as progress:
            parallel = train(
                axis_name,
                steps,
                sharded_batches,
                style(mesh, n_total),
                # On an explicit mesh (jax.make_mesh's default) the model, its state
                # and the optimiser state live on the mesh too, replicated.
                lambda tree: eqx.filter_shard(tree, replicated),
                progress,
            )
        reference_axis = None if axis_name is None else "batch"
        print("the same on one device, with the whole batch:")
        with Progress(steps, "one device") as progress:
            single = train(
                reference_axis,
                steps,
                batches,
                single_device(reference_axis, n_total),
                lambda tree: tree,
                progress,
            )
        diff = max_difference(parallel, single)
        scale = max(max(float(np.max(np.abs(v))) for v in jax.tree.leaves(single)), 1.0)
        equal = diff <= 1e-5 * scale
        all_equal &= equal
        results[name] = dict(
            loss=parallel["loss"].tolist(), max_difference=diff, equal=bool(equal)
        )
        print(
            f"{name}: loss {parallel['loss'][0]:.4f} -> {parallel['loss'][-1]:.4f} "
            f"in {steps} steps; equal to the single-device step: {equal} "
            f"(max difference {diff:.2e})"
        )
    path = pathlib.Path(args.out) / "data_parallel.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(devices=len(devices), styles=results), indent=1))
    print(f"results: {path}")
    if not all_equal:
        raise SystemExit("data-parallel and single-device steps differ")
    return dict(devices=len(devices), steps=steps, styles=results)


if __name__ == "__main__":
    main(sys.argv[1:])

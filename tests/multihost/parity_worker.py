"""One process of the multi-process parity check in `tests/test_multihost.py`.

    python tests/multihost/parity_worker.py COORDINATOR PROCESS_ID DATA.npz OUT_DIR

The test starts two of these (each with 2 simulated CPUs, set in its environment),
after writing every process's shard of every global batch to `DATA.npz`; each
process reads only its own shards. The processes train `examples/multihost.py`'s
CNN for a few steps in both styles with that example's own functions, then write
what the test compares with a single-process run: the losses, the parameters and
running statistics, the training-mode outputs and State of one more global batch,
and the gathered global batch (to check the processes' order in it). Process 0
also writes a checkpoint of the jit style, with the example's `save_once`, and
counts the all-reduces in each compiled step.
"""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))


def load_example():
    spec = importlib.util.spec_from_file_location(
        "multihost_example", ROOT / "examples" / "multihost.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_optimizer():
    """SGD with momentum, not the example's Adam: Adam divides each gradient by its
    own running magnitude, so where a gradient is close to zero a rounding-level
    difference in it (sums over devices add in another order) becomes a visible
    difference in the update (seen with Adam: a first-step gradient of -1.1e-7,
    where the median is 8e-3, moved one weight by 1e-5 more on one side than on
    the other). SGD's update is linear in the gradient and keeps the
    rounding-level agreement that the test checks."""
    import optax

    return optax.sgd(0.05, momentum=0.9)


def make_forward(style, static, mesh):
    """The training-mode forward pass of one style: `(params, state, x) ->
    (logits, state)`, `x` and the logits split over the mesh axis "data"."""
    import equinox as eqx
    import jax
    from jax.sharding import PartitionSpec as P

    def forward(params, state, x):
        return eqx.combine(params, static)(x, state)

    if style == "jit":
        return jax.jit(forward)
    return jax.jit(
        jax.shard_map(
            forward,
            mesh=mesh,
            in_specs=(P(), P(), P("data")),
            out_specs=(P("data"), P()),
            check_vma=False,
        )
    )


def main(coordinator, process_id, data_path, out_dir):
    example = load_example()
    args = example.parse(
        [
            "--coordinator",
            coordinator,
            "--num-processes",
            "2",
            "--process-id",
            process_id,
            "--init-timeout",
            "60",
            "--heartbeat-timeout",
            "10",
            "--shutdown-timeout",
            "20",
        ]
    )
    example.initialize(args)

    import equinox as eqx
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    assert jax.process_count() == 2 and jax.local_device_count() == 2, jax.devices()
    me = jax.process_index()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    data = np.load(data_path)
    steps, n_total = int(data["steps"]), int(data["n_total"])

    def batch(i):  # this process's shard only (npz members load one at a time)
        x, y = data[f"x{i}_p{me}"], data[f"y{i}_p{me}"]
        return example.global_batch(split, x, y)

    out = {}
    for style, axis_name in example.STYLES.items():
        model, state = example.make_model(axis_name)
        params, static = eqx.partition(model, eqx.is_array)
        optimizer = make_optimizer()
        params, state, opt_state = eqx.filter_shard(
            (params, state, optimizer.init(params)), replicated
        )
        step = example.make_step(style, static, optimizer, mesh, n_total)
        losses = []
        if me == 0:  # compiled locally: no collective, process 0 alone
            out[f"{style}/all_reduces"] = np.asarray(
                example.hlo_all_reduces(step, params, state, opt_state, *batch(0))
            )
        for i in range(steps):
            params, state, opt_state, loss = step(params, state, opt_state, *batch(i))
            losses.append(float(loss))
        x, _ = batch(steps)
        logits, next_state = make_forward(style, static, mesh)(params, state, x)
        out[f"{style}/loss"] = np.asarray(losses)
        out[f"{style}/logits"] = multihost_utils.process_allgather(logits, tiled=True)
        out[f"{style}/x"] = multihost_utils.process_allgather(x, tiled=True)
        for what, tree in (
            ("params", params),
            ("state", state),
            ("next_state", next_state),
        ):
            for j, leaf in enumerate(jax.tree.leaves(tree)):
                out[f"{style}/{what}/{j}"] = np.asarray(leaf)
        if style == "jit":
            example.save_once(
                pathlib.Path(out_dir) / "checkpoint.eqx",
                (eqx.combine(params, static), state),
            )
    np.savez(pathlib.Path(out_dir) / f"process_{me}.npz", **out)
    print(f"process {me}: done", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Multi-process (multi-host) data-parallel training with synchronised BatchNorm.

JAX's multi-controller runtime: one process per host, `jax.distributed.initialize`,
one global mesh over every process's devices, and each process feeding only its
own part of every global batch. BatchNorm normalises with the statistics of the
whole global batch, in both of JAX's styles:

1. `jax.jit` + `NamedSharding`: the layers have `axis_name=None`, the code is the
   single-device code, and XLA adds the all-reduces.
2. `jax.shard_map` + named axes: the layers have `axis_name=("batch", "data")`
   and the per-device program sums the gradients with `psum`.

Run it on one machine (it launches the processes, each with simulated CPUs):

    python examples/multihost.py                  # 2 processes x 2 CPU devices
    python examples/multihost.py --processes 4 --local-devices 1
    python examples/multihost.py --smoke          # a few steps (what the tests run)
    python examples/multihost.py --time-allreduce # also time BatchNorm's all-reduce

or as one process of a real cluster, the same command on every host:

    python examples/multihost.py --coordinator 10.0.0.1:1234 \\
        --num-processes 8 --process-id $RANK
    python examples/multihost.py --cluster   # all three as JAX finds them:
        # JAX_COORDINATOR_ADDRESS, Slurm, Open MPI, Kubernetes, Cloud TPU

A process that dies or never joins makes the others stop with JAX's error after
`--heartbeat-timeout` or `--init-timeout` seconds instead of hanging. Process 0
writes the checkpoints (once, for all processes) under `--out`; the launcher then
loads them on its single CPU and checks the held-out accuracy.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_bn

STYLES = {"jit": None, "shard_map": ("batch", "data")}
"""Each style's BatchNorm `axis_name`."""

PARENT_ENV = "EQX_BN_MULTIHOST_PARENT"
LOOPBACK = ("127.0.0.1", "localhost")


class CNN(eqx.Module):
    """conv-BN-relu, strided conv-BN-relu, dense-BN-relu, dense: a batch of digits
    `(N, 1, 8, 8)` -> logits `(N, 10)`.

    With `axis_name=None` the BatchNorms see the whole batch; with a name (or tuple
    of names) they see one example, under `jax.vmap(..., axis_name="batch")`.
    """

    conv1: eqx.nn.Conv2d
    norm1: eqx_bn.BatchNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx_bn.BatchNorm
    dense1: eqx.nn.Linear
    norm3: eqx_bn.BatchNorm
    dense2: eqx.nn.Linear

    def __init__(self, axis_name, *, key, width=8):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        # No bias before a BatchNorm: it would be subtracted right away.
        self.conv1 = eqx.nn.Conv2d(1, width, 3, padding=1, use_bias=False, key=k1)
        self.norm1 = eqx_bn.BatchNorm(width, axis_name=axis_name, momentum=0.9)
        self.conv2 = eqx.nn.Conv2d(
            width, 2 * width, 3, stride=2, padding=1, use_bias=False, key=k2
        )
        self.norm2 = eqx_bn.BatchNorm(2 * width, axis_name=axis_name, momentum=0.9)
        self.dense1 = eqx.nn.Linear(2 * width * 16, 64, use_bias=False, key=k3)
        self.norm3 = eqx_bn.BatchNorm(64, axis_name=axis_name, momentum=0.9)
        self.dense2 = eqx.nn.Linear(64, 10, key=k4)

    def _layers(self, x, state, each):
        x, state = self.norm1(each(self.conv1)(x), state)
        x, state = self.norm2(each(self.conv2)(jax.nn.relu(x)), state)
        x = each(lambda h: self.dense1(jax.nn.relu(h).reshape(-1)))(x)
        x, state = self.norm3(x, state)
        return each(self.dense2)(jax.nn.relu(x)), state

    def __call__(self, x, state):
        if self.norm1.axis_name is None:
            return self._layers(x, state, jax.vmap)
        return jax.vmap(
            lambda xi, s: self._layers(xi, s, lambda f: f),
            axis_name="batch",
            in_axes=(0, None),
            out_axes=(0, None),
        )(x, state)


def make_model(axis_name, seed=0):
    """The model and its State; the same initial values for every `axis_name`."""
    return eqx.nn.make_with_state(CNN)(axis_name, key=jax.random.key(seed))


def with_leaves(like, tree):
    """`tree`'s arrays in `like`'s structure: models that differ only in their
    BatchNorms' `axis_name` (configuration, not arrays) share their arrays."""
    return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(tree))


def make_optimizer(steps, learning_rate=3e-3):
    return optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))


def make_step(style, static, optimizer, mesh, n_total):
    """The jitted training step `(params, state, opt_state, x, y) -> (params, state,
    opt_state, loss)` of one style; `x`, `y` are global batches split over the
    mesh axis "data", everything else replicated."""

    def step(params, state, opt_state, x, y, reduce):
        def loss_fn(params):
            logits, new_state = eqx.combine(params, static)(x, state)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(losses) / n_total, new_state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        loss, grads = reduce((loss, grads))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), state, opt_state, loss

    if style == "jit":
        return jax.jit(lambda p, s, o, x, y: step(p, s, o, x, y, lambda t: t))
    # check_vma=False: jax 0.10 has no collectives over a vmap axis ("batch")
    # under shard_map's default check; gradients are then per device, and summed.
    return jax.jit(
        jax.shard_map(
            lambda p, s, o, x, y: step(
                p, s, o, x, y, lambda t: jax.lax.psum(t, "data")
            ),
            mesh=mesh,
            in_specs=(P(), P(), P(), P("data"), P("data")),
            out_specs=P(),
            check_vma=False,
        )
    )


@eqx.filter_jit
def count_correct(model, state, x, y):
    """Correct predictions of the model in inference mode (running averages)."""
    logits, _ = eqx.nn.inference_mode(model)(x, state)
    return jnp.sum(jnp.argmax(logits, axis=-1) == y)


def load_data(smoke):
    """Digits as `(N, 1, 8, 8)` float32 in [0, 1]: 1437 training, 360 held out."""
    return _common.digits(256 if smoke else None, channels="first")


def epoch_batches(n, batch, rng):
    """One epoch of global batches, as index arrays: the same on every process,
    since every process draws them from the same seed."""
    order = rng.permutation(n)
    return [order[i * batch : (i + 1) * batch] for i in range(n // batch)]


def process_rows(rows):
    """This process's part of a global batch: its own contiguous slice. The mesh
    lists the devices process by process, so the global batch is the processes'
    slices in process order. With a real data set, read only these rows."""
    share = len(rows) // jax.process_count()
    start = jax.process_index() * share
    return rows[start : start + share]


def global_batch(sharding, *local_arrays):
    """Global arrays `(B, ...)` split over the mesh, each process giving its rows."""
    return tuple(
        jax.make_array_from_process_local_data(sharding, a) for a in local_arrays
    )


def log(message):
    """A line on stderr with the process's place in the job (before and after
    `jax.distributed.initialize`)."""
    print(f"[multihost {message}", file=sys.stderr, flush=True)


def exit_with_parent():
    """A local launch's worker stops when its launcher is gone (killed, not just
    failed): a worker left behind would wait for the others until a timeout."""
    parent = int(os.environ.get(PARENT_ENV, "0"))
    if not parent:
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def initialize(args):
    """`jax.distributed.initialize` with the timeouts that turn a lost process into
    an error: `--init-timeout` for a process that never joins, `--heartbeat-timeout`
    for one that stops later. Missing values come from the environment, as JAX
    reads them (JAX_COORDINATOR_ADDRESS; Slurm, Open MPI, ... for all three)."""
    # Collectives between CPU processes (ignored by GPUs and TPUs). Set before the
    # first computation.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "the cluster")
    me = "?" if args.process_id is None else args.process_id
    of = "?" if args.num_processes is None else args.num_processes
    log(
        f"process {me}/{of}] joining {where} "
        f"(init timeout {args.init_timeout} s, heartbeat timeout "
        f"{args.heartbeat_timeout} s)"
    )
    # A local job's coordinator listens on the loopback interface only (JAX's
    # default is every interface).
    local = args.coordinator and args.coordinator.rsplit(":", 1)[0] in LOOPBACK
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        coordinator_bind_address=args.coordinator if local else None,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=args.init_timeout,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
        shutdown_timeout_seconds=args.shutdown_timeout,
    )


def train_style(style, args, mesh, data, steps_per_epoch, epochs):
    """Trains one style from the same initialisation; returns its numbers and
    writes its checkpoint (process 0)."""
    x_train, y_train, x_test, y_test = data
    n_total = args.batch
    split = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    model, state = make_model(STYLES[style], args.seed)
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = make_optimizer(steps_per_epoch * epochs)
    # Every process builds the same values; on the mesh they become one global,
    # replicated copy.
    params, state, opt_state = eqx.filter_shard(
        (params, state, optimizer.init(params)), replicated
    )
    step = make_step(style, static, optimizer, mesh, n_total)

    # Evaluation: each process gives its part of the held-out set too.
    usable = len(x_test) - len(x_test) % jax.device_count()
    test_rows = process_rows(np.arange(usable))
    test_batch = global_batch(split, x_test[test_rows], y_test[test_rows])
    # The structure of the axis_name=None model, to evaluate with (traced only).
    eval_model = eqx.filter_eval_shape(make_model, None)[0]

    rng = np.random.default_rng(args.seed)
    is_main = jax.process_index() == 0
    if is_main:
        print(f"{style}: BatchNorm axis_name={STYLES[style]!r}", flush=True)
    losses = []
    with _common.Progress(steps_per_epoch * epochs, style) as progress:
        for epoch in range(epochs):
            for rows in epoch_batches(len(x_train), n_total, rng)[:steps_per_epoch]:
                mine = process_rows(rows)
                x, y = global_batch(split, x_train[mine], y_train[mine])
                params, state, opt_state, loss = step(params, state, opt_state, x, y)
                losses.append(float(loss))  # replicated: every process has it
                if is_main:
                    progress.step()
            trained = with_leaves(eval_model, eqx.combine(params, static))
            correct = int(count_correct(trained, state, *test_batch))
            if is_main:
                progress.epoch(
                    epoch + 1, epochs, loss=losses[-1], test_acc=correct / usable
                )

    checkpoint = pathlib.Path(args.out) / f"multihost_{style}.eqx"
    save_once(checkpoint, (trained, state))
    return {
        "losses": losses,
        "test_acc": correct / usable,
        "test_correct": correct,
        "test_images": usable,
        "checkpoint": str(checkpoint),
        "step": step,
        "trained": (params, state, opt_state),
    }


def save_once(path, tree):
    """Process 0 writes `tree` (replicated, so it holds every value); the others
    wait for it, so that no process runs ahead of a checkpoint that may fail."""
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        eqx.tree_serialise_leaves(partial, tree)
        os.replace(partial, path)  # a reader never sees half a file
    multihost_utils.sync_global_devices(f"checkpoint {path.name}")


def load_checkpoint(path):
    """Loads a checkpoint on one machine: the `axis_name=None` model and its State.
    The model is only traced (`filter_eval_shape`): the file gives every value."""
    like = eqx.filter_eval_shape(make_model, None)
    return eqx.tree_deserialise_leaves(path, like)


def hlo_all_reduces(jitted, *args):
    """The number of all-reduce operations in the compiled (optimised) program."""
    text = jitted.lower(*args).compile().as_text()
    return sum(text.count(op) for op in (" all-reduce(", " all-reduce-start("))


def time_allreduce(results, args, mesh, data):
    """Times the shard_map step with global statistics (`axis_name=("batch",
    "data")`, one all-reduce per BatchNorm and pass) against the same step with
    per-device statistics (`axis_name="batch"`), interleaved, median of repeats.
    Both still all-reduce the gradients; the difference is BatchNorm's share."""
    x_train, y_train = data[0], data[1]
    split = NamedSharding(mesh, P("data"))
    rows = process_rows(np.arange(args.batch))
    x, y = global_batch(split, x_train[rows], y_train[rows])
    params, state, opt_state = results["shard_map"]["trained"]
    optimizer = make_optimizer(100)
    steps, counts = {}, {}
    for name, axis_name in (("global", ("batch", "data")), ("per-device", "batch")):
        model, _ = make_model(axis_name, args.seed)
        p, static = eqx.partition(model, eqx.is_array)
        steps[name] = make_step("shard_map", static, optimizer, mesh, args.batch)
        # The trained arrays, in this model's structure (its optimiser state too
        # holds the model's structure).
        p, o = with_leaves(p, params), with_leaves(optimizer.init(p), opt_state)
        counts[name] = hlo_all_reduces(steps[name], p, state, o, x, y)
        steps[name] = (steps[name], p, o)
    jit_params, jit_state, jit_opt = results["jit"]["trained"]
    counts["jit"] = hlo_all_reduces(
        results["jit"]["step"], jit_params, jit_state, jit_opt, x, y
    )

    def run(name, n):
        fn, p, o = steps[name]
        tick = time.perf_counter()
        for _ in range(n):
            out = fn(p, state, o, x, y)
        jax.block_until_ready(out)
        return (time.perf_counter() - tick) / n

    for name in steps:  # warm-up: compile and run once
        run(name, 2)
    samples = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name in steps:
            samples[name].append(run(name, 10))
    ms = {name: 1e3 * float(np.median(v)) for name, v in samples.items()}
    return {"all_reduces_in_hlo": counts, "ms_per_step": ms}


def worker(args):
    """One process of the job: joins, trains both styles, saves, reports."""
    exit_with_parent()
    initialize(args)
    is_main = jax.process_index() == 0
    n_dev = jax.device_count()
    if args.batch % n_dev:
        raise SystemExit(
            f"--batch {args.batch} does not split over {n_dev} devices: "
            f"use a multiple of {n_dev}"
        )
    mesh = jax.make_mesh((n_dev,), ("data",))
    data = load_data(args.smoke)
    steps_per_epoch = len(data[0]) // args.batch
    epochs = args.epochs or (2 if args.smoke else 10)
    if args.smoke:
        steps_per_epoch = min(steps_per_epoch, 3)
    if is_main:
        print(
            f"{jax.process_count()} processes x {jax.local_device_count()} "
            f"{jax.devices()[0].platform} devices; global batch {args.batch}, "
            f"{args.batch // jax.process_count()} per process; "
            f"{epochs} epochs of {steps_per_epoch} steps",
            flush=True,
        )
    results = {
        style: train_style(style, args, mesh, data, steps_per_epoch, epochs)
        for style in STYLES
    }
    report = {
        "processes": jax.process_count(),
        "devices": n_dev,
        "styles": {
            style: {k: v for k, v in r.items() if k not in ("step", "trained")}
            for style, r in results.items()
        },
    }
    if args.time_allreduce:
        report["allreduce"] = time_allreduce(results, args, mesh, data)
    if is_main:
        for style, r in report["styles"].items():
            print(
                f"{style}: held-out accuracy {r['test_acc']:.4f}, loss "
                f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}; "
                f"checkpoint {r['checkpoint']}",
                flush=True,
            )
        if "allreduce" in report:
            print(f"all-reduce: {json.dumps(report['allreduce'])}", flush=True)
        path = pathlib.Path(args.out) / "multihost.json"
        path.write_text(json.dumps(report, indent=1))
    jax.distributed.shutdown()
    return report


def free_port():
    """A port on 127.0.0.1 that is free now (the coordinator binds it a moment
    later; another program taking it in between would make the launch fail)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(code):
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def tail(path, lines=15):
    text = pathlib.Path(path).read_text(errors="replace").splitlines()
    # The C++ stack trace after a fatal error says nothing to a user.
    text = [ln[:300] for ln in text if not ln.startswith("    @ ")]
    return "\n".join("    " + ln for ln in text[-lines:])


def launch(args):
    """Starts `--processes` workers on this machine, each with `--local-devices`
    CPUs, and waits for them; stops them all if one fails or time runs out."""
    out = pathlib.Path(args.out)
    logs = out / "multihost_logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.local_devices}"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env[PARENT_ENV] = str(os.getpid())
    common = [
        sys.executable,
        os.path.abspath(__file__),
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(args.processes),
        "--out",
        str(out),
        "--batch",
        str(args.batch),
        "--seed",
        str(args.seed),
        "--init-timeout",
        str(args.init_timeout),
        "--heartbeat-timeout",
        str(args.heartbeat_timeout),
        "--shutdown-timeout",
        str(args.shutdown_timeout),
        "--repeats",
        str(args.repeats),
    ]
    common += ["--smoke"] * args.smoke + ["--time-allreduce"] * args.time_allreduce
    common += ["--epochs", str(args.epochs)] * bool(args.epochs)
    print(
        f"launching {args.processes} processes x {args.local_devices} CPU devices, "
        f"coordinator 127.0.0.1:{port}; logs in {logs}",
        flush=True,
    )
    procs, files = [], []
    try:
        for i in range(args.processes):
            err = open(logs / f"process_{i}.err", "w")
            # Process 0 prints the progress; the others only log.
            std = None if i == 0 else open(logs / f"process_{i}.out", "w")
            files += [f for f in (err, std) if f is not None]
            cmd = common + ["--process-id", str(i)]
            procs.append(subprocess.Popen(cmd, stdout=std, stderr=err, env=env))
            print(f"process {i}: pid {procs[-1].pid}", flush=True)
        failure = wait_for(procs, args)
    finally:
        for p in procs:  # whatever happened, no process outlives the launch
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in files:
            f.close()
    if failure:
        lines = [failure]
        for i, p in enumerate(procs):
            lines.append(f"process {i}: {describe_exit(p.returncode)}")
            if p.returncode:
                lines.append(tail(logs / f"process_{i}.err"))
        raise SystemExit("\n".join(lines))
    return json.loads((out / "multihost.json").read_text())


def wait_for(procs, args):
    """Waits until every process exits 0; returns `None`, or why it stopped waiting.

    After a failure the others get JAX's heartbeat timeout (and a margin) to stop
    on their own, as they would on a cluster with no launcher watching.
    """
    deadline = time.monotonic() + args.timeout
    failed_at = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return None
        now = time.monotonic()
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = now
        if failed_at is not None and (
            all(c is not None for c in codes)
            or now > failed_at + args.heartbeat_timeout + 15
        ):
            return "a process failed; the job stopped"
        if now > deadline:
            return f"the job ran past --timeout {args.timeout} s and was stopped"
        time.sleep(0.1)


def check_checkpoints(report):
    """Loads each checkpoint here, on one CPU, and checks the held-out accuracy
    against what the processes measured."""
    x_test, y_test = load_data(smoke=False)[2:]
    for style, r in report["styles"].items():
        model, state = load_checkpoint(r["checkpoint"])
        n = r["test_images"]
        correct = int(count_correct(model, state, x_test[:n], y_test[:n]))
        r["single_machine_correct"] = correct
        print(
            f"{style}: checkpoint loaded on one device: {correct}/{n} held-out "
            f"images correct (the {report['processes']} processes: "
            f"{r['test_correct']}/{n})",
            flush=True,
        )
        if correct != r["test_correct"]:
            raise SystemExit(f"{style}: the checkpoint does not give the same model")


def parse(argv):
    parser = _common.parser(__doc__, out_help="checkpoints, logs and multihost.json")
    local = parser.add_argument_group("local launch (the default)")
    local.add_argument("--processes", type=int, default=2)
    local.add_argument("--local-devices", type=int, default=2, help="CPUs each")
    local.add_argument(
        "--timeout", type=float, default=900, help="stop the job after this (s)"
    )
    cluster = parser.add_argument_group("one process of a cluster")
    cluster.add_argument("--coordinator", help="HOST:PORT of process 0's service")
    cluster.add_argument("--num-processes", type=int)
    cluster.add_argument("--process-id", type=int)
    cluster.add_argument(
        "--cluster",
        action="store_true",
        help="run as one process; JAX finds what the flags above leave out",
    )
    for flag, default, what in (
        ("--init-timeout", 60, "for every process to join"),
        ("--heartbeat-timeout", 10, "before a silent process counts as dead"),
        ("--shutdown-timeout", 30, "for the others at the end"),
    ):
        parser.add_argument(flag, type=int, default=default, help=f"seconds {what}")
    training = parser.add_argument_group("training")
    training.add_argument("--batch", type=int, default=64, help="global batch size")
    training.add_argument("--epochs", type=int, default=0, help="default 10 (2 smoke)")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument(
        "--time-allreduce",
        action="store_true",
        help="time the step with global against per-device statistics",
    )
    training.add_argument("--repeats", type=int, default=15, help="for the timing")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    given = (args.coordinator, args.num_processes, args.process_id)
    if args.cluster or any(v is not None for v in given):
        return worker(args)
    devices = args.processes * args.local_devices
    if args.batch % devices:
        raise SystemExit(
            f"--batch {args.batch} does not split over {args.processes} processes x "
            f"{args.local_devices} devices: use a multiple of {devices}"
        )
    with _common.runtime("multihost"):
        report = launch(args)
        check_checkpoints(report)
    return report


if __name__ == "__main__":
    main()

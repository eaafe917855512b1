"""Multi-process training with JAX's multi-controller runtime, on this machine.

Every test starts real processes (`jax.distributed.initialize`, gloo collectives
between CPU processes, 2 simulated CPUs each, the coordinator on 127.0.0.1 at a
port found free at run time) and checks them against this process, which keeps
its single device. Every child has a deadline, and each test kills all of its
children (their whole process group) when it ends, whatever happened.
"""

import contextlib
import importlib.util
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import PYTHON_WARNINGS

import eqx_bn

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
EXAMPLE = ROOT / "examples" / "multihost.py"
WORKER = TESTS / "multihost" / "parity_worker.py"

STEPS = 3  # training steps before the outputs are compared
PER_PROCESS = 8  # examples per process and global batch (4 per device)
# The two processes' shards come from different distributions: a statistic of
# one process's shard alone would differ from the global batch's by far more than
# float32 rounding.
SCALE, SHIFT = (1.0, 3.0), (0.0, 2.0)
HEARTBEAT = 5  # seconds, the fault tests' --heartbeat-timeout
INIT = 5  # seconds, the fault tests' --init-timeout
MARGIN = 40  # seconds on top of JAX's timeouts for a loaded machine to react

pytestmark = pytest.mark.subprocess


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load("multihost_example", EXAMPLE)


def child_env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.pop("EQX_BN_MULTIHOST_PARENT", None)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    # The children draw the model's weights with jax.random as this process does,
    # which is compared with them (the test session sets the counters: conftest.py).
    env["JAX_THREEFRY_PARTITIONABLE"] = str(jax.config.jax_threefry_partitionable)
    return env


@contextlib.contextmanager
def children():
    """Yields `start(args, name, cwd)`, which starts `python -W error args...`
    (`PYTHON_WARNINGS`) in a new process group with its output in
    `cwd/name.out|.err`; at the end, every group started is killed (with any
    process it started) and reaped."""
    procs = []

    def start(args, name, cwd):
        cwd = pathlib.Path(cwd)
        out = open(cwd / f"{name}.out", "w")
        err = open(cwd / f"{name}.err", "w")
        proc = subprocess.Popen(
            [sys.executable, *PYTHON_WARNINGS, *map(str, args)],
            stdout=out,
            stderr=err,
            cwd=ROOT,
            env=child_env(),
            start_new_session=True,
        )
        procs.append((proc, out, err))
        proc.logs = (cwd / f"{name}.out", cwd / f"{name}.err")
        return proc

    try:
        yield start
    finally:
        for proc, out, err in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.close()
            err.close()


def logs(*procs):
    text = []
    for p in procs:
        for path in p.logs:
            lines = [
                ln
                for ln in path.read_text(errors="replace").splitlines()
                if not ln.startswith("    @ ")  # C++ stack frames
            ]
            text.append(f"--- {path.name} ({p.returncode})\n" + "\n".join(lines[-40:]))
    return "\n".join(text)


def wait(procs, timeout):
    """Waits for every process to exit, `timeout` seconds in all; fails with their
    logs if one is still running then."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s:\n{logs(*procs)}")


def wait_for_line(proc, path, text, timeout):
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{text!r} not printed:\n{logs(proc)}")
        time.sleep(0.1)


def shards(example):
    """Every process's shard of every global batch: digits, with process 1's
    images scaled and shifted."""
    x, y = example.load_data(smoke=False)[:2]
    rng = np.random.default_rng(0)
    data = {"steps": STEPS, "n_total": 2 * PER_PROCESS}
    for i in range(STEPS + 1):
        for p in range(2):
            rows = rng.choice(len(x), PER_PROCESS, replace=False)
            data[f"x{i}_p{p}"] = x[rows] * np.float32(SCALE[p]) + np.float32(SHIFT[p])
            data[f"y{i}_p{p}"] = y[rows]
    return data


def global_batch(data, i):
    return (
        np.concatenate([data[f"x{i}_p0"], data[f"x{i}_p1"]]),
        np.concatenate([data[f"y{i}_p0"], data[f"y{i}_p1"]]),
    )


def single_process(example, data, axis_name):
    """The same training on this process's one device, with the global batches.

    Under standard promotion, as the processes run: Optax's schedules mix Python
    floats and int32 step counts.
    """
    with jax.numpy_dtype_promotion("standard"):
        return _single_process(example, data, axis_name)


def _single_process(example, data, axis_name):
    model, state = example.make_model(axis_name)
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = load("parity_worker", WORKER).make_optimizer()
    opt_state = optimizer.init(params)
    step = example.make_step("jit", static, optimizer, None, 2 * PER_PROCESS)
    losses = []
    for i in range(STEPS):
        params, state, opt_state, loss = step(
            params, state, opt_state, *global_batch(data, i)
        )
        losses.append(float(loss))
    forward = jax.jit(lambda p, s, x: eqx.combine(p, static)(x, s))
    x = global_batch(data, STEPS)[0]
    logits, next_state = forward(params, state, x)
    # What a per-process statistic would give: each shard normalised alone.
    per_shard = [forward(params, state, half)[0] for half in np.split(x, 2)]
    return {
        "loss": np.asarray(losses),
        "params": jax.tree.leaves(params),
        "state": jax.tree.leaves(state),
        "next_state": jax.tree.leaves(next_state),
        "logits": np.asarray(logits),
        "per_shard_logits": np.concatenate(per_shard),
    }


def close(actual, expected, what):
    """Equal at float32 rounding, relative to the array's scale: the sums over
    processes and devices add in another order than on one device."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    scale = max(float(np.max(np.abs(expected))), 1.0)
    np.testing.assert_allclose(
        actual, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=what
    )


def leaves(npz, style, what):
    n = len([k for k in npz.files if k.startswith(f"{style}/{what}/")])
    return [npz[f"{style}/{what}/{j}"] for j in range(n)]


def run_parity_job(example, tmp):
    """Runs the 2 x 2 job; returns the data and both processes' results."""
    data = shards(example)
    np.savez(tmp / "data.npz", **data)
    coordinator = f"127.0.0.1:{example.free_port()}"
    with children() as start:
        procs = [
            start([WORKER, coordinator, i, tmp / "data.npz", tmp], f"parity_{i}", tmp)
            for i in range(2)
        ]
        wait(procs, timeout=300)
        for p in procs:
            assert p.returncode == 0, logs(*procs)
    return data, [np.load(tmp / f"process_{i}.npz") for i in range(2)]


def check_style(example, data, results, style):
    axis_name = None if style == "jit" else "batch"
    ref = single_process(example, data, axis_name)
    got = results[0]
    # The global batch is the processes' shards in process order.
    np.testing.assert_array_equal(got[f"{style}/x"], global_batch(data, STEPS)[0])
    close(got[f"{style}/loss"], ref["loss"], f"{style}: losses")
    for what in ("params", "state", "next_state"):
        mine = leaves(got, style, what)
        assert len(mine) == len(ref[what]), what
        for j, (a, e) in enumerate(zip(mine, ref[what])):
            close(a, e, f"{style}: {what} leaf {j}")
    close(got[f"{style}/logits"], ref["logits"], f"{style}: outputs")
    # Statistics of one process's shard would have been caught.
    gap = np.max(np.abs(ref["per_shard_logits"] - ref["logits"]))
    assert gap > 1e3 * 1e-5 * max(np.max(np.abs(ref["logits"])), 1.0), gap


# One test, one job: under pytest-xdist a module fixture shared by several tests
# would start the job once in each worker process.
def test_two_processes_equal_one_process(example, tmp_path):
    data, results = run_parity_job(example, tmp_path)
    for style in example.STYLES:
        check_style(example, data, results, style)
    # Both processes hold the same replicated values, bit for bit.
    for key in results[1].files:
        np.testing.assert_array_equal(results[1][key], results[0][key], err_msg=key)
    # What docs/scaling.md says, read from the compiled steps: per BatchNorm, two
    # all-reduces forward (the shift, then the sums) and one backward; one more
    # for all the gradients.
    model = eqx.filter_eval_shape(example.make_model, None)[0]
    is_bn = lambda m: isinstance(m, eqx_bn.BatchNorm)  # noqa: E731
    n_bn = sum(map(is_bn, jax.tree.leaves(model, is_leaf=is_bn)))
    assert n_bn == 3
    for style in example.STYLES:
        assert int(results[0][f"{style}/all_reduces"]) == 3 * n_bn + 1, style
    # The checkpoint: written once, by process 0, and loaded here on one device.
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint.eqx"]
    model, state = example.load_checkpoint(tmp_path / "checkpoint.eqx")
    loaded = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    for j, leaf in enumerate(loaded):
        np.testing.assert_array_equal(leaf, results[0][f"jit/params/{j}"])
    for j, leaf in enumerate(jax.tree.leaves(state)):
        np.testing.assert_array_equal(leaf, results[0][f"jit/state/{j}"])


def example_worker(example, i, coordinator, tmp, *extra):
    return [
        EXAMPLE,
        "--coordinator",
        coordinator,
        "--num-processes",
        2,
        "--process-id",
        i,
        "--out",
        tmp,
        "--init-timeout",
        INIT,
        "--heartbeat-timeout",
        HEARTBEAT,
        "--shutdown-timeout",
        HEARTBEAT,
        *extra,
    ]


def test_a_killed_process_stops_the_other(example, tmp_path):
    """A worker killed during training: the other stops by itself (JAX's heartbeat
    timeout; the launcher would have used SIGKILL) and the launcher says so."""
    args = [EXAMPLE, "--smoke", "--epochs", 10**4, "--out", tmp_path]
    args += ["--heartbeat-timeout", HEARTBEAT, "--shutdown-timeout", HEARTBEAT]
    with children() as start:
        launcher = start(args, "launcher", tmp_path)
        out = launcher.logs[0]
        # The first epoch's line (3 steps) shows that both processes train: each
        # step all-reduces across them.
        wait_for_line(launcher, out, "epoch 1/", timeout=300)
        pid = int(re.search(r"process 1: pid (\d+)", out.read_text()).group(1))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait([launcher], timeout=HEARTBEAT + MARGIN)
        elapsed = time.monotonic() - killed
    err = launcher.logs[1].read_text()
    assert launcher.returncode == 1, logs(launcher)
    assert "a process failed; the job stopped" in err
    assert "process 1: killed by SIGKILL" in err, err
    # Process 0 ended on its own, with JAX's message.
    assert "process 0: killed by SIGKILL" not in err, err
    assert "process 0: still running" not in err, err
    assert "another task died" in err, err
    assert elapsed < HEARTBEAT + MARGIN


def test_a_process_that_never_joins_is_an_error(example, tmp_path):
    coordinator = f"127.0.0.1:{example.free_port()}"
    other = f"127.0.0.1:{example.free_port()}"
    with children() as start:
        # Process 0 waits for a process 1 that never comes; process 1 of another
        # job waits for a coordinator that never starts.
        procs = [
            start(
                example_worker(example, 0, coordinator, tmp_path), "lonely_0", tmp_path
            ),
            start(example_worker(example, 1, other, tmp_path), "lonely_1", tmp_path),
        ]
        started = time.monotonic()
        wait(procs, timeout=INIT + MARGIN)
        assert time.monotonic() - started < INIT + MARGIN
        for p in procs:
            err = logs(p)
            assert p.returncode != 0, err
            assert "joining 127.0.0.1:" in err
            assert "DEADLINE_EXCEEDED" in err, err


def test_example_launches_trains_and_checks_its_checkpoints(tmp_path):
    with children() as start:
        proc = start(
            [EXAMPLE, "--smoke", "--epochs", 1, "--out", tmp_path], "ex", tmp_path
        )
        wait([proc], timeout=600)
    out = proc.logs[0].read_text()
    assert proc.returncode == 0, logs(proc)
    assert "2 processes x 2 cpu devices" in out
    assert out.count("checkpoint loaded on one device") == 2, out
    names = sorted(p.name for p in tmp_path.glob("multihost_*.eqx"))
    assert names == ["multihost_jit.eqx", "multihost_shard_map.eqx"]

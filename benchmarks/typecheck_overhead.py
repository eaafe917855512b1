"""What `eqx_bn.typecheck` costs per training step: the same step checked and unchecked.

The model is a small CNN with eqx_bn BatchNorms on 8x8 one-channel images (the
digits example's size), its `__call__` and helper functions annotated with jaxtyping;
the checked variant wraps them in `eqx_bn.typecheck`, the unchecked one does not
(eqx_bn's own layers check themselves in both). Each variant's training step
(value-and-grad, SGD update, new State) is measured

- jitted (`eqx.filter_jit`): the first call (trace + check + compile) once, then
    the median over rounds of the per-call time, each round enough calls for ~0.1 s,
    each call waited for with `block_until_ready`; the warm-up call is excluded;
- eager (no jit), for contrast: the checks then run on every call.

Checked and unchecked run interleaved, round by round, in the same process, so
their ratio compares like with like on a busy machine; the ratio reported is the
median of the per-round ratios.

Usage: `python benchmarks/typecheck_overhead.py [--quick] [--rounds N]`.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

import eqx_bn


def features(
    h: Float[Array, "channels height width"],
) -> Float[Array, "channels height width"]:
    return jax.nn.relu(h)


def pool(h: Float[Array, "channels height width"]) -> Float[Array, " channels"]:
    return jnp.mean(h, axis=(1, 2))


class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    norm1: eqx_bn.BatchNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx_bn.BatchNorm
    head: eqx.nn.Linear
    checked: bool = eqx.field(static=True)

    def __init__(self, checked: bool, *, key, width: int = 16):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, width, 3, padding=1, use_bias=False, key=k1)
        self.norm1 = eqx_bn.BatchNorm(width)
        self.conv2 = eqx.nn.Conv2d(width, width, 3, padding=1, use_bias=False, key=k2)
        self.norm2 = eqx_bn.BatchNorm(width)
        self.head = eqx.nn.Linear(width, 10, key=k3)
        self.checked = checked

    def __call__(
        self, x: Float[Array, "1 height width"], state: eqx.nn.State
    ) -> tuple[Float[Array, " 10"], eqx.nn.State]:
        relu, mean = (
            (checked_features, checked_pool) if self.checked else (features, pool)
        )
        h, state = self.norm1(self.conv1(x), state)
        h, state = self.norm2(self.conv2(relu(h)), state)
        return self.head(mean(relu(h))), state


checked_features = eqx_bn.typecheck(features)
checked_pool = eqx_bn.typecheck(pool)


class CheckedCNN(CNN):
    """The same model with its `__call__` checked (and so its helpers, see above)."""

    __call__ = eqx_bn.typecheck(CNN.__call__)


def loss_fn(
    model: CNN,
    state: eqx.nn.State,
    x: Float[Array, "batch 1 height width"],
    y: Int[Array, " batch"],
):
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    logits, state = batched(x, state)
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1)), state


def step(model: CNN, state: eqx.nn.State, x: Array, y: Array):
    (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
        model, state, x, y
    )
    updates = jax.tree.map(lambda g: -0.01 * g, grads)
    model = eqx.apply_updates(model, updates)
    return model, state, loss


def _time_calls(call: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        jax.block_until_ready(call())
    return (time.perf_counter() - start) / number


def measure(calls: dict[str, Callable[[], Any]], rounds: int, target_s: float):
    """Per-call seconds of each of `calls`, interleaved round by round."""
    numbers = {}
    for name, call in calls.items():
        single = _time_calls(call, 1)  # the warm-up is not counted
        numbers[name] = max(1, int(target_s / max(single, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(_time_calls(call, numbers[name]))
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    target = 0.01 if args.quick else 0.1
    batch = 8 if args.quick else 64

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 1, 8, 8)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    variants = {}
    for name, cls in (("unchecked", CNN), ("checked", CheckedCNN)):
        checked = cls is CheckedCNN
        variants[name] = eqx.nn.make_with_state(cls)(
            checked, key=jax.random.key(0), width=4 if args.quick else 16
        )

    first_call, jit_calls, eager_calls = {}, {}, {}
    for name, (model, state) in variants.items():
        jitted = eqx.filter_jit(step)
        start = time.perf_counter()
        jax.block_until_ready(jitted(model, state, x, y))
        first_call[name] = time.perf_counter() - start
        jit_calls[name] = lambda j=jitted, m=model, s=state: j(m, s, x, y)
        eager_calls[name] = lambda m=model, s=state: loss_fn(m, s, x, y)[0]

    jit_times = measure(jit_calls, rounds, target)
    eager_times = measure(eager_calls, max(1, rounds // 3), target)

    def ratio(times):
        return statistics.median(
            c / u for c, u in zip(times["checked"], times["unchecked"])
        )

    result = {
        "jit_ms": {k: 1e3 * statistics.median(v) for k, v in jit_times.items()},
        "jit_ratio": ratio(jit_times),
        "eager_ms": {k: 1e3 * statistics.median(v) for k, v in eager_times.items()},
        "eager_ratio": ratio(eager_times),
        "first_call_s": first_call,
    }
    print(
        f"typecheck overhead, batch {batch} of 1x8x8, {rounds} rounds "
        f"(jax {jax.__version__}, {jax.devices()[0].platform})"
    )
    print(f"{'':<28}{'unchecked':>12}{'checked':>12}{'ratio':>8}")
    for label, key, ratio_key in (
        ("jitted step, ms/call", "jit_ms", "jit_ratio"),
        ("eager forward, ms/call", "eager_ms", "eager_ratio"),
    ):
        u, c = result[key]["unchecked"], result[key]["checked"]
        print(f"{label:<28}{u:>12.3f}{c:>12.3f}{result[ratio_key]:>8.3f}")
    u, c = first_call["unchecked"], first_call["checked"]
    print(f"{'first jitted call, s':<28}{u:>12.2f}{c:>12.2f}{c / u:>8.3f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

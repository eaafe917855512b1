"""What gradient accumulation costs with BatchNorm: `make_train_step(loss_fn,
accumulate=k)` in its two modes, next to one step on the whole batch and to
`optax.MultiSteps` fed the micro-batches one call at a time.

Competitors, each one optimiser update over the same batch of `--batch` examples,
all measured in this process, interleaved (`benchmarks/run.py`'s `measure`: warm-up
and compilation excluded, `block_until_ready`, the median over rounds):

- `whole batch`: `make_train_step(loss_fn)` on the whole batch (the memory that
    accumulation avoids);
- `accumulate=k`: the k micro-batches in one jitted call (a `lax.scan`), one
    optimiser update, the BatchNorm statistics pooled over the micro-batches;
- `MultiSteps k calls`: `optax.MultiSteps(opt, every_k_schedule=k)` as the
    `TrainState`'s optimiser, k calls of the plain step (the statistics then update
    at every micro-batch);
- `full_batch_statistics`: `accumulate=k, full_batch_statistics=True`, every
    micro-batch normalised with the whole batch's statistics (outputs and gradients
    equal the whole batch's).

Ratios are to the whole-batch step, per round, then the median. Peak memory is read
from XLA's accounting of each compiled program (`compiled.memory_analysis()`):
arguments + outputs + temporaries.

Three models: an MLP (3 BatchNorms in a chain, no convolution), the digits CNN of
`examples/digits_cnn.py` (3 BatchNorms in a chain), and the ResNet of
`benchmarks/run.py` (ResNet-18 layout, 16 filters: 20 BatchNorms, 17 along the
longest path). On XLA:CPU the gradient of a convolution runs many times slower
inside a loop (`lax.scan`) than outside one (jax-ml/jax#12868; the forward
convolution and dense layers do not suffer): the convolutional models show it.

Usage: `python benchmarks/accumulation.py [--quick] [--rounds N] [--k K]`.
`--quick` is a smoke test (tiny shapes, 2 rounds).
"""

import argparse
import os
import statistics
import sys

import equinox as eqx
import jax
import numpy as np
import optax

import eqx_bn
from eqx_bn.models import ResNet
from eqx_bn.train import TrainState, make_train_step

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
from run import _build, _cross_entropy, _vmapped_loss, measure  # noqa: E402

MB = 2**20


def _digits_case(batch: int):
    from digits_cnn import CNN, loss_fn

    model, state = _build(CNN, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.random((batch, 1, 8, 8), np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return model, state, loss_fn, (x, y)


class _MLP(eqx.Module):
    """Dense-BN-relu three times, then a dense head: no convolution."""

    layers: list
    norms: list
    head: eqx.nn.Linear

    def __init__(self, width: int, key):
        keys = jax.random.split(key, 4)
        sizes = [width] * 4
        self.layers = [
            eqx.nn.Linear(a, b, use_bias=False, key=k)
            for a, b, k in zip(sizes, sizes[1:], keys)
        ]
        self.norms = [eqx_bn.BatchNorm(width, momentum=0.9) for _ in self.layers]
        self.head = eqx.nn.Linear(width, 10, key=keys[3])

    def __call__(self, x, state):
        for layer, norm in zip(self.layers, self.norms):
            x, state = norm(layer(x), state)
            x = jax.nn.relu(x)
        return self.head(x), state


def _mlp_case(batch: int, width: int):
    model, state = _build(_MLP, width, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return model, state, _vmapped_loss(_cross_entropy), (x, y)


def _resnet_case(batch: int, size: int, filters: int):
    model, state = _build(
        ResNet, (2, 2, 2, 2), 10, num_filters=filters, key=jax.random.key(0)
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return model, state, _vmapped_loss(_cross_entropy), (x, y)


def _peak_mib(step, ts, batch) -> float:
    m = step.lower(ts, batch).compile().memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return (total - m.alias_size_in_bytes) / MB


def compare(model, state, loss_fn, batch, k: int, rounds: int, target_s: float):
    opt = optax.sgd(0.01, momentum=0.9)
    micro = [
        jax.tree.map(lambda a, i=i: np.array_split(a, k)[i], batch) for i in range(k)
    ]
    steps = {
        "whole batch": (make_train_step(loss_fn), opt),
        f"accumulate={k}": (make_train_step(loss_fn, accumulate=k), opt),
        f"MultiSteps {k} calls": (
            make_train_step(loss_fn),
            optax.MultiSteps(opt, every_k_schedule=k),
        ),
        "full_batch_statistics": (
            make_train_step(loss_fn, accumulate=k, full_batch_statistics=True),
            opt,
        ),
    }
    holders = {
        name: TrainState.create(model, state, o) for name, (_, o) in steps.items()
    }
    calls, memory = {}, {}
    for name, (step, _) in steps.items():
        ts = holders[name]
        if name.startswith("MultiSteps"):
            calls[name] = lambda step=step, ts=ts: [step(ts, m)[1] for m in micro]
            memory[name] = _peak_mib(step, ts, micro[0])
        else:
            calls[name] = lambda step=step, ts=ts: step(ts, batch)[1]
            memory[name] = _peak_mib(step, ts, batch)
    times = measure(calls, rounds, target_s)
    base = times["whole batch"]
    rows = []
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        rows.append(
            dict(
                name=name,
                ms=1e3 * statistics.median(ts),
                ratio=statistics.median(ratios),
                low=min(ratios),
                high=max(ratios),
                peak_mib=memory[name],
            )
        )
    return rows


def _print(title: str, rows) -> None:
    print(f"\n{title}")
    print("| step | ms | vs whole batch | peak memory (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['name']} | {r['ms']:.2f} | {r['ratio']:.2f}x "
            f"({r['low']:.2f}-{r['high']:.2f}) | {r['peak_mib']:.1f} |"
        )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--k", type=int, default=4, help="micro-batches per step")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 7)
    target = 0.02 if args.quick else 0.3
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs; k = {args.k}, {rounds} rounds"
    )
    mlp_batch, width = (16, 8) if args.quick else (1024, 256)
    digits = 16 if args.quick else 256
    batch, size, filters = (8, 8, 4) if args.quick else (64, 32, 16)
    cases = {
        f"MLP (3 BatchNorms, width {width}), batch {mlp_batch}": (
            lambda: _mlp_case(mlp_batch, width)
        ),
        f"digits CNN, batch {digits}": lambda: _digits_case(digits),
        f"ResNet-18 ({filters} filters), batch {batch} of {size}x{size}": (
            lambda: _resnet_case(batch, size, filters)
        ),
    }
    results = {}
    for title, make in cases.items():
        rows = compare(*make(), args.k, rounds, target)
        _print(title, rows)
        results[title] = rows
    return results


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        main(sys.argv[1:])

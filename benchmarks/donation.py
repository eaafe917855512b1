"""What donating the `TrainState` to each step saves: memory and time, on the ResNet
benchmark of `benchmarks/run.py` (ResNet-18 with 16 filters, 64 images of 32x32x3,
SGD with momentum).

`make_train_step(loss_fn)` donates nothing (so a model, State or TrainState taken
out before a step stays usable); `make_train_step(loss_fn, donate=True)` lets XLA
write the new parameters and optimiser state over the old ones. Both are compiled
for the same holder and batch, and measured in the same process:

- memory, from XLA's own accounting of the compiled program
    (`compiled.memory_analysis()`): arguments + outputs - aliased + temporaries is
    the most the step holds at once; the aliased bytes are what donation saves;
- time: the median over interleaved rounds of each step feeding its output into
    its next call (`benchmarks/run.py`'s `measure`), and the median of the
    per-round ratios.

Usage: `python benchmarks/donation.py [--quick] [--rounds N] [--optimizer adam]`.
`--quick` is a smoke test on a tiny ResNet.
"""

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqx_bn.train
from eqx_bn.models import ResNet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import (  # noqa: E402  (the ResNet benchmark's own pieces)
    _build,
    _carry,
    _cross_entropy,
    _normal,
    _vmapped_loss,
    compiled,
    measure,
)

MB = 2**20


def memory(executable) -> dict[str, float]:
    """XLA's accounting of a compiled step, in MiB."""
    m = executable.memory_analysis()
    sizes = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
    }
    sizes["peak"] = (
        sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
    )
    return {k: v / MB for k, v in sizes.items()}


def holder_bytes(ts: eqx_bn.train.TrainState) -> int:
    """The bytes of the holder's arrays: parameters, State, optimiser state, step."""
    return sum(x.nbytes for x in jax.tree.leaves(ts))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke test")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    args = parser.parse_args(argv)
    if args.quick:
        rounds, target = args.rounds or 3, 0.01
        batch, size, stages, filters = 4, 16, (1,), 4
    else:
        rounds, target = args.rounds or 7, 0.5
        batch, size, stages, filters = 64, 32, (2, 2, 2, 2), 16
    tx = optax.sgd(0.1, momentum=0.9) if args.optimizer == "sgd" else optax.adam(1e-3)

    images = jnp.asarray(_normal(2, (batch, 3, size, size)))
    labels = jnp.asarray(np.random.default_rng(3).integers(0, 10, batch))
    model, state = _build(
        ResNet, stages, 10, num_filters=filters, key=jax.random.key(1)
    )
    loss = _vmapped_loss(_cross_entropy)
    data = (images, labels)

    rows, calls = {}, {}
    for name, donate in (("donate=False (default)", False), ("donate=True", True)):
        ts = eqx_bn.train.TrainState.create(model, state, tx)
        step = eqx_bn.train.make_train_step(loss, donate=donate)
        executable, seconds = compiled(step, ts, data)
        rows[name] = memory(executable) | {"compile s": seconds}
        calls[name] = _carry(executable, ts, data)
    times = measure(calls, rounds, target)
    names = list(calls)
    for name in names:
        rows[name]["ms / step"] = 1e3 * statistics.median(times[name])
    ratio = statistics.median(a / b for a, b in zip(times[names[0]], times[names[1]]))

    print(
        f"ResNet{list(stages)} with {filters} filters, N={batch}, {size}x{size}x3, "
        f"{args.optimizer}; holder (params + State + optimiser state) "
        f"{holder_bytes(ts) / MB:.2f} MiB; jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, {os.cpu_count()} cores, {rounds} rounds"
    )
    columns = [
        "peak",
        "arguments",
        "outputs",
        "aliased",
        "temporaries",
        "ms / step",
        "compile s",
    ]
    mib = {"peak", "arguments", "outputs", "aliased", "temporaries"}
    titles = [c + " MiB" if c in mib else c for c in columns]
    print("| step | " + " | ".join(titles) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    saved = rows[names[0]]["peak"] - rows[names[1]]["peak"]
    print(
        f"\ndonation saves {saved:.2f} MiB of peak memory "
        f"({saved / rows[names[0]]['peak']:.1%}); time without / with donation: "
        f"{ratio:.3f} (median of per-round ratios)"
    )
    return dict(rows=rows, ratio=ratio, holder_mib=holder_bytes(ts) / MB)


if __name__ == "__main__":
    main()

"""What an abstract `--model` factory saves `eqx-bn-convert`: the same PyTorch
ResNet-50 checkpoint converted with a factory that initialises the model
(`eqx.nn.make_with_state(TorchResNet50)(key=key)`) and with one that only traces its
shapes (`eqx.filter_eval_shape` of the same call).

The checkpoint (a safetensors file of a ResNet-50's 25.6 M parameters) is written
once, then each factory's whole conversion (`cli.main`: import, build, read, load,
write) is timed, the two alternating round by round in this process; reported are
the median times and the median of the per-round ratios. The first round of each is
a warm-up (imports, JAX's first compilations) and is excluded.

Usage: `python benchmarks/convert_factory.py [--rounds N] [--dir DIR]`.
"""

import argparse
import os
import statistics
import tempfile
import time

import equinox as eqx
import jax

from eqx_bn.interop import cli, export_torch, write_safetensors
from eqx_bn.models import TorchResNet50

FACTORIES = """
import equinox as eqx
import jax

from eqx_bn.models import TorchResNet50


def concrete():
    return eqx.nn.make_with_state(TorchResNet50)(key=jax.random.key(0))


def abstract():
    return eqx.filter_eval_shape(
        eqx.nn.make_with_state(TorchResNet50), key=jax.random.key(0)
    )
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    directory = args.dir or tempfile.mkdtemp(prefix="eqx_bn_convert_")
    checkpoint = os.path.join(directory, "resnet50.safetensors")
    if not os.path.exists(checkpoint):
        model, state = eqx.nn.make_with_state(TorchResNet50)(key=jax.random.key(1))
        write_safetensors(checkpoint, export_torch(model, state))
    factories = os.path.join(directory, "bench_factories.py")
    with open(factories, "w") as f:
        f.write(FACTORIES)
    times: dict[str, list[float]] = {"concrete": [], "abstract": []}
    for round_ in range(args.rounds + 1):
        for name in times:
            out = os.path.join(directory, f"{name}.eqx")
            start = time.perf_counter()
            status = cli.main([checkpoint, out, "--model", f"{factories}:{name}", "-q"])
            elapsed = time.perf_counter() - start
            assert status == 0
            if round_:  # round 0 is the warm-up
                times[name].append(elapsed)
    ratios = [c / a for c, a in zip(times["concrete"], times["abstract"])]
    result = {
        "concrete_s": statistics.median(times["concrete"]),
        "abstract_s": statistics.median(times["abstract"]),
        "ratio": statistics.median(ratios),
    }
    print(
        f"ResNet-50 conversion: concrete factory {result['concrete_s']:.1f} s, "
        f"abstract {result['abstract_s']:.1f} s (x{result['ratio']:.1f}, median "
        f"of {args.rounds} rounds)"
    )
    return result


if __name__ == "__main__":
    main()

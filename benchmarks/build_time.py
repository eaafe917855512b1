"""How long a model takes to build, cold: each build in a fresh Python process.

Every model of `eqx_bn.models`, built with `eqx.nn.make_with_state(Model)(...,
key=key)`, against what a user of the other frameworks runs for the same network:
torchvision's constructor (`torchvision.models.resnet18()`, ...) and Flax's
`jax.jit(model.init)` of the ResNet of Flax's ImageNet example
(`tests/flax_reference.py`), on one 224x224 image as that example does.

A fresh process per build, because what is measured is the cold cost a user pays
in a script, a test or a notebook: with `jax.random` initialisers, each eager draw
compiled once per shape (issue 22: 18.6 s for a TorchResNet18 on 2 cores). In each
process the imports, the key (`jax.random.key(0)`, itself one small compile) and
the Flax example's input are made first and timed apart; the build is timed to
`block_until_ready`, as wall time and as the process's CPU time (which depends
less on the load of a shared machine). Targets run round-robin, so each round
sees about the same load; the table gives medians over rounds and the median of
the per-round ratios to the competitor.

Usage: `python benchmarks/build_time.py [--rounds N] [--quick] [--only A,B]`.
`--quick` runs two targets once (a smoke test), `--only` the named ones. With
`PYTHONPATH` set to another checkout it times that checkout's models.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (framework, what it builds, the competitor's name or None): for eqx_bn a
# model of eqx_bn.models and its positional arguments, for Flax the ImageNet
# example's stage sizes, for torchvision a constructor of torchvision.models.
TARGETS = {
    "eqx_bn SeedMLP": ("eqx_bn", ("SeedMLP", (2,)), None),
    "eqx_bn ResNet18": ("eqx_bn", ("ResNet18", (1000,)), "Flax ResNet18"),
    "eqx_bn ResNet34": ("eqx_bn", ("ResNet34", (1000,)), "Flax ResNet34"),
    "eqx_bn TorchResNet18": ("eqx_bn", ("TorchResNet18", ()), "torchvision resnet18"),
    "eqx_bn TorchResNet34": ("eqx_bn", ("TorchResNet34", ()), "torchvision resnet34"),
    "eqx_bn TorchResNet50": ("eqx_bn", ("TorchResNet50", ()), "torchvision resnet50"),
    "eqx_bn TorchResNeXt50_32x4d": (
        "eqx_bn",
        ("TorchResNeXt50_32x4d", ()),
        "torchvision resnext50_32x4d",
    ),
    "eqx_bn TorchWideResNet50_2": (
        "eqx_bn",
        ("TorchWideResNet50_2", ()),
        "torchvision wide_resnet50_2",
    ),
    "Flax ResNet18": ("flax", (2, 2, 2, 2), None),
    "Flax ResNet34": ("flax", (3, 4, 6, 3), None),
    "torchvision resnet18": ("torchvision", "resnet18", None),
    "torchvision resnet34": ("torchvision", "resnet34", None),
    "torchvision resnet50": ("torchvision", "resnet50", None),
    "torchvision resnext50_32x4d": ("torchvision", "resnext50_32x4d", None),
    "torchvision wide_resnet50_2": ("torchvision", "wide_resnet50_2", None),
}
QUICK = ("eqx_bn TorchResNet18", "torchvision resnet18")


def _prepare(framework: str, what) -> tuple:
    """Imports, key and input; returns the build to time and the seconds the key
    took to make."""
    if framework == "torchvision":
        import torch
        import torchvision

        torch.manual_seed(0)
        return (lambda: getattr(torchvision.models, what)()), 0.0

    import jax
    import jax.numpy as jnp

    start = time.perf_counter()
    key = jax.block_until_ready(jax.random.key(0))
    key_s = time.perf_counter() - start
    if framework == "eqx_bn":
        import equinox as eqx

        from eqx_bn import models

        name, args = what
        make = eqx.nn.make_with_state(getattr(models, name))

        def build():
            made = make(*args, key=key)
            return jax.block_until_ready(eqx.filter(made, eqx.is_array))

        return build, key_s

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from flax_reference import ResNet

    module = ResNet(stage_sizes=what, num_classes=1000)
    x = jax.block_until_ready(jnp.ones((1, 224, 224, 3)))
    init = jax.jit(lambda key, x: module.init(key, x, train=False))
    return (lambda: jax.block_until_ready(init(key, x))), key_s


def _child(name: str) -> None:
    start = time.perf_counter()
    build, key_s = _prepare(*TARGETS[name][:2])
    ready = time.perf_counter()
    cpu = time.process_time()
    build()
    out = {
        "prepare_s": ready - start,
        "key_s": key_s,
        "build_s": time.perf_counter() - ready,
        "build_cpu_s": time.process_time() - cpu,
    }
    print(json.dumps(out))


def run_once(name: str) -> dict:
    """`name` built in a fresh Python process."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only", help="comma-separated target names (default: all of them)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return {}
    names = list(QUICK if args.quick else TARGETS)
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
    rounds = 1 if args.quick else args.rounds
    print(f"load average (1, 5, 15 min) at start: {_load()}; {os.cpu_count()} CPUs")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            runs[name].append(run_once(name))
        print(f"round {r + 1}/{rounds} done, load average {_load()}", flush=True)
    print(f"load average at the end: {_load()}\n")
    print(
        "| model | build s (median, min) | build CPU s | key s | vs | their build s "
        "| ratio (median of rounds) |"
    )
    print("|---|---|---|---|---|---|---|")
    results = {}
    for name in names:
        times = [t["build_s"] for t in runs[name]]
        cpu = [t["build_cpu_s"] for t in runs[name]]
        other = TARGETS[name][2]
        row = {
            "build_s": statistics.median(times),
            "min_s": min(times),
            "cpu_s": statistics.median(cpu),
            "key_s": statistics.median(t["key_s"] for t in runs[name]),
        }
        theirs = ratio = ""
        if other in runs:
            their_times = [t["build_s"] for t in runs[other]]
            row["ratio"] = statistics.median(
                a / b for a, b in zip(times, their_times, strict=True)
            )
            theirs, ratio = (
                f"{statistics.median(their_times):.2f}",
                f"{row['ratio']:.2f}x",
            )
        results[name] = row
        print(
            f"| {name} | {row['build_s']:.2f}, {row['min_s']:.2f} | {row['cpu_s']:.2f} "
            f"| {row['key_s']:.2f} | {other or ''} | {theirs} | {ratio} |"
        )
    return results


if __name__ == "__main__":
    main()

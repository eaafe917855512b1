"""Times eqx_bn.BatchNorm against flax.linen, flax.nnx and eqx.nn BatchNorm.

All competitors of a case run in the same process, interleaved round by round, so
that their ratios compare like with like on a busy machine. Each is compiled ahead
of time (`jit(f).lower(...).compile()`, reported as compile s) and run once before
timing. Per competitor:

- ms / call: the median over the rounds (each round: enough calls for ~0.1 s, each
    waited for with `block_until_ready`); best ms: the fastest round; spread:
    (max - min) / median over the rounds.
- vs flax.linen: the median of the per-round ratios (lower is faster).
- vs 8-pass bound (layer cases): the time over 8x that of `x * 2` on the same
    array, the bound that Flax-like formulas would reach if every pass streamed.
- traffic (layer cases): bytes that the compiled program reads and writes in its
    full-size instructions, in units of the input's size (`x * 2` moves 2). It is
    read from the optimised HLO, so it does not depend on the machine's load.

Cases:

- `layer fwd+bwd`: `jax.grad` of `sum(y * g)` (a fixed random cotangent `g`)
    with respect to the input and the parameters, with the new running averages.
- `layer eval`: the inference forward pass (running averages).
- `resnet step`: a jitted SGD-with-momentum step of a ResNet-18 with 16 filters on
    32x32x3 images: `eqx_bn.models.ResNet` (channels first, and with
    `channels_last=True`) against its Flax twin.
- `layer fwd+bwd` also times Batch Renormalization (`renorm=True`, bounds that
    never bind, so the cost is the correction's) and Ghost BatchNorm
    (`virtual_batch_size=N // 8`, under `vmap` and with whole batches), with their
    time over plain `eqx_bn (vmap)`'s in the same rounds.
- `mlp step`: the seed MLP, `Dense(4) -> BatchNorm -> relu -> Dense(1)`, on a tiny
    batch: the dispatch overhead of `eqx_bn.train.make_train_step` against a plain
    `jax.jit` Flax step.

Layouts are each library's own: channels last for Flax (and a channels-first
`axis=1` row for comparison), channels first for Equinox (one example under
`jax.vmap`, or a whole batch with `axis_name=None`); eqx_bn runs in both
(`channels_last=True` rows: Flax's layout, on the same arrays as Flax).

Usage: `python benchmarks/run.py [--quick] [--rounds N] [--only CASE]
[--out benchmarks/RESULTS.md]`. `--quick` is a smoke test of a few seconds (tiny
shapes, no ResNet).
"""

import argparse
import functools
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import eqx_bn
import eqx_bn.train
from eqx_bn.models import ResNet, SeedMLP

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "tests"))
import flax_reference  # noqa: E402  (the Flax twins of eqx_bn.models)

GENERATED = "<!-- Everything below is written by benchmarks/run.py --out. -->"
FLAX = "flax.linen"
FLAX_NCHW = "flax.linen axis=1 (NCHW)"
COPY = "x*2 (copy)"
TRAFFIC = "traffic (x-sizes)"
STEP_TRAFFIC = "traffic MB"
LAYOUT_TRAFFIC = "of which transposes/copies MB"
EQX_LAST = "eqx_bn channels_last (vmap)"
EQX_LAST_BATCHED = "eqx_bn channels_last (batched)"
EQX_VMAP = "eqx_bn (vmap)"
# Batch Renormalization and Ghost BatchNorm (8 virtual batches), against plain
# eqx_bn in the same rounds (`VS_PLAIN`); training only, as inference is plain's.
RENORM = "eqx_bn renorm (vmap)"
GHOST = "eqx_bn ghost N/8 (vmap)"
GHOST_BATCHED = "eqx_bn ghost N/8 (batched)"
VARIANTS = (RENORM, GHOST, GHOST_BATCHED)
VS_PLAIN = "vs eqx_bn (vmap)"


# ----------------------------------------------------------------------------- timing


def _time_calls(call: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        jax.block_until_ready(call())
    return (time.perf_counter() - start) / number


def _number_for(call: Callable[[], Any], target_s: float) -> int:
    """Calls per round so that one round of this competitor lasts about `target_s`."""
    once = _time_calls(call, 1)
    return max(1, min(1000, int(target_s / max(once, 1e-6))))


def measure(
    calls: dict[str, Callable[[], Any]], rounds: int, target_s: float
) -> dict[str, list[float]]:
    """Seconds per call of each competitor, one value per round, interleaved."""
    for call in calls.values():  # warm-up: compile and first run excluded
        jax.block_until_ready(call())
    numbers = {name: _number_for(call, target_s) for name, call in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        names = list(calls) if r % 2 == 0 else list(reversed(calls))
        for name in names:
            times[name].append(_time_calls(calls[name], numbers[name]))
    return times


def compiled(jitted, *args) -> tuple[Callable, float]:
    """`jitted` compiled ahead of time for `args`, and the seconds that took."""
    start = time.perf_counter()
    executable = jitted.lower(*args).compile()
    return executable, time.perf_counter() - start


# ------------------------------------------------------------------ memory traffic
# Timings on a shared CPU are noisy; the bytes that the compiled program moves are
# not. Counted from the optimised HLO: every top-level instruction reads its
# full-size operands and writes its full-size result (fusions inside are free).

_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}
_SHAPE = re.compile(r"\b(f64|f32|s32|u32|bf16|f16|pred)\[([\d,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(?:,|$)"
)
_FREE = {
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "opt-barrier",
}
_PASS_OPS = re.compile(r" (reduce|dot|convolution|reduce-window)\(")


def _bytes(type_text: str) -> int:
    return sum(
        _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
        for dtype, dims in _SHAPE.findall(type_text)
    )


def _computations(text: str) -> dict[str, str]:
    bodies: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        header = re.match(r"^%?([\w.\-]+) .*\{$", line)
        if header:
            name = header.group(1)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)
    return {k: "\n".join(v) for k, v in bodies.items()}


def hlo_traffic(
    text: str, unit: float, min_bytes: int, only: str | None = None
) -> float:
    """Bytes that the program's top-level instructions read and write, / `unit`.

    Only arrays of at least `min_bytes` count (per-channel vectors are free). A
    fusion with a small result and no reduction inside is a slice of its operands,
    not a pass over them. `only`: a regex that the instruction's name must match.
    """
    bodies = _computations(text)
    sizes: dict[str, int] = {}
    traffic = 0
    for line in text[text.index("\nENTRY") :].splitlines()[1:]:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, type_text, op, operands = match.groups()
        sizes[name] = _bytes(type_text)
        if op in _FREE or (only is not None and not re.match(only, name)):
            continue
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if (
            called
            and sizes[name] < min_bytes
            and not _PASS_OPS.search(bodies.get(called.group(1), ""))
        ):
            continue
        moved = [sizes.get(o, 0) for o in re.findall(r"%([\w.\-]+)", operands)]
        traffic += sum(b for b in moved + [sizes[name]] if b >= min_bytes)
    return traffic / unit


# ----------------------------------------------------------------------- competitors


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    # NumPy, so that making the data compiles nothing.
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def _loss_value(y: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.sum(y.astype(jnp.float32) * g)


def _eqx_layer(layer, state, batched_call: bool):
    """(pure training function, pure eval function, params) for an Equinox layer."""
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def apply(params, x, state, inference):
        model = eqx.combine(params, static)
        if batched_call:
            return model(x, state, inference=inference)
        return jax.vmap(
            functools.partial(model, inference=inference),
            axis_name="batch",
            in_axes=(0, None),
            out_axes=(0, None),
        )(x, state)

    def train(params, x, state, g):
        def loss(params, x):
            y, new_state = apply(params, x, state, False)
            return _loss_value(y, g), new_state

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    def evaluate(params, x, state):
        return apply(params, x, state, True)[0]

    return train, evaluate, params


def _flax_linen_layer(x: jax.Array, axis: int):
    layer = nn.BatchNorm(use_running_average=None, axis=axis, momentum=0.99)
    init = jax.jit(functools.partial(layer.init, use_running_average=False))
    variables = init(jax.random.key(0), x)
    params, stats = variables["params"], variables["batch_stats"]

    def train(params, x, stats, g):
        def loss(params, x):
            y, updates = layer.apply(
                {"params": params, "batch_stats": stats},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return _loss_value(y, g), updates

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    def evaluate(params, x, stats):
        return layer.apply(
            {"params": params, "batch_stats": stats}, x, use_running_average=True
        )

    return train, evaluate, params, stats


def _flax_nnx_layer(channels: int):
    layer = nnx.BatchNorm(channels, use_running_average=False, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(layer, nnx.Param, nnx.BatchStat)

    def train(params, x, stats, g):
        def loss(params, x):
            model = nnx.merge(graphdef, params, stats, copy=True)
            y = model(x)
            return _loss_value(y, g), nnx.state(model, nnx.BatchStat)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    def evaluate(params, x, stats):
        model = nnx.merge(graphdef, params, stats)
        return model(x, use_running_average=True)

    return train, evaluate, params, stats


def layer_cases(shape, dtype, names: tuple[str, ...] | None) -> tuple[dict, ...]:
    """Training and eval calls, compile seconds (training), and memory traffic of
    the training and eval programs (in units of `x`'s size), for one shape/dtype.

    `names` limits the competitors (None: all of them).
    """
    n, c, h, w = shape
    x = jnp.asarray(_normal(0, shape), dtype)
    g = jnp.asarray(_normal(1, shape))
    x_last, g_last = jnp.moveaxis(x, 1, -1), jnp.moveaxis(g, 1, -1)

    train, evaluate, compile_s, failures = {}, {}, {}, {}
    traffic_train, traffic_eval = {}, {}

    def traffic(executable) -> float:
        return hlo_traffic(executable.as_text(), x.nbytes, x.size)

    copy, _ = compiled(jax.jit(lambda x: x * 2), x)
    train[COPY] = evaluate[COPY] = functools.partial(copy, x)
    traffic_train[COPY] = traffic_eval[COPY] = traffic(copy)

    def add(name, make, evaluated=True):
        if names is not None and name not in names:
            return
        train_fn, eval_fn, params, xx, stats, gg = make()
        try:
            train_exe, seconds = compiled(jax.jit(train_fn), params, xx, stats, gg)
            eval_exe, _ = compiled(jax.jit(eval_fn), params, xx, stats)
        except Exception as err:  # a competitor that fails here is a result too
            failures[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            return
        compile_s[name] = seconds
        train[name] = functools.partial(train_exe, params, xx, stats, gg)
        traffic_train[name] = traffic(train_exe)
        if evaluated:
            evaluate[name] = functools.partial(eval_exe, params, xx, stats)
            traffic_eval[name] = traffic(eval_exe)

    add(FLAX, lambda: _reorder(*_flax_linen_layer(x_last, -1), x_last, g_last))
    add(FLAX_NCHW, lambda: _reorder(*_flax_linen_layer(x, 1), x, g))
    add("flax.nnx", lambda: _reorder(*_flax_nnx_layer(c), x_last, g_last))
    for name, axis_name in ((EQX_VMAP, "batch"), ("eqx_bn (batched)", None)):
        add(name, functools.partial(_eqx_bn_case, c, axis_name, x, g))
    for name, axis_name in ((EQX_LAST, "batch"), (EQX_LAST_BATCHED, None)):
        case = functools.partial(_eqx_bn_case, c, axis_name, x_last, g_last, True)
        add(name, case)
    for mode in ("batch", "ema"):
        add(f"eqx.nn mode={mode}", functools.partial(_eqx_nn_case, c, mode, x, g))
    renorm = dict(renorm=True, renorm_clipping={"rmax": 1e3, "dmax": 1e3})
    ghost = dict(virtual_batch_size=max(1, n // 8))
    for name, axis_name, kwargs in (
        (RENORM, "batch", renorm),
        (GHOST, "batch", ghost),
        (GHOST_BATCHED, None, ghost),
    ):
        case = functools.partial(_eqx_bn_case, c, axis_name, x, g, **kwargs)
        add(name, case, evaluated=False)
    return train, evaluate, compile_s, traffic_train, traffic_eval, failures


def _reorder(train_fn, eval_fn, params, stats, x, g):
    return train_fn, eval_fn, params, x, stats, g


def _eqx_bn_case(c, axis_name, x, g, channels_last=False, **kwargs):
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        c, axis_name, channels_last=channels_last, **kwargs
    )
    train_fn, eval_fn, params = _eqx_layer(bn, state, batched_call=axis_name is None)
    return train_fn, eval_fn, params, x, state, g


def _eqx_nn_case(c, mode, x, g):
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, "batch", mode=mode)
    train_fn, eval_fn, params = _eqx_layer(bn, state, batched_call=False)
    return train_fn, eval_fn, params, x, state, g


# --------------------------------------------------------------------- model steps


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def resnet_steps(
    batch: int, size: int, stage_sizes: tuple[int, ...], filters: int
) -> tuple[dict, dict]:
    """Jitted SGD steps of the eqx_bn ResNets (both layouts) and Flax's, 10 classes."""
    images = jnp.asarray(_normal(2, (batch, 3, size, size)))
    labels = jnp.asarray(np.random.default_rng(3).integers(0, 10, batch))
    images_last = jnp.moveaxis(images, 1, -1)
    tx = optax.sgd(0.1, momentum=0.9)

    eqx_loss = _vmapped_loss(_cross_entropy)
    eqx_cases = {}
    for name, channels_last, x in (
        ("eqx_bn", False, images),
        ("eqx_bn channels_last", True, images_last),
    ):
        model, state = _build(
            ResNet,
            stage_sizes,
            10,
            num_filters=filters,
            channels_last=channels_last,
            key=jax.random.key(1),
        )
        ts = eqx_bn.train.TrainState.create(model, state, tx)
        eqx_cases[name] = (eqx_loss, ts, (x, labels))

    flax_model = flax_reference.ResNet(
        stage_sizes=list(stage_sizes), num_classes=10, num_filters=filters
    )
    return _steps(
        eqx_cases,
        flax_model,
        tx,
        _cross_entropy,
        (images_last, labels),
        traffic=True,
    )


def _resnet_pair(batch, size, filters, classes):
    """Images (NCHW, NHWC), an eqx_bn ResNet-18 maker, and Flax's twin with its
    variables, for the whole-network cases."""
    images = jnp.asarray(_normal(2, (batch, 3, size, size)))
    images_last = jnp.moveaxis(images, 1, -1)
    flax_model = flax_reference.ResNet(
        stage_sizes=[2, 2, 2, 2], num_classes=classes, num_filters=filters
    )
    init = jax.jit(functools.partial(flax_model.init, train=False))
    variables = init(jax.random.key(3), images_last)

    def eqx_model(channels_last: bool):
        return _build(
            ResNet,
            (2, 2, 2, 2),
            classes,
            num_filters=filters,
            channels_last=channels_last,
            key=jax.random.key(1),
        )

    return images, images_last, eqx_model, flax_model, variables


def resnet_compiles(batch: int, size: int, filters: int) -> dict[str, Callable]:
    """Makers of the ResNet-18 train steps whose compile time is measured: each
    returns `(jitted step, args)`, to be traced, lowered and compiled from cold."""
    images, images_last, eqx_model, flax_model, variables = _resnet_pair(
        batch, size, filters, 1000
    )
    labels = jnp.asarray(np.random.default_rng(3).integers(0, 1000, batch))
    tx = optax.sgd(0.1, momentum=0.9)
    params = variables["params"]
    flax_state = (params, variables["batch_stats"], tx.init(params))
    makers = {
        FLAX: lambda: (
            _flax_train_step(flax_model, tx, _cross_entropy),
            (flax_state, (images_last, labels)),
        )
    }
    eqx_loss = _vmapped_loss(_cross_entropy)
    for name, channels_last, x in (
        ("eqx_bn", False, images),
        ("eqx_bn channels_last", True, images_last),
    ):
        ts = eqx_bn.train.TrainState.create(*eqx_model(channels_last), tx)
        makers[name] = functools.partial(
            lambda ts, x: (
                # Donating, like the Flax step it is compared with.
                eqx_bn.train.make_train_step(eqx_loss, donate=True),
                (ts, (x, labels)),
            ),
            ts,
            x,
        )
    return makers


def measure_compiles(
    makers: dict[str, Callable], rounds: int
) -> tuple[list[dict], dict[str, dict[str, str]]]:
    """Rows of trace+lower+compile times, each from cold (`jax.clear_caches()`),
    interleaved round by round; the CPU seconds of the process are reported too,
    as they depend less on the machine's load than the wall time."""
    wall: dict[str, list[float]] = {name: [] for name in makers}
    cpu: dict[str, list[float]] = {name: [] for name in makers}
    for r in range(rounds):
        names = list(makers) if r % 2 == 0 else list(reversed(makers))
        for name in names:
            step, args = makers[name]()
            jax.clear_caches()
            w, c = time.perf_counter(), time.process_time()
            step.lower(*args).compile()  # traces, lowers and compiles
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    rows = summarise(wall, False)
    for row in rows:
        row["ms"], row["best"] = row["ms"] / 1e3, row["best"] / 1e3  # seconds
    ratios = {name: [a / b for a, b in zip(cpu[name], cpu[FLAX])] for name in makers}
    columns = {
        "CPU s": {n: f"{statistics.median(v):.2f}" for n, v in cpu.items()},
        "CPU vs flax.linen": {
            n: f"{statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})"
            for n, v in ratios.items()
        },
    }
    return rows, columns


def resnet_inference(batch: int, size: int, filters: int) -> tuple[dict, dict]:
    """ResNet-18 inference (1000 classes): Flax's eval (running averages) against
    eqx_bn's, as it is and with `eqx_bn.fold_batch_norms`.

    Each model runs with its weights as arguments of the jitted function, and, in
    the `frozen` rows, closed over by it: constants, which XLA lays out for its
    convolutions once, at compile time, instead of at every call (Equinox keeps
    kernels as `(out, in, h, w)`, XLA's CPU convolutions want `(h, w, in, out)`).
    """
    images, images_last, eqx_model, flax_model, variables = _resnet_pair(
        batch, size, filters, 1000
    )

    def flax_forward(variables, x):
        return flax_model.apply(variables, x, train=False)

    candidates = {FLAX: (flax_forward, variables, images_last)}
    for channels_last, x in ((False, images), (True, images_last)):
        model, state = eqx_model(channels_last)
        model = eqx.nn.inference_mode(model)
        suffix = " channels_last" if channels_last else ""
        for name, m in (
            (f"eqx_bn{suffix}", model),
            (f"eqx_bn folded{suffix}", eqx_bn.fold_batch_norms(model, state)),
        ):
            params, static = eqx.partition(m, eqx.is_array)

            def forward(params, x, static=static, state=state):
                model = eqx.combine(params, static)
                return jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)[
                    0
                ]

            candidates[name] = (forward, params, x)
    frozen = (FLAX, "eqx_bn folded", "eqx_bn folded channels_last")
    for name in frozen:
        forward, params, x = candidates[name]
        candidates[f"{name}, frozen"] = (
            lambda x, forward=forward, params=params: forward(params, x),
            None,
            x,
        )
    calls, executables, compile_s = {}, {}, {}
    for name, (forward, params, x) in candidates.items():
        args = (x,) if params is None else (params, x)
        exe, seconds = compiled(jax.jit(forward), *args)
        calls[name] = functools.partial(exe, *args)
        executables[name], compile_s[name] = exe, f"{seconds:.2f}"
    kinds = ((STEP_TRAFFIC, None), (LAYOUT_TRAFFIC, "(transpose|copy)"))
    columns = {"compile s": compile_s}
    for title, only in kinds:
        columns[title] = {
            name: f"{hlo_traffic(exe.as_text(), 1e6, 2**16, only):.0f}"
            for name, exe in executables.items()
        }
    return calls, columns


def mlp_steps(batch: int) -> tuple[dict, dict]:
    """The seed MLP on a tiny batch: eqx_bn.train against a plain jitted Flax step."""
    km = jax.random.key(2)
    x = jnp.asarray(_normal(4, (batch, 2)))
    y = jnp.sum(x, axis=1, keepdims=True)
    tx = optax.sgd(0.1)
    model, state = _build(SeedMLP, 2, key=km)

    ts = eqx_bn.train.TrainState.create(model, state, tx)
    return _steps(
        {"eqx_bn": (_vmapped_loss(_mse), ts, (x, y))},
        flax_reference.SeedMLP(),
        tx,
        _mse,
        (x, y),
    )


def _vmapped_loss(metric: Callable[[jax.Array, jax.Array], jax.Array]):
    """An `eqx_bn.train` loss: the model under `vmap` over the batch, then `metric`."""

    def loss(model, state, batch):
        x, y = batch
        out, state = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)
        return metric(out, y), (state, None)

    return loss


def _build(cls, *args, **kwargs):
    # Under one jit: built eagerly, every initialiser would compile on its own.
    return eqx.filter_jit(eqx.nn.make_with_state(cls))(*args, **kwargs)


def _mse(pred, y):
    return jnp.mean((pred - y) ** 2)


def _steps(eqx_cases, flax_model, tx, loss, flax_batch, traffic=False):
    """Step calls, and columns for the table (compile seconds, traffic in MB of
    arrays of 64 KiB or more): `eqx_bn.train` against a plain Flax step.

    `eqx_cases`: name -> (loss function, `TrainState`, batch) for each eqx_bn row.
    """
    init = jax.jit(functools.partial(flax_model.init, train=False))
    variables = init(jax.random.key(3), flax_batch[0])
    params = variables["params"]
    flax_state = (params, variables["batch_stats"], tx.init(params))
    flax_step, flax_s = compiled(
        _flax_train_step(flax_model, tx, loss), flax_state, flax_batch
    )
    calls = {FLAX: _carry(flax_step, flax_state, flax_batch)}
    executables = {FLAX: flax_step}
    compile_s = {FLAX: f"{flax_s:.2f}"}
    for name, (eqx_loss, ts, batch) in eqx_cases.items():
        step, seconds = compiled(
            eqx_bn.train.make_train_step(eqx_loss, donate=True), ts, batch
        )
        calls[name] = _carry(step, ts, batch)
        executables[name] = step
        compile_s[name] = f"{seconds:.2f}"
    columns = {"compile s": compile_s}
    kinds = ((STEP_TRAFFIC, None), (LAYOUT_TRAFFIC, "(transpose|copy)"))
    for title, only in kinds if traffic else ():
        columns[title] = {
            name: f"{hlo_traffic(exe.as_text(), 1e6, 2**16, only):.0f}"
            for name, exe in executables.items()
        }
    return calls, columns


def _flax_train_step(model: nn.Module, tx, loss):
    """The usual Flax step: apply with mutable batch_stats, grad, optax update."""

    def step(train_state, batch):
        params, stats, opt_state = train_state
        x, y = batch

        def loss_fn(params):
            out, updates = model.apply(
                {"params": params, "batch_stats": stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return loss(out, y), updates["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, stats, opt_state), value, None

    return jax.jit(step, donate_argnums=(0,))


def _carry(step, train_state, batch) -> Callable[[], Any]:
    """A call that feeds each step's (donated) train state into the next."""
    box = [train_state]

    def call():
        box[0], loss, _ = step(box[0], batch)
        return loss

    return call


# ------------------------------------------------------------------------- report


def summarise(times: dict[str, list[float]], with_bound: bool) -> list[dict]:
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        row = {
            "name": name,
            "ms": median * 1e3,
            "best": min(ts) * 1e3,
            "spread": (max(ts) - min(ts)) / median * 100,
            "flax": statistics.median(a / b for a, b in zip(ts, times[FLAX])),
        }
        if with_bound:
            row["bound"] = statistics.median(
                a / (8 * b) for a, b in zip(ts, times[COPY])
            )
        rows.append(row)
    return rows


def table(
    title: str,
    rows: list[dict],
    columns: dict[str, dict[str, str]],
    failures: dict[str, str] | None = None,
    unit: str = "ms",
) -> str:
    """A Markdown table of `rows`, with `columns` (title -> competitor -> text) added,
    and a line for each competitor that failed."""
    with_bound = "bound" in rows[0]
    per = "call" if unit == "ms" else "compile"
    head = ["competitor", f"{unit} / {per}", f"best {unit}", "spread", "vs flax.linen"]
    head += ["vs 8-pass bound"] if with_bound else []
    head += list(columns)
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for r in rows:
        cells = [r["name"], f"{r['ms']:.3f}", f"{r['best']:.3f}", f"{r['spread']:.0f}%"]
        cells += [f"{r['flax']:.2f}x"]
        cells += [f"{r['bound']:.2f}x"] if with_bound else []
        cells += [column.get(r["name"], "") for column in columns.values()]
        lines.append("| " + " | ".join(cells) + " |")
    for name, error in (failures or {}).items():
        lines.append(f"| {name} | fails: {error.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _fmt(values: dict[str, float], spec: str) -> dict[str, str]:
    return {k: format(v, spec) for k, v in values.items()}


def _ratios(
    times: dict[str, list[float]], names: tuple[str, ...], base: str
) -> dict[str, str]:
    """The median over the rounds of each of `names`' time over `base`'s."""
    if base not in times:
        return {}
    ratios = {
        name: statistics.median(a / b for a, b in zip(times[name], times[base]))
        for name in names
        if name in times
    }
    return {name: f"{ratio:.2f}x" for name, ratio in ratios.items()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke test")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the table here")
    parser.add_argument(
        "--only",
        choices=("layer", "resnet", "compile", "inference", "mlp"),
        action="append",
        help="run only these cases (repeatable; default: all, and no resnet with "
        "--quick, whose compile alone would take most of the smoke test's time)",
    )
    args = parser.parse_args(argv)

    if args.quick:
        rounds, target = args.rounds or 3, 0.002
        shapes = [((8, 16, 8, 8), jnp.float32)]
        names = (FLAX, EQX_VMAP, EQX_LAST, RENORM, GHOST)
        resnet = dict(batch=4, size=16, stage_sizes=(1,), filters=4)
        resnet18 = dict(batch=2, size=32, filters=4)
        compile_rounds = 1
        inference = dict(batch=2, size=32, filters=4)
    else:
        rounds, target = args.rounds or 9, 0.1
        shapes = [
            ((64, 64, 32, 32), jnp.float32),
            ((64, 128, 16, 16), jnp.float32),
            ((64, 256, 8, 8), jnp.float32),
            ((64, 512, 4, 4), jnp.float32),
            ((1024, 512, 1, 1), jnp.float32),
            ((64, 64, 32, 32), jnp.bfloat16),
        ]
        names = None
        resnet = dict(batch=64, size=32, stage_sizes=(2, 2, 2, 2), filters=16)
        resnet18 = dict(batch=8, size=224, filters=64)
        compile_rounds = max(3, rounds // 3)
        inference = dict(batch=4, size=224, filters=64)
    mlp_batch = 8
    everything = ("layer", "resnet", "compile", "inference", "mlp")
    cases = set(args.only or (("layer", "mlp") if args.quick else everything))

    out = [
        "## eqx_bn benchmarks",
        "",
        f"jax {jax.__version__}, flax {flax.__version__}, equinox {eqx.__version__}, "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}); {rounds} rounds, "
        "median per call; spread = (max - min) / median over the rounds; ratios are "
        "medians of per-round ratios (lower is faster); compile s = "
        "`lower().compile()` of the training function.",
        "",
    ]

    def emit(text: str) -> None:
        print(text, flush=True)
        out.append(text)

    for shape, dtype in shapes if "layer" in cases else ():
        train, evaluate, compile_s, moved_train, moved_eval, failed = layer_cases(
            shape, dtype, names
        )
        label = f"N,C,H,W={shape} {np.dtype(dtype).name}"
        times = measure(train, rounds, target)
        rows = summarise(times, True)
        columns = {
            TRAFFIC: _fmt(moved_train, ".1f"),
            "compile s": _fmt(compile_s, ".2f"),
            VS_PLAIN: _ratios(times, VARIANTS, EQX_VMAP),
        }
        emit(table(f"layer fwd+bwd, {label}", rows, columns, failed))
        rows = summarise(measure(evaluate, rounds, target), True)
        columns = {TRAFFIC: _fmt(moved_eval, ".1f")}
        emit(table(f"layer eval, {label}", rows, columns, failed))

    if "resnet" in cases:
        calls, columns = resnet_steps(**resnet)
        title = (
            f"resnet step, ResNet{list(resnet['stage_sizes'])} with "
            f"{resnet['filters']} filters, N={resnet['batch']}, "
            f"{resnet['size']}x{resnet['size']}x3, SGD+momentum"
        )
        rows = summarise(measure(calls, rounds, target * 5), False)
        emit(table(title, rows, columns))
    if "compile" in cases:
        r18 = resnet18
        rows, columns = measure_compiles(resnet_compiles(**r18), compile_rounds)
        title = (
            f"resnet-18 train step compile, {r18['filters']} filters, "
            f"N={r18['batch']}, {r18['size']}x{r18['size']}x3, 1000 classes: seconds "
            "to trace, lower and compile from cold"
        )
        emit(table(title, rows, columns, unit="s"))
    if "inference" in cases:
        calls, columns = resnet_inference(**inference)
        title = (
            f"resnet-18 inference, {inference['filters']} filters, "
            f"N={inference['batch']}, {inference['size']}x{inference['size']}x3, "
            "1000 classes: Flax's eval against eqx_bn, unfolded and folded"
        )
        rows = summarise(measure(calls, rounds, target * 5), False)
        emit(table(title, rows, columns))
    if "mlp" in cases:
        calls, columns = mlp_steps(mlp_batch)
        title = f"mlp step (dispatch overhead), seed MLP, N={mlp_batch}, SGD"
        rows = summarise(measure(calls, rounds, target), False)
        emit(table(title, rows, columns))
    text = "\n".join(out)
    if args.out:
        _write(args.out, text)
    return text


def _write(path: str, tables: str) -> None:
    """Writes `tables` to `path`, keeping any notes above `GENERATED` there."""
    notes = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if GENERATED in old:
            notes = old[: old.index(GENERATED)]
    with open(path, "w") as f:
        f.write(notes + GENERATED + "\n\n" + tables)


if __name__ == "__main__":
    main()

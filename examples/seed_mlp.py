"""The Flax BatchNorm guide's MLP, in Equinox with eqx_bn, next to the Flax original.

    python examples/seed_mlp.py            # with Flax installed: side by side
    python examples/seed_mlp.py --no-flax  # as if Flax were not installed
    python examples/seed_mlp.py --out DIR  # where the numbers go (default ./outputs)

`Dense(4) -> BatchNorm -> relu -> Dense(1)`, with and without the BatchNorm: what the
variables / State look like, then one training step and one evaluation step. Flax
keeps the running averages in `variables["batch_stats"]` and needs
`mutable=["batch_stats"]` and a `TrainState` with a `batch_stats` field; here they
live in an `eqx.nn.State` that goes into the model and comes back out of it.
"""

import json
import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import Progress, parser, runtime

from eqx_bn.interop import load_flax
from eqx_bn.models import SeedMLP
from eqx_bn.train import TrainState, make_eval_step, make_train_step

try:
    import flax.linen as nn
    from flax.training import train_state
except ImportError:  # Flax is optional: the comparison is skipped
    nn = None


class PlainMLP(eqx.Module):
    """The same MLP without BatchNorm. Called like `SeedMLP`, it hands the (empty)
    State straight back, so that one training loop serves both."""

    dense_0: eqx.nn.Linear
    dense_1: eqx.nn.Linear

    def __init__(self, in_features, *, key):
        k0, k1 = jax.random.split(key)
        self.dense_0 = eqx.nn.Linear(in_features, 4, key=k0)
        self.dense_1 = eqx.nn.Linear(4, 1, key=k1)

    def __call__(self, x, state):
        return self.dense_1(jax.nn.relu(self.dense_0(x))), state


def loss_fn(model, state, batch):
    """Mean squared error; the model sees one example at a time under vmap."""
    x, y = batch
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    pred, state = batched(x, state)
    return jnp.mean((pred - y) ** 2), (state, pred)


def make_batch():
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    return x, np.sin(x.sum(axis=1, keepdims=True))


def shapes(tree):
    return jax.tree.map(lambda a: a.shape, tree)


def section(title):
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def flax_side(batch, with_bn: bool):
    """The guide's Flax code: init, one train step, one eval step."""

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(4)(x)
            if with_bn:
                x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(1)(nn.relu(x))

    class FlaxTrainState(train_state.TrainState):
        batch_stats: dict

    x, y = batch
    variables = MLP().init(jax.random.key(0), x, train=False)
    if not with_bn:
        return variables, None

    ts = FlaxTrainState.create(
        apply_fn=MLP().apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.sgd(0.1),
    )

    @jax.jit
    def train_step(ts, batch):
        def loss(params):
            pred, updates = ts.apply_fn(
                {"params": params, "batch_stats": ts.batch_stats},
                batch[0],
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean((pred - batch[1]) ** 2), updates

        (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(ts.params)
        ts = ts.apply_gradients(grads=grads)
        return ts.replace(batch_stats=updates["batch_stats"]), value

    @jax.jit
    def eval_step(ts, batch):
        pred = ts.apply_fn(
            {"params": ts.params, "batch_stats": ts.batch_stats}, batch[0], train=False
        )
        return jnp.mean((pred - batch[1]) ** 2), pred

    ts, train_loss = train_step(ts, batch)
    eval_loss, pred = eval_step(ts, batch)
    stats = ts.batch_stats["BatchNorm_0"]
    numbers = dict(
        train_loss=train_loss,
        mean=stats["mean"],
        var=stats["var"],
        eval_loss=eval_loss,
        pred=pred[:3, 0],
    )
    return variables, jax.tree.map(np.asarray, numbers)


def eqx_side(model, state, batch):
    ts = TrainState.create(model, state, optax.sgd(0.1))
    train_step, eval_step = make_train_step(loss_fn), make_eval_step(loss_fn)
    with Progress(1, "eqx_bn") as progress:  # one step is one epoch here
        ts, train_loss, _ = train_step(ts, batch)
        progress.step()
        progress.epoch(1, 1, train_loss=float(train_loss))
    eval_loss, (_, pred) = eval_step(ts, batch)
    stats = ts.state.get(ts.model.norm.state_index)
    numbers = dict(
        train_loss=train_loss,
        mean=stats.mean,
        var=stats.var,
        eval_loss=eval_loss,
        pred=pred[:3, 0],
    )
    return jax.tree.map(np.asarray, numbers)


def fmt(v) -> str:
    return np.array2string(np.atleast_1d(v), precision=6, floatmode="fixed")


def main(argv=None) -> dict:
    result = parser(__doc__, out_help="the numbers compared (seed_mlp.json)")
    result.add_argument("--no-flax", action="store_true", help="skip the Flax side")
    args = result.parse_args(argv)
    with runtime("seed_mlp") as timing:
        out = run(args)
    return out | {"wall_s": timing["seconds"]}


def run(args) -> dict:
    use_flax = nn is not None and not args.no_flax
    batch = make_batch()
    key = jax.random.key(0)

    section("Without BatchNorm")
    plain, plain_state = eqx.nn.make_with_state(PlainMLP)(3, key=key)
    print("Equinox model:", plain)
    print("Equinox State:", plain_state, "(empty: nothing to thread)")
    if use_flax:
        flax_plain, _ = flax_side(batch, with_bn=False)
        print("Flax variables:", shapes(flax_plain))
    ts = TrainState.create(plain, plain_state, optax.sgd(0.1))
    ts, loss, _ = make_train_step(loss_fn)(ts, batch)
    print(f"one train step, loss {float(loss):.6f} (the same step function as below)")

    section("With BatchNorm")
    model, state = eqx.nn.make_with_state(SeedMLP)(3, key=key)
    if use_flax:
        flax_vars, flax_numbers = flax_side(batch, with_bn=True)
        print("Flax variables:", shapes(flax_vars))
        # The same initial values on both sides: the Flax init, converted.
        model, state = load_flax(model, state, flax_vars)
    else:
        print("(Flax is not installed: the Flax side is skipped.)")
    print("Equinox model:", model)
    print("Equinox State:", state)
    numbers = eqx_side(model, state, batch)

    section("One train step (SGD 0.1), then one eval step (running averages)")
    diffs = {}
    for name in ("train_loss", "mean", "var", "eval_loss", "pred"):
        value = numbers[name]
        line = f"{name:>10}  eqx_bn {fmt(value)}"
        if use_flax:
            diffs[name] = float(np.max(np.abs(value - flax_numbers[name])))
            line += f"\n{'':>10}  Flax   {fmt(flax_numbers[name])}"
            line += f"  max |diff| {diffs[name]:.1e}"
        print(line)
    if use_flax:
        worst = max(diffs.values())
        print(f"\nlargest difference from Flax: {worst:.1e} (float32 rounding)")
    print("(mean, var: the running averages after the step; pred: 3 eval outputs)")
    path = pathlib.Path(args.out) / "seed_mlp.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {k: np.asarray(v).tolist() for k, v in numbers.items()}
    path.write_text(json.dumps(dict(eqx_bn=saved, max_abs_diff_from_flax=diffs)))
    print(f"numbers: {path}")
    return dict(numbers=numbers, diffs=diffs, flax=use_flax)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Start training in Flax, save a msgpack checkpoint, carry on in Equinox with eqx_bn.

    python examples/flax_to_equinox.py            # 300 Flax steps, then 300 more here
    python examples/flax_to_equinox.py --smoke    # a few steps of each
    python examples/flax_to_equinox.py --out DIR  # checkpoints (default ./outputs)

The model is the Flax BatchNorm guide's MLP (`Dense(4) -> BatchNorm -> relu ->
Dense(1)`) fitting a small regression problem with SGD and momentum. Flax saves its
whole `TrainState` with `flax.serialization.to_bytes`; `eqx_bn.interop.read_msgpack`
reads it back without Flax and `TrainState.from_flax` resumes it: `params` and
`batch_stats` go into `eqx_bn.models.SeedMLP` and its `eqx.nn.State`, the momentum
into the optimiser state, and `step` carries over. So Equinox continues exactly
where Flax stopped: its first held-out loss is Flax's last, and it ends where Flax,
continued on the same batches, ends too (a fresh optimiser, its momentum lost,
would not). At the end `TrainState.to_flax` hands the run back to Flax.
"""

import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import Progress, parser, runtime

from eqx_bn.interop import read_msgpack, write_msgpack
from eqx_bn.models import SeedMLP
from eqx_bn.train import TrainState, make_eval_step, make_train_step

try:
    import flax.linen as nn
    import flax.serialization
    from flax.training import train_state
except ImportError:
    nn = None

LEARNING_RATE = 0.02
MOMENTUM = 0.9
BATCH = 32


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((768, 3)).astype(np.float32)
    target = np.maximum(x[:, :1] + x[:, 1:2], 0) - 0.5 * x[:, 2:]
    y = target + 0.05 * rng.standard_normal((768, 1))
    y = y.astype(np.float32)
    return (x[:512], y[:512]), (x[512:], y[512:])


def batches(train, steps, seed):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(train[0]), BATCH, replace=False)
        yield train[0][idx], train[1][idx]


# -- Flax: the guide's model, TrainState and steps ------------------------------


def flax_parts():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(4)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.99)(x)
            return nn.Dense(1)(nn.relu(x))

    class FlaxTrainState(train_state.TrainState):
        batch_stats: dict

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
        variables = {"params": ts.params, "batch_stats": ts.batch_stats}
        pred = ts.apply_fn(variables, batch[0], train=False)
        return jnp.mean((pred - batch[1]) ** 2)

    return MLP(), FlaxTrainState, train_step, eval_step


# -- Equinox: the loss, written once for training and evaluation ----------------


def loss_fn(model, state, batch):
    x, y = batch
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    pred, state = batched(x, state)
    return jnp.mean((pred - y) ** 2), (state, None)


def main(argv=None) -> dict:
    args = parser(__doc__, out_help="the Flax and Equinox checkpoints").parse_args(argv)
    if nn is None:
        print("This example trains in Flax first: pip install 'eqx_bn[flax]'.")
        return {}
    with runtime("flax_to_equinox") as timing:
        out = run(args)
    return out | {"wall_s": timing["seconds"]}


def run(args) -> dict:
    steps, every = (20, 10) if args.smoke else (300, 50)
    train, test = make_data()
    tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
    log = []

    def report(who, step, test_loss):
        log.append((who, step, float(test_loss)))

    def epoch_end(progress, who, step, loss, test_loss):
        report(who, step, test_loss)
        done = step - (0 if who == "Flax" else steps)
        progress.epoch(
            done // every,
            steps // every,
            step=step,
            batch_loss=float(loss),
            test_loss=float(test_loss),
        )

    # 1. Train in Flax and save the whole TrainState.
    module, FlaxTrainState, flax_train, flax_eval = flax_parts()
    variables = module.init(jax.random.key(0), train[0][:BATCH], train=False)
    fts = FlaxTrainState.create(
        apply_fn=module.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
    )
    report("Flax", 0, flax_eval(fts, test))
    data = list(batches(train, 2 * steps, seed=1))
    flax_batches, eqx_batches = data[:steps], data[steps:]
    print(f"Flax trains {steps} steps (an epoch here: {every} steps):")
    with Progress(steps, "Flax") as progress:
        for batch in flax_batches:
            fts, loss = flax_train(fts, batch)
            progress.step()
            if int(fts.step) % every == 0:
                epoch_end(progress, "Flax", int(fts.step), loss, flax_eval(fts, test))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "flax_seed_mlp.msgpack"
    path.write_bytes(flax.serialization.to_bytes(fts))
    print(f"saved the Flax TrainState to {path} ({path.stat().st_size} bytes)")

    # 2. Read it without Flax and resume it in Equinox, momentum included.
    checkpoint = read_msgpack(path)
    print("checkpoint entries:", sorted(checkpoint))
    model, state = eqx.nn.make_with_state(SeedMLP)(3, key=jax.random.key(0))
    ts = TrainState.from_flax(model, state, checkpoint, tx)
    train_step, eval_step = make_train_step(loss_fn), make_eval_step(loss_fn)
    first_eval = float(eval_step(ts, test)[0])
    print(f"resumed at step {int(ts.step)} in {type(model).__name__}; Equinox goes on:")
    report("Equinox", int(ts.step), first_eval)
    # The same start with a fresh optimiser (the Flax values only, momentum lost).
    fresh = TrainState.create(ts.model, ts.state, tx).replace(step=ts.step)
    tick = time.perf_counter()
    with Progress(steps, "Equinox") as progress:
        for batch in eqx_batches:
            ts, loss, _ = train_step(ts, batch)
            progress.step()
            if int(ts.step) % every == 0:
                test_loss = eval_step(ts, test)[0]
                epoch_end(progress, "Equinox", int(ts.step), loss, test_loss)
    eqx_seconds = time.perf_counter() - tick  # the resumed run alone
    for batch in eqx_batches:  # not timed: a comparison, not the run reported
        fresh, _, _ = train_step(fresh, batch)

    flax_last = log[[who for who, *_ in log].index("Equinox") - 1][2]
    print(
        f"\nfirst Equinox held-out loss {first_eval:.7f}, last Flax one "
        f"{flax_last:.7f}: difference {abs(first_eval - flax_last):.1e}"
    )
    # Had Flax gone on with the same batches, it would have ended at the same loss.
    for batch in eqx_batches:
        fts, _ = flax_train(fts, batch)
    flax_end, eqx_end = float(flax_eval(fts, test)), log[-1][2]
    fresh_end = float(eval_step(fresh, test)[0])
    print(
        f"Flax continued on the same batches to step {int(fts.step)}: held-out loss "
        f"{flax_end:.7f}, Equinox {eqx_end:.7f} "
        f"(difference {abs(flax_end - eqx_end):.1e}); with a fresh optimiser "
        f"instead of Flax's momentum: {fresh_end:.7f}"
    )

    # 3. And back: the Equinox run as a Flax TrainState, which Flax restores.
    back_path = out / "equinox_seed_mlp.msgpack"
    write_msgpack(back_path, ts.to_flax())
    back = flax.serialization.from_bytes(fts, back_path.read_bytes())
    flax_back = float(flax_eval(back, test))
    print(
        f"saved the Equinox TrainState for Flax to {back_path}; Flax restores it at "
        f"step {int(back.step)} with held-out loss {flax_back:.7f} "
        f"({eqx_seconds:.1f} s of Equinox training)"
    )
    return dict(
        log=log,
        first_eval=first_eval,
        flax_last=flax_last,
        flax_end=flax_end,
        eqx_end=eqx_end,
        fresh_end=fresh_end,
        flax_back=flax_back,
        back_step=int(back.step),
    )


if __name__ == "__main__":
    main(sys.argv[1:])

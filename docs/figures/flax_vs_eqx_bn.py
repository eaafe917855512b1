"""Trains the model of "BatchNorm in Equinox" (docs/flax-guide.md) in Flax and in
eqx_bn from the same start, and plots both runs' curves on one axis, with their
difference below: docs/figures/flax_vs_eqx_bn.svg.

    python docs/figures/flax_vs_eqx_bn.py [--steps 300] [--out docs/figures]

The models, the data, the loss and the steps are the page's: Flax's
`Dense(4) -> BatchNorm -> relu -> Dense(2)` with a `TrainState` carrying
`batch_stats`, and the same model in Equinox whose weights `load_flax` copied from
Flax's, trained with `eqx_bn.train.make_train_step`. Both see the same batches.
"""

import argparse
import pathlib

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax.training import train_state

import eqx_bn
from eqx_bn.train import TrainState, make_eval_step, make_train_step

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "eqx_bn"  # the same file from the same data
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

HERE = pathlib.Path(__file__).resolve().parent


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(features=4)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        return nn.Dense(features=2)(x)


class MLP(eqx.Module):
    dense_0: eqx.nn.Linear
    norm: eqx_bn.BatchNorm
    dense_1: eqx.nn.Linear

    def __init__(self, in_features, num_classes, *, key):
        k0, k1 = jax.random.split(key)
        self.dense_0 = eqx.nn.Linear(in_features, 4, key=k0)
        self.norm = eqx_bn.BatchNorm(4)
        self.dense_1 = eqx.nn.Linear(4, num_classes, key=k1)

    def __call__(self, x, state):
        x, state = self.norm(self.dense_0(x), state)
        return self.dense_1(jax.nn.relu(x)), state


def data(n, key):
    """Three features; the class is the sign of a noisy product of two of them."""
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (n, 3))
    noise = 0.3 * jax.random.normal(kn, (n,))
    return x, (x[:, 0] * x[:, 1] + x[:, 2] + noise > 0).astype(jnp.int32)


def flax_run(x, labels, batches, x_test, y_test, lr):
    mlp = FlaxMLP()
    variables = mlp.init(jax.random.key(0), x[:8], train=False)

    class FlaxTrainState(train_state.TrainState):
        batch_stats: dict

    @jax.jit
    def train_step(ts, batch):
        xb, yb = batch

        def loss_fn(params):
            logits, updates = ts.apply_fn(
                {"params": params, "batch_stats": ts.batch_stats},
                xb,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            return loss, updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(ts.params)
        ts = ts.apply_gradients(grads=grads)
        return ts.replace(batch_stats=updates["batch_stats"]), loss

    @jax.jit
    def accuracy(ts, xb, yb):
        logits = ts.apply_fn(
            {"params": ts.params, "batch_stats": ts.batch_stats}, xb, train=False
        )
        return jnp.mean(jnp.argmax(logits, -1) == yb)

    ts = FlaxTrainState.create(
        apply_fn=mlp.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.sgd(lr),
    )
    losses, accs = [], []
    for idx in batches:
        ts, loss = train_step(ts, (x[idx], labels[idx]))
        losses.append(float(loss))
        accs.append(float(accuracy(ts, x_test, y_test)))
    return variables, np.array(losses), np.array(accs)


def eqx_bn_run(variables, x, labels, batches, x_test, y_test, lr):
    model, state = eqx.nn.make_with_state(MLP)(3, 2, key=jax.random.key(0))
    model, state = eqx_bn.interop.load_flax(model, state, variables)

    def loss_fn(model, state, batch):
        xb, yb = batch
        batched = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )
        logits, state = batched(xb, state)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, (state, jnp.mean(jnp.argmax(logits, -1) == yb))

    train_step, eval_step = make_train_step(loss_fn), make_eval_step(loss_fn)
    ts = TrainState.create(model, state, optax.sgd(lr))
    losses, accs = [], []
    for idx in batches:
        ts, loss, _ = train_step(ts, (x[idx], labels[idx]))
        losses.append(float(loss))
        accs.append(float(eval_step(ts, (x_test, y_test))[1][1]))
    return np.array(losses), np.array(accs)


def plot(steps, flax, ours, path):
    (f_loss, f_acc), (e_loss, e_acc) = flax, ours
    fig, axes = plt.subplots(
        2, 2, figsize=(9, 5), sharex=True, height_ratios=(3, 1.3), layout="constrained"
    )
    for col, (name, f, e) in enumerate(
        [("training loss (batch)", f_loss, e_loss), ("eval accuracy", f_acc, e_acc)]
    ):
        top, bottom = axes[0, col], axes[1, col]
        top.plot(steps, f, lw=4, color="#f4a261", label="flax.linen")
        top.plot(steps, e, lw=1.2, color="#264653", label="eqx_bn")
        top.set_title(name)
        if col == 0:
            top.legend(frameon=False)
        diff = np.abs(f - e)
        # Equal values (a difference of 0) are drawn on the floor, 1e-9.
        bottom.semilogy(steps, np.maximum(diff, 1e-9), lw=1, color="#264653")
        bottom.set_ylim(5e-10, 1e-3)
        bottom.set_ylabel("|flax - eqx_bn|")
        bottom.set_xlabel("step")
        bottom.text(
            0.98,
            0.9,
            f"largest: {diff.max():.1e}" if diff.max() else "identical",
            transform=bottom.transAxes,
            ha="right",
            va="top",
        )
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=pathlib.Path, default=HERE)
    args = parser.parse_args(argv)
    x, labels = data(512, jax.random.key(1))
    x_test, y_test = data(256, jax.random.key(2))
    order = np.random.default_rng(0)
    batches = [order.choice(len(x), 32, replace=False) for _ in range(args.steps)]
    variables, f_loss, f_acc = flax_run(x, labels, batches, x_test, y_test, 0.1)
    e_loss, e_acc = eqx_bn_run(variables, x, labels, batches, x_test, y_test, 0.1)
    print(
        f"{args.steps} steps: final loss {f_loss[-1]:.6f} (Flax) {e_loss[-1]:.6f} "
        f"(eqx_bn); eval accuracy {f_acc[-1]:.4f} / {e_acc[-1]:.4f}; largest "
        f"difference: loss {np.abs(f_loss - e_loss).max():.1e}, accuracy "
        f"{np.abs(f_acc - e_acc).max():.1e}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    plot(
        np.arange(1, args.steps + 1),
        (f_loss, f_acc),
        (e_loss, e_acc),
        args.out / "flax_vs_eqx_bn.svg",
    )


if __name__ == "__main__":
    main()

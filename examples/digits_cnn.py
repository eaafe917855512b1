"""Train a small CNN with BatchNorm on scikit-learn's handwritten digits.

    python examples/digits_cnn.py            # full run: >= 97% held-out accuracy
    python examples/digits_cnn.py --smoke    # a few steps, for the tests
    python examples/digits_cnn.py --out DIR  # where the plot goes (default ./outputs)

The data (`sklearn.datasets.load_digits`: 1797 grey 8x8 images, 10 classes) ships
with scikit-learn, so this runs offline. The workflow is Flax's BatchNorm guide with
an explicit State: the loss returns the State the model gave back, `make_train_step`
threads it into the `TrainState`, and `make_eval_step` runs the model in inference
mode, with the running averages.
"""

import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from _common import Progress, batches, digits, parser, runtime, save_figure

import eqx_bn
from eqx_bn.train import TrainState, make_eval_step, make_train_step

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)


class CNN(eqx.Module):
    """conv-BN-relu x2, max-pool, dense-BN-relu, dense. One image `(1, 8, 8)` at a
    time; the batch is the vmap axis `"batch"` that the BatchNorms reduce over."""

    conv1: eqx.nn.Conv2d
    norm1: eqx_bn.BatchNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx_bn.BatchNorm
    pool: eqx.nn.MaxPool2d
    dense1: eqx.nn.Linear
    norm3: eqx_bn.BatchNorm
    dense2: eqx.nn.Linear

    def __init__(self, key, width=16):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        # No bias before a BatchNorm: it would be subtracted right away, and its
        # gradient is pure rounding noise (which Adam would amplify).
        self.conv1 = eqx.nn.Conv2d(1, width, 3, padding=1, use_bias=False, key=k1)
        self.norm1 = eqx_bn.BatchNorm(width, momentum=0.9)
        self.conv2 = eqx.nn.Conv2d(width, width, 3, padding=1, use_bias=False, key=k2)
        self.norm2 = eqx_bn.BatchNorm(width, momentum=0.9)
        self.pool = eqx.nn.MaxPool2d(2, stride=2)
        self.dense1 = eqx.nn.Linear(width * 4 * 4, 128, use_bias=False, key=k3)
        self.norm3 = eqx_bn.BatchNorm(128, momentum=0.9)
        self.dense2 = eqx.nn.Linear(128, 10, key=k4)

    def __call__(self, x, state):
        x, state = self.norm1(self.conv1(x), state)
        x, state = self.norm2(self.conv2(jax.nn.relu(x)), state)
        x = self.pool(jax.nn.relu(x)).reshape(-1)
        x, state = self.norm3(self.dense1(x), state)
        return self.dense2(jax.nn.relu(x)), state


def loss_fn(model, state, batch):
    """Cross-entropy of a batch; the aux output counts the correct predictions."""
    images, labels = batch
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    logits, state = batched(images, state)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
    return loss, (state, correct)


def evaluate(eval_step, ts, x, y):
    loss, (_, correct) = eval_step(ts, (x, y))
    return float(loss), float(correct) / len(x)


def plot(history, path: pathlib.Path):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(history["step"], history["train_loss"], lw=0.8, label="train (batch)")
    ax_loss.plot(history["eval_step"], history["test_loss"], "o-", label="held-out")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="Loss")
    ax_loss.legend()
    ax_acc.plot(history["eval_step"], history["test_acc"], "o-", label="held-out")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="Held-out accuracy")
    ax_acc.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    with runtime("digits_cnn") as timing:
        out = run(args)
    return out | {"wall_s": timing["seconds"]}


def run(args) -> dict:
    epochs = args.epochs or (2 if args.smoke else 15)
    batch_size = 64
    x_train, y_train, x_test, y_test = digits(
        512 if args.smoke else None, channels="first"
    )
    steps = epochs * (len(x_train) // batch_size)
    print(
        f"digits: {len(x_train)} training and {len(x_test)} held-out images, "
        f"{epochs} epochs of {len(x_train) // batch_size} steps"
    )

    model, state = eqx.nn.make_with_state(CNN)(jax.random.key(args.seed))
    schedule = optax.cosine_decay_schedule(3e-3, steps)
    ts = TrainState.create(model, state, optax.adam(schedule))
    train_step, eval_step = make_train_step(loss_fn), make_eval_step(loss_fn)

    rng = np.random.default_rng(args.seed)
    history = {
        k: [] for k in ("step", "train_loss", "eval_step", "test_loss", "test_acc")
    }
    compute = 0.0
    with Progress(steps, "training") as progress:
        for epoch in range(epochs):
            tick = time.perf_counter()
            for batch in batches(x_train, y_train, batch_size, rng):
                ts, loss, _ = train_step(ts, batch)
                if not history["step"]:  # the step is traced and compiled here
                    jax.block_until_ready(loss)
                    first_step = time.perf_counter() - tick
                history["step"].append(int(ts.step))
                history["train_loss"].append(float(loss))
                progress.step()
            test_loss, test_acc = evaluate(eval_step, ts, x_test, y_test)
            compute += time.perf_counter() - tick
            history["eval_step"].append(int(ts.step))
            history["test_loss"].append(test_loss)
            history["test_acc"].append(test_acc)
            progress.epoch(epoch + 1, epochs, train_loss=float(loss), test_acc=test_acc)

    plot_path = pathlib.Path(args.out) / "digits_cnn.png"
    plot(history, plot_path)
    print(
        f"held-out accuracy: {test_acc:.4f} ({round(test_acc * len(x_test))}/"
        f"{len(x_test)}), loss {test_loss:.4f}"
    )
    print(
        f"time: {compute:.1f} s training and evaluation, of which {first_step:.1f} s "
        f"the first step (compilation); plot: {plot_path}"
    )
    return dict(
        test_acc=test_acc,
        test_loss=test_loss,
        steps=int(ts.step),
        compute_s=compute,
        first_step_s=first_step,
        plot=str(plot_path),
    )


def _parser():
    result = parser(__doc__, out_help="the loss/accuracy plot (digits_cnn.png)")
    result.add_argument("--epochs", type=int, default=None)
    result.add_argument("--seed", type=int, default=0)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

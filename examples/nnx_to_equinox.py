"""Train a CNN in Flax NNX, save it, carry on in Equinox with eqx_bn, and go back.

    python examples/nnx_to_equinox.py            # 4 NNX epochs, then 4 Equinox ones
    python examples/nnx_to_equinox.py --smoke    # a few steps of each
    python examples/nnx_to_equinox.py --out DIR  # where the checkpoints are written

The model is a small BatchNorm CNN on scikit-learn's handwritten digits (offline
data). NNX trains it with plain SGD and saves `nnx.state(model)` with Orbax (and,
as a pure dict, with msgpack). `eqx_bn.interop.read_checkpoint` reads it back
without Flax, and `eqx_bn.interop.load_flax` puts the parameters and running
statistics into the hand-written Equinox model below and its `eqx.nn.State`: the
attribute names of the NNX model are the field names of the Equinox one. The two
models then agree on the held-out logits to float32 rounding; Equinox continues
training where NNX stopped (NNX, continued on the same batches, ends at the same
loss), and `eqx_bn.interop.export_nnx` hands the result back to NNX.
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import Progress, batches, digits, parser, runtime

import eqx_bn
from eqx_bn.interop import export_nnx, load_flax, read_checkpoint, write_msgpack
from eqx_bn.train import TrainState, make_eval_step, make_train_step

try:
    import orbax.checkpoint as ocp
    from flax import nnx
except ImportError:
    nnx = None

LEARNING_RATE = 0.05
BATCH = 64
WIDTH = 16

# -- Equinox: the model, written once, and its loss --------------------------------


class CNN(eqx.Module):
    """conv-BN-relu x2, max-pool, dense-BN-relu, dense, on one image `(1, 8, 8)`.

    The field names are the NNX model's attribute names, so `load_flax` pairs the
    two with no mapping.
    """

    conv1: eqx.nn.Conv2d
    norm1: eqx_bn.BatchNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx_bn.BatchNorm
    pool: eqx.nn.MaxPool2d
    dense1: eqx.nn.Linear
    norm3: eqx_bn.BatchNorm
    dense2: eqx.nn.Linear

    def __init__(self, key, width=WIDTH):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        # NNX's `padding="SAME"` with a 3x3 kernel and stride 1 is padding=1.
        self.conv1 = eqx.nn.Conv2d(1, width, 3, padding=1, use_bias=False, key=k1)
        self.norm1 = eqx_bn.BatchNorm(width, momentum=0.9)
        self.conv2 = eqx.nn.Conv2d(width, width, 3, padding=1, use_bias=False, key=k2)
        self.norm2 = eqx_bn.BatchNorm(width, momentum=0.9)
        self.pool = eqx.nn.MaxPool2d(2, stride=2)
        self.dense1 = eqx.nn.Linear(width * 4 * 4, 64, use_bias=False, key=k3)
        self.norm3 = eqx_bn.BatchNorm(64, momentum=0.9)
        self.dense2 = eqx.nn.Linear(64, 10, key=k4)

    def __call__(self, x, state):
        x, state = self.norm1(self.conv1(x), state)
        x, state = self.norm2(self.conv2(jax.nn.relu(x)), state)
        x = self.pool(jax.nn.relu(x))
        # Flatten in NNX's (height, width, channel) order: dense1's kernel rows
        # were learnt in that order.
        x = jnp.transpose(x, (1, 2, 0)).reshape(-1)
        x, state = self.norm3(self.dense1(x), state)
        return self.dense2(jax.nn.relu(x)), state


def loss_fn(model, state, batch):
    images, labels = batch
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    logits, state = batched(images, state)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (state, logits)


# -- NNX: the same model as a Flax user writes it ----------------------------------


def nnx_parts():
    class NnxCNN(nnx.Module):
        def __init__(self, width, *, rngs):
            self.conv1 = nnx.Conv(1, width, (3, 3), use_bias=False, rngs=rngs)
            self.norm1 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
            self.conv2 = nnx.Conv(width, width, (3, 3), use_bias=False, rngs=rngs)
            self.norm2 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
            self.dense1 = nnx.Linear(width * 4 * 4, 64, use_bias=False, rngs=rngs)
            self.norm3 = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
            self.dense2 = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):  # x: (batch, 8, 8, 1), channels last
            x = nnx.relu(self.norm1(self.conv1(x)))
            x = nnx.relu(self.norm2(self.conv2(x)))
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            x = nnx.relu(self.norm3(self.dense1(x.reshape(x.shape[0], -1))))
            return self.dense2(x)

    @nnx.jit
    def train_step(model, optimizer, images, labels):
        def loss(model):
            logits = model(images)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, labels
            ).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    @nnx.jit
    def logits(model, images):
        return model(images)

    return NnxCNN, train_step, logits


# -- The data -----------------------------------------------------------------------


def epochs_of_batches(x, y, epochs, seed):
    rng = np.random.default_rng(seed)
    return [batch for _ in range(epochs) for batch in batches(x, y, BATCH, rng)]


def channels_first(images):
    return np.moveaxis(images, -1, 1)


def accuracy(logits, labels):
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == labels))


def main(argv=None) -> dict:
    args = parser(__doc__, out_help="the NNX checkpoints").parse_args(argv)
    if nnx is None:
        print(
            "This example trains in Flax NNX first: pip install 'eqx_bn[flax,orbax]'."
        )
        return {}
    with runtime("nnx_to_equinox"):
        return _run(args)


def _run(args) -> dict:
    epochs = 1 if args.smoke else 4
    x_train, y_train, x_test, y_test = digits(
        256 if args.smoke else None, channels="last"
    )
    data = epochs_of_batches(x_train, y_train, 2 * epochs, seed=1)
    nnx_batches, eqx_batches = data[: len(data) // 2], data[len(data) // 2 :]
    NnxCNN, nnx_train, nnx_logits = nnx_parts()

    # 1. Train in NNX and save its state, as a Flax user does.
    model = NnxCNN(WIDTH, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE), wrt=nnx.Param)
    per_epoch = len(nnx_batches) // epochs
    with Progress(len(nnx_batches), "NNX") as progress:
        for i, (images, labels) in enumerate(nnx_batches, 1):
            loss = nnx_train(model, optimizer, images, labels)
            progress.step()
            if i % per_epoch == 0:
                progress.epoch(i // per_epoch, epochs, batch_loss=float(loss))
    model.eval()
    nnx_test = nnx_logits(model, x_test)
    print(
        f"NNX after {len(nnx_batches)} steps: held-out accuracy "
        f"{accuracy(nnx_test, y_test):.4f}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    orbax_path = (args.out / "nnx_digits").resolve()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(orbax_path, nnx.state(model), force=True)
    msgpack_path = args.out / "nnx_digits.msgpack"
    write_msgpack(msgpack_path, nnx.to_pure_dict(nnx.state(model)))
    print(f"saved nnx.state(model) to {orbax_path} (Orbax) and {msgpack_path}")

    # 2. Read it back (no Flax needed for this), convert, evaluate in Equinox.
    checkpoint = read_checkpoint(orbax_path)
    eqx_model, state = eqx.nn.make_with_state(CNN)(jax.random.key(0))
    eqx_model, state = load_flax(eqx_model, state, checkpoint)
    from_msgpack = load_flax(eqx_model, state, read_checkpoint(msgpack_path))
    same_files = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves((eqx_model, state)), jax.tree.leaves(from_msgpack)
        )
    )
    ts = TrainState.create(eqx_model, state, optax.sgd(LEARNING_RATE))
    train_step, eval_step = make_train_step(loss_fn), make_eval_step(loss_fn)
    test = (channels_first(x_test), y_test)
    _, (_, eqx_test) = eval_step(ts, test)
    logit_diff = float(np.max(np.abs(np.asarray(eqx_test) - np.asarray(nnx_test))))
    print(
        f"converted into {type(eqx_model).__name__}: held-out accuracy "
        f"{accuracy(eqx_test, y_test):.4f}; logits differ from NNX's by at most "
        f"{logit_diff:.1e}; Orbax and msgpack give the same model: {same_files}"
    )

    # 3. Carry on in Equinox; NNX, continued on the same batches, ends the same.
    with Progress(len(eqx_batches), "Equinox") as progress:
        for i, (images, labels) in enumerate(eqx_batches, 1):
            ts, loss, _ = train_step(ts, (channels_first(images), labels))
            progress.step()
            if i % per_epoch == 0:
                progress.epoch(i // per_epoch, epochs, batch_loss=float(loss))
    eqx_loss, (_, eqx_test) = eval_step(ts, test)
    model.train()
    for images, labels in eqx_batches:
        nnx_train(model, optimizer, images, labels)
    model.eval()
    nnx_test = nnx_logits(model, x_test)
    end_diff = float(np.max(np.abs(np.asarray(eqx_test) - np.asarray(nnx_test))))
    print(
        f"after {len(eqx_batches)} more steps each: held-out accuracy Equinox "
        f"{accuracy(eqx_test, y_test):.4f}, NNX {accuracy(nnx_test, y_test):.4f}; "
        f"logits differ by at most {end_diff:.1e}"
    )

    # 4. Back to NNX: a fresh NNX model takes the Equinox weights and statistics.
    fresh = NnxCNN(WIDTH, rngs=nnx.Rngs(1))
    _, nnx_state = nnx.split(fresh)
    nnx.replace_by_pure_dict(nnx_state, export_nnx(ts.model, ts.state))
    nnx.update(fresh, nnx_state)
    fresh.eval()
    back_diff = float(
        np.max(np.abs(np.asarray(nnx_logits(fresh, x_test)) - np.asarray(eqx_test)))
    )
    print(
        f"exported back to NNX: its logits differ from Equinox's by at most "
        f"{back_diff:.1e}"
    )
    return dict(
        nnx_steps=len(nnx_batches),
        eqx_steps=len(eqx_batches),
        logit_diff=logit_diff,
        end_diff=end_diff,
        back_diff=back_diff,
        same_files=same_files,
        eqx_accuracy=accuracy(eqx_test, y_test),
        nnx_accuracy=accuracy(nnx_test, y_test),
        eqx_loss=float(eqx_loss),
    )


if __name__ == "__main__":
    main(sys.argv[1:])

"""Shape-check your own model: a CNN annotated with jaxtyping, eqx_bn.typecheck on.

    python examples/typed_model.py            # train, checked; then two mistakes
    python examples/typed_model.py --smoke    # a few steps, for the tests
    python examples/typed_model.py --out DIR  # where the caught messages are written

Every array in the model, its helpers and its loss carries a jaxtyping annotation
that names its dimensions (`"channels height width"`), and `eqx_bn.typecheck`
checks them with beartype. Under `jax.jit` (here inside `make_train_step`) the check
runs once, when the step is traced, so training costs the same as without it
(`benchmarks/typecheck_overhead.py` measures it). Then two common mistakes are made
on purpose - images without their channel axis, and a convolution that shrinks the
image - and the messages that catch them at trace time are printed: each names the
argument, what it got, and the size every named dimension had.

The data is scikit-learn's digits (1797 grey 8x8 images, 10 classes), which ships
with scikit-learn, so this runs offline.
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import Progress, digits, parser, runtime
from jaxtyping import Array, Float, Int, PRNGKeyArray, TypeCheckError

import eqx_bn
from eqx_bn.train import TrainState, make_eval_step, make_train_step

Images = Float[Array, "batch 1 8 8"]
Labels = Int[Array, " batch"]


@eqx_bn.typecheck
def conv_block(
    conv: eqx.nn.Conv2d,
    norm: eqx_bn.BatchNorm,
    x: Float[Array, "in_channels height width"],
    state: eqx.nn.State,
) -> tuple[Float[Array, "out_channels height width"], eqx.nn.State]:
    """conv -> BatchNorm -> relu, keeping the image size (`height`, `width`)."""
    h, state = norm(conv(x), state)
    return jax.nn.relu(h), state


@eqx_bn.typecheck
def global_pool(x: Float[Array, "channels height width"]) -> Float[Array, " channels"]:
    return jnp.mean(x, axis=(1, 2))


class TypedCNN(eqx.Module):
    """Two conv blocks, a global average pool and a linear head; one image at a time
    (the batch is the vmap axis `"batch"` that the BatchNorms reduce over)."""

    conv1: eqx.nn.Conv2d
    norm1: eqx_bn.BatchNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx_bn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, *, key: PRNGKeyArray, width: int = 32, padding: int = 1):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, width, 3, padding=1, use_bias=False, key=k1)
        self.norm1 = eqx_bn.BatchNorm(width, momentum=0.9)
        # `padding` is here to make the second mistake below: 0 shrinks the image.
        self.conv2 = eqx.nn.Conv2d(
            width, width, 3, padding=padding, use_bias=False, key=k2
        )
        self.norm2 = eqx_bn.BatchNorm(width, momentum=0.9)
        self.head = eqx.nn.Linear(width, 10, key=k3)

    @eqx_bn.typecheck
    def __call__(
        self, image: Float[Array, "1 height width"], state: eqx.nn.State
    ) -> tuple[Float[Array, " 10"], eqx.nn.State]:
        h, state = conv_block(self.conv1, self.norm1, image, state)
        h, state = conv_block(self.conv2, self.norm2, h, state)
        return self.head(global_pool(h)), state


@eqx_bn.typecheck
def loss_fn(
    model: TypedCNN, state: eqx.nn.State, batch: tuple[Images, Labels]
) -> tuple[Float[Array, ""], tuple[eqx.nn.State, Int[Array, ""]]]:
    images, labels = batch
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    logits, state = batched(images, state)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
    return loss, (state, correct)


def summary(err: TypeCheckError) -> str:
    """jaxtyping's message without the dump of every argument: where, what it got,
    what was expected, and the size each named dimension was bound to."""
    text = str(err)
    head = text.split("\n----------------------\n")[0]
    sizes = text.find(_SIZES)
    return head if sizes < 0 else f"{head}\n{text[sizes:].strip()}"


_SIZES = "The current values for each jaxtyping axis annotation are as follows."


def mistakes(ts: TrainState, x: np.ndarray, y: np.ndarray) -> dict[str, str]:
    """Two mistakes, each caught when the step is traced (nothing runs)."""
    caught = {}
    eval_step = make_eval_step(loss_fn)
    # 1. `digits.images` is (N, 8, 8): the channel axis the model expects is missing.
    try:
        eval_step(ts, (jnp.asarray(x[:, 0]), jnp.asarray(y)))
    except TypeCheckError as err:
        caught["images without their channel axis"] = summary(err)
    # 2. A convolution without padding shrinks 8x8 to 6x6, which conv_block's
    #    annotation ("out_channels height width", same height and width) forbids.
    model, state = eqx.nn.make_with_state(TypedCNN)(key=jax.random.key(1), padding=0)
    try:
        eqx.filter_eval_shape(loss_fn, model, state, (jnp.asarray(x), jnp.asarray(y)))
    except TypeCheckError as err:
        caught["a convolution that shrinks the image"] = summary(err)
    return caught


def main(argv=None) -> dict:
    args = parser(__doc__, out_help="typed_model_errors.txt").parse_args(argv)
    with runtime("typed_model") as timing:
        epochs = 1 if args.smoke else 10
        batch_size = 64
        x_train, y_train, x_test, y_test = digits(
            256 if args.smoke else None, channels="first"
        )
        per_epoch = len(x_train) // batch_size
        model, state = eqx.nn.make_with_state(TypedCNN)(key=jax.random.key(0))
        schedule = optax.cosine_decay_schedule(1e-2, epochs * per_epoch)
        ts = TrainState.create(model, state, optax.adam(schedule))
        train_step, eval_step = make_train_step(loss_fn), make_eval_step(loss_fn)
        test = (jnp.asarray(x_test), jnp.asarray(y_test))
        rng = np.random.default_rng(0)
        with Progress(epochs * per_epoch, "training (checked)") as progress:
            for epoch in range(epochs):
                order = rng.permutation(len(x_train))
                for i in range(per_epoch):
                    idx = order[i * batch_size : (i + 1) * batch_size]
                    batch = (jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
                    ts, loss, _ = train_step(ts, batch)
                    progress.step()
                test_loss, (_, correct) = eval_step(ts, test)
                test_acc = float(correct) / len(x_test)
                progress.epoch(epoch + 1, epochs, test_acc=test_acc)
        print(f"held-out accuracy: {test_acc:.4f}, loss {float(test_loss):.4f}")

        caught = mistakes(ts, x_test, y_test)
        report = []
        for what, message in caught.items():
            report.append(f"--- caught: {what} ---\n{message}\n")
        print("\n".join(report))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "typed_model_errors.txt").write_text("\n".join(report))
    return dict(
        test_acc=test_acc,
        test_loss=float(test_loss),
        steps=int(ts.step),
        caught=caught,
        seconds=timing["seconds"],
    )


if __name__ == "__main__":
    main(sys.argv[1:])

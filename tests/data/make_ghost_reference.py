"""Makes the Ghost BatchNorm reference for issue 24 under `tests/data/tf_keras/`, and
checks the NumPy reference `ghost_reference.py` against tf_keras, so that the tests
need neither TensorFlow nor tf_keras. The semantics are written out, with citations,
in `tests/data/REFERENCES.md`.

Run it with tensorflow-cpu and tf-keras installed (a separate environment: tf_keras
pins its own Keras 2):

    python tests/data/make_ghost_reference.py

For each config in `CONFIGS` (channels-last images, plain vectors), a
`tf_keras.layers.BatchNormalization(virtual_batch_size=V, momentum=0.9)` with random
gamma, beta and initial moving statistics runs `STEPS` training calls; per step `t`
(stacked on a leading step axis) it records the input `x`, a cotangent `dy`, the
output `y`, the gradients `dx`, `dgamma`, `dbeta` of `sum(y * dy)`, and the moving
mean and variance after the step; then inference (`eval/y`) on a batch of 3, which
`V` need not divide. `gamma`, `beta`, `moving_mean0`, `moving_variance0` are the
starting values, as `(channels,)` (tf_keras stores them as `(1, ..., 1, channels)`
with one more axis than the input: `weight_shape`). `groups` is the virtual batch of
each example, found by perturbing one example at a time and seeing which outputs
move.

Every float is computed by tf_keras in float64 (stored rounded to float32: the
reference) and in float32; `err/<key>` is the largest difference between the two, as
in `make_torch_reference.py`. The script also asserts that `ghost_reference.py`
gives tf_keras's float64 results (outputs and moving statistics) to 1e-12, and the
findings listed in `_check_findings`.
"""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ghost_reference import ghost_batch_norm, ghost_groups  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "tf_keras"
STEPS = 4
MOMENTUM = 0.9
EPSILON = 1e-3  # tf_keras's default

# name: (input shape, virtual_batch_size)
CONFIGS = {
    "image": ((8, 3, 2, 3), 2),  # 4 virtual batches of 2 images
    "vector": ((12, 5), 4),  # 3 virtual batches of 4 vectors
}


def _layer(channels, rank, virtual_batch_size, dtype, start):
    layer = tf_keras.layers.BatchNormalization(
        momentum=MOMENTUM,
        epsilon=EPSILON,
        virtual_batch_size=virtual_batch_size,
        dtype=dtype,
    )
    layer.build((None, *([1] * (rank - 2)), channels))
    assert layer.fused is False, "virtual batches never take the fused path"
    shape = (1,) * rank + (channels,)  # one more axis than the input
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    assert [w.name.split("/")[-1] for w in layer.weights] == [f"{n}:0" for n in names]
    assert all(tuple(w.shape) == shape for w in layer.weights)
    layer.set_weights([start[n].reshape(shape).astype(dtype) for n in names])
    return layer


def _run(config, start, xs, dys, x_eval, dtype) -> dict:
    shape, vbs = CONFIGS[config]
    layer = _layer(shape[-1], len(shape), vbs, dtype, start)
    out: dict[str, list] = {}
    for x, dy in zip(xs, dys):
        x = tf.constant(x.astype(dtype))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.constant(dy.astype(dtype)))
        dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
        for k, v in (
            ("y", y),
            ("dx", dx),
            ("dgamma", tf.reshape(dgamma, [-1])),
            ("dbeta", tf.reshape(dbeta, [-1])),
            ("moving_mean", tf.reshape(layer.moving_mean, [-1])),
            ("moving_variance", tf.reshape(layer.moving_variance, [-1])),
        ):
            out.setdefault(k, []).append(v.numpy())
    res = {k: np.stack(v) for k, v in out.items()}
    res["eval/y"] = layer(tf.constant(x_eval.astype(dtype)), training=False).numpy()
    return res


def _groups(config) -> np.ndarray:
    """Which outputs move when one example's input does: its virtual batch."""
    shape, vbs = CONFIGS[config]
    rng = np.random.RandomState(1)
    start = {
        "gamma": np.ones(shape[-1]),
        "beta": np.zeros(shape[-1]),
        "moving_mean": np.zeros(shape[-1]),
        "moving_variance": np.ones(shape[-1]),
    }
    layer = _layer(shape[-1], len(shape), vbs, "float64", start)
    x = rng.standard_normal(shape)
    base = layer(x, training=True).numpy()
    group = -np.ones(shape[0], np.int64)
    for n in range(shape[0]):
        bumped = x.copy()
        bumped[n] += 1.0 + rng.standard_normal(shape[1:])
        moved = np.any(
            layer(bumped, training=True).numpy() != base,
            axis=tuple(range(1, len(shape))),
        )
        members = np.flatnonzero(moved)
        assert n in members and len(members) == vbs, (n, members)
        group[n] = (
            group[members].max() if group[members].max() >= 0 else group.max() + 1
        )
    return group


def _check_findings() -> None:
    """What tf_keras does around virtual batches, asserted so that a rerun with
    another tf_keras says when it changes (see REFERENCES.md)."""
    x = np.random.RandomState(2).standard_normal((8, 3)).astype(np.float32)
    # A mask does not follow the reshape: any mask fails to broadcast.
    ghost = tf_keras.layers.BatchNormalization(virtual_batch_size=2)
    try:
        ghost(x, training=True, mask=tf.constant([True] * 6 + [False] * 2))
    except tf.errors.InvalidArgumentError:
        pass
    else:
        raise AssertionError("tf_keras now accepts a mask with virtual batches")
    # training passed as a symbolic tensor (unknown when traced): the batch is
    # reshaped to (-1, 1, ...) and the statistics cover the whole batch.
    ghost = tf_keras.layers.BatchNormalization(virtual_batch_size=2)
    plain = tf_keras.layers.BatchNormalization()

    @tf.function(input_signature=[tf.TensorSpec([8, 3]), tf.TensorSpec([], tf.bool)])
    def symbolic(x, training):
        return ghost(x, training=training)

    np.testing.assert_array_equal(
        symbolic(x, tf.constant(True)).numpy(), plain(x, training=True).numpy()
    )
    np.testing.assert_array_equal(
        ghost.moving_variance.numpy().ravel(), plain.moving_variance.numpy()
    )
    # Ghost BatchNorm never takes the fused path (checked in `_layer`), whose moving
    # variance is the unbiased one: plain float32 4-d BatchNorm tracks the unbiased
    # variance, the non-fused path (2-d, float64, fused=False, virtual batches) the
    # biased one.
    images = np.random.RandomState(3).standard_normal((4, 3, 2, 5)).astype(np.float32)
    for fused, ddof in ((None, 1), (False, 0)):
        layer = tf_keras.layers.BatchNormalization(momentum=0.0, fused=fused)
        layer(images, training=True)
        assert layer.fused is (fused is None)
        np.testing.assert_allclose(
            layer.moving_variance.numpy(), images.var((0, 1, 2), ddof=ddof), rtol=1e-5
        )
    # fused=True is refused; a batch the virtual batch size does not divide fails.
    try:
        tf_keras.layers.BatchNormalization(virtual_batch_size=2, fused=True)
    except ValueError:
        pass
    else:
        raise AssertionError("fused=True now allowed with virtual batches")
    try:
        tf_keras.layers.BatchNormalization(virtual_batch_size=3)(x, training=True)
    except tf.errors.InvalidArgumentError:
        pass
    else:
        raise AssertionError("an indivisible batch is now accepted")


def config_arrays(config: str) -> dict:
    """One config's recorded arrays (keys without the `config/` prefix), for `main`
    and for a live test to compare with tf_keras as installed."""
    shape, vbs = CONFIGS[config]
    c = shape[-1]
    rng = np.random.RandomState([24, list(CONFIGS).index(config)])
    start = {
        "gamma": (1.0 + 0.3 * rng.standard_normal(c)).astype(np.float32),
        "beta": (0.2 * rng.standard_normal(c)).astype(np.float32),
        "moving_mean": (0.5 * rng.standard_normal(c)).astype(np.float32),
        "moving_variance": (0.5 + rng.uniform(size=c)).astype(np.float32),
    }
    # Virtual batches far apart, so within- and whole-batch statistics differ.
    offsets = 2.0 * rng.standard_normal((shape[0] // vbs, *shape[1:]))
    tiles = (vbs,) + (1,) * (len(shape) - 1)
    xs = rng.standard_normal((STEPS, *shape)) * 1.5 + np.tile(offsets, tiles)
    xs = xs.astype(np.float32)
    dys = rng.standard_normal((STEPS, *shape)).astype(np.float32)
    x_eval = rng.standard_normal((3, *shape[1:])).astype(np.float32)
    f64 = _run(config, start, xs, dys, x_eval, "float64")
    f32 = _run(config, start, xs, dys, x_eval, "float32")
    _check_numpy_reference(config, start, xs, x_eval, f64)
    groups = _groups(config)
    np.testing.assert_array_equal(groups, ghost_groups(shape[0], vbs))

    arrays = {
        "virtual_batch_size": np.int64(vbs),
        "weight_shape": np.array((1,) * len(shape) + (c,), np.int64),
        "groups": groups,
        "x": xs,
        "dy": dys,
        "eval/x": x_eval,
    }
    for k, v in start.items():
        arrays[k + "0" if k.startswith("moving") else k] = v
    for k, ref in f64.items():
        arrays[k] = ref.astype(np.float32)
        arrays["err/" + k] = np.float64(np.max(np.abs(f32[k] - ref)))
    return arrays


def _check_numpy_reference(config, start, xs, x_eval, f64) -> None:
    """`ghost_reference.ghost_batch_norm` gives tf_keras's float64 results."""
    vbs = CONFIGS[config][1]
    kwargs = dict(virtual_batch_size=vbs, momentum=MOMENTUM, epsilon=EPSILON)
    mean = start["moving_mean"].astype(np.float64)
    var = start["moving_variance"].astype(np.float64)
    for t in range(STEPS):
        x = xs[t].astype(np.float64)
        y, mean, var = ghost_batch_norm(
            x, start["gamma"], start["beta"], mean, var, **kwargs
        )
        for got, key in ((y, "y"), (mean, "moving_mean"), (var, "moving_variance")):
            np.testing.assert_allclose(got, f64[key][t], rtol=0, atol=1e-12)
    x = x_eval.astype(np.float64)
    y, _, _ = ghost_batch_norm(
        x, start["gamma"], start["beta"], mean, var, training=False, **kwargs
    )
    np.testing.assert_allclose(y, f64["eval/y"], rtol=0, atol=1e-12)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    _check_findings()
    arrays = {"momentum": np.float64(MOMENTUM), "epsilon": np.float64(EPSILON)}
    for config in CONFIGS:
        for k, v in config_arrays(config).items():
            arrays[f"{config}/{k}"] = v
        print(f"{config}: groups {arrays[f'{config}/groups'].tolist()}")
    path = OUT / "ghost.npz"
    np.savez_compressed(path, **arrays)
    print(f"{path.name}: {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()

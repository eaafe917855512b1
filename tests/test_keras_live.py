"""Batch Renormalization against Keras 3 as installed (JAX backend), issue 24: the live
tier of `tests/test_renorm.py`, skipped where Keras is not installed (the `keras`
extra installs it; `.ci/run` does).

It checks that the recorded reference is still what Keras computes, and compares
eqx_bn with Keras on what the recording leaves out: masks, channels first, a layer
without scale and offset.
"""

import importlib.util
import os
import pathlib

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is imported
keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
    pytest.skip(
        f"Keras runs on {keras.backend.backend()}, not JAX", allow_module_level=True
    )

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import eqx_bn  # noqa: E402

pytestmark = pytest.mark.live

DATA = pathlib.Path(__file__).resolve().parent / "data"


def _reference_module():
    spec = importlib.util.spec_from_file_location(
        "make_keras_reference", DATA / "make_keras_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recorded_reference_is_keras_as_installed():
    """Keras as installed gives the recorded `rmax_only` run, so the keras-free
    tier still tests against Keras: the data bit for bit, every computed array to
    float32 rounding of its scale.

    Not bit for bit: the reference is Keras's float64 run rounded to float32, and
    that run is not float64 throughout (its values move with the machine's float32
    kernels, within 1.4-3.4 float32 epsilons of each array's largest value on a
    second machine, against the recording machine's file; the float32 run's own
    error, `err/<key>`, is of the same size). A Keras that computed otherwise (a
    changed formula, a clipping bound applied elsewhere) moves them by far more.
    """
    recorded = np.load(DATA / "keras" / "renorm.npz")
    fresh = _reference_module().config_arrays("rmax_only")
    eps = float(np.finfo(np.float32).eps)
    for key, value in fresh.items():
        if key.startswith("err/"):  # this machine's float32 run: its own rounding
            continue
        want = recorded[f"rmax_only/{key}"]
        if f"err/{key}" not in fresh:  # data and settings: exact
            np.testing.assert_array_equal(value, want, err_msg=key)
            continue
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(
            value, want, rtol=0, atol=8 * eps * scale, err_msg=key
        )


STATS = ("mean", "var", "stddev", "renorm_mean", "renorm_stddev")
KERAS_STATS = (
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
)

# name: (input shape, channels last, center and scale, mask shape or None)
CASES = {
    "vector_mask": ((10, 3), True, True, (10,)),
    "image_channels_first": ((4, 3, 2, 3), False, False, None),
    "image_mask": ((4, 2, 3, 3), True, True, (4, 2, 3)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_renorm_matches_live_keras(name):
    """Three training steps (output, input gradient, the five statistics) and then
    inference, eqx_bn against `keras.layers.BatchNormalization(renorm=True)`, both
    in float32: equal to float32 rounding."""
    shape, last, affine, mask_shape = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    channels = shape[-1] if last else shape[1]
    clipping = {"rmin": 0.7, "rmax": 1.3, "dmax": 0.4}
    layer = keras.layers.BatchNormalization(
        axis=-1 if last else 1,
        momentum=0.9,
        epsilon=1e-3,
        center=affine,
        scale=affine,
        renorm=True,
        renorm_clipping=clipping,
        renorm_momentum=0.8,
    )
    layer.build(shape)
    names = [v.path.rsplit("/", 1)[1] for v in layer.non_trainable_variables]
    assert names == list(KERAS_STATS)
    trainable = [v.value for v in layer.trainable_variables]
    if affine:
        trainable = [
            jnp.asarray(rng.normal(1, 0.2, channels), jnp.float32),
            jnp.asarray(rng.normal(0, 0.2, channels), jnp.float32),
        ]
    keras_state = [v.value for v in layer.non_trainable_variables]
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        channels,
        None,
        momentum=0.9,
        eps=1e-3,
        use_scale=affine,
        use_bias=affine,
        renorm=True,
        renorm_clipping=clipping,
        renorm_momentum=0.8,
        channels_last=last,
    )
    if affine:
        bn = eqx.tree_at(lambda b: (b.scale, b.bias), bn, tuple(trainable))

    def keras_step(keras_state, x, mask, dy):
        def f(x):
            return layer.stateless_call(
                trainable, keras_state, x, training=True, mask=mask
            )

        y, vjp, new = jax.vjp(f, x, has_aux=True)
        return y, new, vjp(dy)[0]

    def ours_step(state, x, mask, dy):
        y, vjp, new = jax.vjp(lambda x: bn(x, state, mask=mask), x, has_aux=True)
        return y, new, vjp(dy)[0]

    for step in range(3):
        x = jnp.asarray(
            rng.normal(1.5 * step, 1 + step, shape)
            + rng.normal(0, 2, (1,) * len(shape)),
            jnp.float32,
        )
        dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
        mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) < 0.7)
        y_k, keras_state, dx_k = jax.jit(keras_step)(keras_state, x, mask, dy)
        ours_mask = mask
        if mask is not None and last:
            ours_mask = mask[..., None]  # Keras's mask leaves the channel axis out
        y, state, dx = jax.jit(ours_step)(state, x, ours_mask, dy)
        for what, ours, theirs in (("y", y, y_k), ("dx", dx, dx_k)):
            scale = float(np.max(np.abs(theirs)))
            np.testing.assert_allclose(
                ours, theirs, rtol=0, atol=1e-5 * scale, err_msg=f"{what} {step}"
            )
        stats = state.get(bn.state_index)
        for field, theirs in zip(STATS, keras_state, strict=True):
            np.testing.assert_allclose(
                getattr(stats, field), theirs, rtol=2e-6, atol=1e-7, err_msg=field
            )
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y_k, _ = layer.stateless_call(trainable, keras_state, x, training=False)
    y, _ = bn(x, state, inference=True)
    np.testing.assert_allclose(y, y_k, rtol=0, atol=1e-5 * float(np.max(np.abs(y_k))))

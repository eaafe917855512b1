"""Makes the Keras 3 Batch Renormalization reference for issue 24 under
`tests/data/keras/`, so that its tests need no Keras. The semantics it pins down are
written out, with citations, in `tests/data/REFERENCES.md`.

Run it with Keras 3 on the JAX backend:

    KERAS_BACKEND=jax python tests/data/make_keras_reference.py

A model `h = x @ kernel + bias` -> `keras.layers.BatchNormalization(renorm=True)` ->
`loss = mean((y - target)**2)` is trained 20 steps with plain SGD (`p -= LR * grad`,
done here, not by a Keras optimizer), the layer called through `stateless_call` and
differentiated with `jax.grad`. For each config in `CONFIGS` (clipping that binds,
clipping left out, `rmax` alone; 2-d and 4-d channels-last inputs) it records, per
step `t` (arrays stacked on a leading step axis of length 20):

- `x`, `target`: the inputs; `h`: the BatchNorm's input; `y`: its training output;
- `params/{gamma,beta}`: the values *before* the step (`kernel0`, `bias0`: the
  Dense's at the start; SGD on `x.T @ grad/h` and `grad/h` summed gives the rest);
- `grad/{gamma,beta,h}`: the gradients of the loss at the step;
- `state/{moving_mean,moving_variance,moving_stddev,renorm_mean,renorm_stddev}`:
  the layer's non-trainable variables *after* the step (initial values: 0, 1, 1,
  0, 1);
- `r`, `d`, `r_clipped`, `d_clipped`: Keras's correction before and after clipping,
  recomputed here from the recorded statistics with Keras's formula (diagnostics
  only, not a Keras output; they show which steps the clipping binds in);

and after the 20 steps `eval/x`, `eval/y`: inference (`training=False`) on a fresh
batch. Every float is computed in float64 (under `jax.enable_x64`, layer dtype
float64; stored rounded to float32: the reference) and float32; `err/<key>` holds
the largest difference between the two, as in `make_torch_reference.py`.
"""

import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

assert keras.backend.backend() == "jax", "run with KERAS_BACKEND=jax"

OUT = pathlib.Path(__file__).resolve().parent / "keras"
STEPS = 20
LR = 0.1
FEATURES = 6
CHANNELS = 4
MOMENTUM = 0.9
RENORM_MOMENTUM = 0.8
EPSILON = 1e-3  # Keras's default
STATE = (
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
)

# name: (renorm_clipping, batch shape without the feature axis, scale and offset of
# h, data seed)
CONFIGS = {
    # r starts near 3, d near 2: both clipped for the first steps, then free.
    "binding": ({"rmin": 0.5, "rmax": 1.5, "dmax": 0.5}, (8,), 3.0, 2.0, 0),
    # The same data, every key left out: no clipping at all.
    "unclipped": ({}, (8,), 3.0, 2.0, 0),
    # rmax alone, small batch deviations: r near 0.2 stays unclipped from below
    # (Keras does not derive rmin = 1/rmax).
    "rmax_only": ({"rmax": 1.2}, (8,), 0.2, -0.5, 1),
    # channels last, statistics over (batch, height, width).
    "binding_4d": ({"rmin": 0.5, "rmax": 1.5, "dmax": 0.5}, (2, 2, 2), 3.0, 2.0, 2),
}


def _data(rng: np.random.Generator, batch: tuple, scale: float, offset: float):
    kernel = rng.standard_normal((FEATURES, CHANNELS)) * scale / np.sqrt(FEATURES)
    bias = offset + 0.3 * rng.standard_normal(CHANNELS)
    gamma = 1.0 + 0.2 * rng.standard_normal(CHANNELS)
    beta = 0.1 * rng.standard_normal(CHANNELS)
    xs = rng.standard_normal((STEPS, *batch, FEATURES))
    targets = rng.standard_normal((STEPS, *batch, CHANNELS))
    x_eval = rng.standard_normal((5, *batch[1:], FEATURES))
    params = {"kernel": kernel, "bias": bias, "gamma": gamma, "beta": beta}
    f32 = np.float32
    return (
        {k: v.astype(f32) for k, v in params.items()},
        xs.astype(f32),
        targets.astype(f32),
        x_eval.astype(f32),
    )


def _dense(x, kernel, bias):
    # bias broadcast explicitly: the test session raises on implicit rank promotion
    return jnp.dot(x, kernel) + jnp.reshape(bias, (1,) * (x.ndim - 1) + (-1,))


def _run(clipping, params, xs, targets, x_eval, dtype) -> dict:
    # float64 needs x64 on, and only for this run: a float32 run is Keras as users
    # run it, and importing this module changes no global setting.
    with jax.enable_x64(dtype == "float64"):
        return _run_in(clipping, params, xs, targets, x_eval, dtype)


def _run_in(clipping, params, xs, targets, x_eval, dtype) -> dict:
    layer = keras.layers.BatchNormalization(
        momentum=MOMENTUM,
        epsilon=EPSILON,
        renorm=True,
        renorm_clipping=dict(clipping),
        renorm_momentum=RENORM_MOMENTUM,
        dtype=dtype,
    )
    layer.build((None, *xs.shape[2:-1], CHANNELS))
    names = [v.path.rsplit("/", 1)[1] for v in layer.non_trainable_variables]
    assert tuple(names) == STATE, names
    assert [v.path.rsplit("/", 1)[1] for v in layer.trainable_variables] == [
        "gamma",
        "beta",
    ]
    state = [v.value for v in layer.non_trainable_variables]
    params = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    kernel0, bias0 = params["kernel"], params["bias"]

    def forward(p, state, h, training):
        return layer.stateless_call(
            [p["gamma"], p["beta"]], state, h, training=training
        )

    def loss(p, state, x, target):
        h = _dense(x, p["kernel"], p["bias"])
        y, new = forward(p, state, h, True)
        return jnp.mean((y - target) ** 2), (h, y, new)

    def loss_of_h(h, p, state, target):
        return jnp.mean((forward(p, state, h, True)[0] - target) ** 2)

    @jax.jit
    def step(p, state, x, target):
        grads, (h, y, new) = jax.grad(loss, has_aux=True)(p, state, x, target)
        grads["h"] = jax.grad(loss_of_h)(h, p, state, target)
        return grads, h, y, new

    rec: dict[str, list] = {}

    def put(key, value):
        rec.setdefault(key, []).append(np.asarray(value))

    for x, target in zip(xs, targets):
        x, target = jnp.asarray(x, dtype), jnp.asarray(target, dtype)
        before = dict(zip(STATE, state))
        grads, h, y, state = step(params, state, x, target)
        assert y.dtype == dtype and all(v.dtype == dtype for v in state)
        for k in ("gamma", "beta"):  # the Dense's follow from kernel0/bias0
            put(f"params/{k}", params[k])
        for k in ("gamma", "beta", "h"):  # the Dense's follow from grad/h
            put(f"grad/{k}", grads[k])
        put("x", x)
        put("target", target)
        put("h", h)
        put("y", y)
        for k, v in zip(STATE, state):
            put(f"state/{k}", v)
        for k, v in _correction(h, before, clipping).items():
            put(k, v)
        params = {k: v - LR * grads[k] for k, v in params.items()}
    out = {k: np.stack(v) for k, v in rec.items()}
    out["kernel0"], out["bias0"] = np.asarray(kernel0), np.asarray(bias0)
    out["eval/x"] = x_eval
    out["eval/y"] = np.asarray(
        forward(
            params,
            state,
            _dense(jnp.asarray(x_eval, dtype), params["kernel"], params["bias"]),
            False,
        )[0]
    )
    return out


def _correction(h, before: dict, clipping: dict) -> dict:
    """Keras's r and d (keras/src/layers/normalization/batch_normalization.py,
    `_renorm_correction_and_moments`), recomputed from the statistics before the
    step: diagnostics, to show where the clipping binds."""
    axes = tuple(range(h.ndim - 1))
    stddev = jnp.sqrt(jnp.var(h, axes) + EPSILON)
    renorm_stddev = jnp.maximum(before["renorm_stddev"], np.sqrt(EPSILON))
    r = stddev / renorm_stddev
    d = (jnp.mean(h, axes) - before["renorm_mean"]) / renorm_stddev
    rc, dc = r, d
    if "rmin" in clipping:
        rc = jnp.maximum(rc, clipping["rmin"])
    if "rmax" in clipping:
        rc = jnp.minimum(rc, clipping["rmax"])
    if "dmax" in clipping:
        dc = jnp.clip(dc, -clipping["dmax"], clipping["dmax"])
    return {"r": r, "d": d, "r_clipped": rc, "d_clipped": dc}


def _with_error(f64: dict, f32: dict, prefix: str) -> dict:
    out = {}
    for k, ref in f64.items():
        out[f"{prefix}{k}"] = ref.astype(np.float32)
        err = np.max(np.abs(f32[k].astype(np.float64) - ref), initial=0.0)
        out[f"{prefix}err/{k}"] = np.float64(err)
    return out


def config_arrays(name: str) -> dict:
    """One config's recorded arrays (keys without the `name/` prefix), for
    `main` and for a live test to compare with Keras as installed."""
    clipping, batch, scale, offset, seed = CONFIGS[name]
    rng = np.random.default_rng([24, seed])
    params, xs, targets, x_eval = _data(rng, batch, scale, offset)
    f64 = _run(clipping, params, xs, targets, x_eval, "float64")
    f32 = _run(clipping, params, xs, targets, x_eval, "float32")
    inputs = ("x", "target", "eval/x", "kernel0", "bias0")  # float32 data
    for k in inputs:
        assert np.array_equal(f64.pop(k).astype(np.float32), f32[k])
    arrays = {k: f32.pop(k) for k in inputs}
    arrays.update(_with_error(f64, f32, ""))
    for key in ("rmin", "rmax", "dmax"):
        if key in clipping:
            arrays[f"clipping/{key}"] = np.float64(clipping[key])
    return arrays


def main() -> None:
    OUT.mkdir(exist_ok=True)
    arrays = {
        "config/momentum": np.float64(MOMENTUM),
        "config/renorm_momentum": np.float64(RENORM_MOMENTUM),
        "config/epsilon": np.float64(EPSILON),
        "config/lr": np.float64(LR),
    }
    for name in CONFIGS:
        config = config_arrays(name)
        arrays.update({f"{name}/{k}": v for k, v in config.items()})
        r, d = config["r"], config["d"]
        bound = np.any(r != config["r_clipped"], 1) | np.any(
            d != config["d_clipped"], 1
        )
        print(f"{name}: clipping binds in steps {np.flatnonzero(bound).tolist()}")
    path = OUT / "renorm.npz"
    np.savez_compressed(path, **arrays)
    print(f"{path.name}: {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()

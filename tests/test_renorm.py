"""Batch Renormalization (issue 24): `eqx_bn.BatchNorm(renorm=True)` against Keras 3's
`BatchNormalization(renorm=True)` on the JAX backend, without Keras.

`tests/data/keras/renorm.npz` (made by `tests/data/make_keras_reference.py`; its
semantics, with citations, in `tests/data/REFERENCES.md` section 6) records 20 SGD
steps of `Dense -> BatchNormalization(renorm=True)` for clipping that binds, no
clipping, `rmax` alone, and a 4-d channels-last batch. Each step here feeds the
recorded BatchNorm input `h` and parameters to eqx_bn, carrying eqx_bn's own State
from step to step, and compares the output, the gradients and all five statistics
with Keras's float64 result, within a few times Keras's own float32 error.
`tests/test_keras_live.py` checks the same layer against Keras as installed.
"""

import functools
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_as_accurate, normal

import eqx_bn

DATA = pathlib.Path(__file__).resolve().parent / "data" / "keras" / "renorm.npz"
CONFIGS = ("binding", "unclipped", "rmax_only", "binding_4d")
# Keras's names of the State entries -> eqx_bn's RenormStats fields.
STATS = {
    "moving_mean": "mean",
    "moving_variance": "var",
    "moving_stddev": "stddev",
    "renorm_mean": "renorm_mean",
    "renorm_stddev": "renorm_stddev",
}


@pytest.fixture(scope="module")
def keras_ref():
    return dict(np.load(DATA))


def _clipping(ref, name):
    return {
        k: float(ref[f"{name}/clipping/{k}"])
        for k in ("rmin", "rmax", "dmax")
        if f"{name}/clipping/{k}" in ref
    }


def _keras_layer(ref, name, axis_name, channels_last=True):
    """eqx_bn's twin of the recorded Keras layer."""
    return eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        ref[f"{name}/h"].shape[-1],
        axis_name,
        momentum=float(ref["config/momentum"]),
        eps=float(ref["config/epsilon"]),
        renorm=True,
        renorm_clipping=_clipping(ref, name),
        renorm_momentum=float(ref["config/renorm_momentum"]),
        channels_last=channels_last,
    )


def _call(bn, state, h, mode):
    """The layer on a batch `h`: whole (`axis_name=None`), one example per vmap
    step, or over two nested named axes."""
    if mode == "batched":
        return bn(h, state)
    if mode == "vmap":
        return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            h, state
        )
    outer, inner = 2, h.shape[0] // 2
    per = jax.vmap(bn, axis_name="inner", in_axes=(0, None), out_axes=(0, None))
    both = jax.vmap(per, axis_name="outer", in_axes=(0, None), out_axes=(0, None))
    y, state = both(h.reshape(outer, inner, *h.shape[1:]), state)
    return y.reshape(h.shape), state


@eqx.filter_jit
def _keras_step(bn, state, h, target, mode):
    """Keras's recorded loss `mean((y - target)^2)`: output, new State and the
    gradients with respect to gamma, beta and the BatchNorm's input."""

    def loss(params, h):
        layer = eqx.tree_at(lambda b: (b.scale, b.bias), bn, params)
        y, new_state = _call(layer, state, h, mode)
        return jnp.mean((y - target) ** 2), (y, new_state)

    grads, (y, state) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
        (bn.scale, bn.bias), h
    )
    return y, state, grads


def _replay(ref, name, mode, channels_last=True):
    """The 20 recorded steps through eqx_bn: stacked outputs, gradients and
    statistics (Keras's names), and the layer and State after the last step."""
    axis_name = {"batched": None, "vmap": "batch", "two_axes": ("outer", "inner")}
    bn, state = _keras_layer(ref, name, axis_name[mode], channels_last)
    to_layout = (lambda a: a) if channels_last else (lambda a: np.moveaxis(a, -1, 1))
    out = {}
    for t in range(ref[f"{name}/h"].shape[0]):
        params = (ref[f"{name}/params/gamma"][t], ref[f"{name}/params/beta"][t])
        bn = eqx.tree_at(
            lambda b: (b.scale, b.bias), bn, jax.tree.map(jnp.asarray, params)
        )
        h = jnp.asarray(to_layout(ref[f"{name}/h"][t]))
        target = jnp.asarray(to_layout(ref[f"{name}/target"][t]))
        y, state, ((dgamma, dbeta), dh) = _keras_step(bn, state, h, target, mode)
        stats = state.get(bn.state_index)
        step = {
            "y": y,
            "grad/gamma": dgamma,
            "grad/beta": dbeta,
            "grad/h": dh,
        }
        step = {
            k: np.moveaxis(np.asarray(v), 1, -1)
            if v.ndim > 1 and not channels_last
            else v
            for k, v in step.items()
        }
        step.update({f"state/{k}": getattr(stats, f) for k, f in STATS.items()})
        for k, v in step.items():
            out.setdefault(k, []).append(np.asarray(v))
    return {k: np.stack(v) for k, v in out.items()}, bn, state


@pytest.mark.parametrize(
    "name, mode, channels_last",
    [
        *[(name, "batched", True) for name in CONFIGS],
        ("binding", "vmap", True),
        ("binding", "two_axes", True),
        ("binding_4d", "vmap", True),
        ("binding_4d", "batched", False),
    ],
)
def test_renorm_matches_keras_over_20_steps(keras_ref, name, mode, channels_last):
    """Training outputs, gradients (gamma, beta, input) and the five statistics at
    every step, then inference, equal Keras's: clipping that binds, none, rmax
    alone (r below 1/rmax stays unclipped), statistics over (batch, H, W)."""
    got, bn, state = _replay(keras_ref, name, mode, channels_last)
    for key, ours in got.items():
        assert_as_accurate(ours, keras_ref, f"{name}/{key}", library="Keras")

    # Inference after the 20th step: the Dense and the BatchNorm's parameters
    # after that step's SGD update, from the recorded gradients (in float64).
    lr = float(keras_ref["config/lr"])
    xs = keras_ref[f"{name}/x"].astype(np.float64)
    dh = keras_ref[f"{name}/grad/h"].astype(np.float64)
    flat = (-1, xs.shape[-1])
    kernel = keras_ref[f"{name}/kernel0"] - lr * sum(
        x.reshape(flat).T @ g.reshape(-1, g.shape[-1]) for x, g in zip(xs, dh)
    )
    bias = keras_ref[f"{name}/bias0"] - lr * dh.reshape(len(dh), -1, dh.shape[-1]).sum(
        (0, 1)
    )
    params = tuple(
        jnp.asarray(
            keras_ref[f"{name}/params/{k}"][-1] - lr * keras_ref[f"{name}/grad/{k}"][-1]
        )
        for k in ("gamma", "beta")
    )
    h = (keras_ref[f"{name}/eval/x"] @ kernel + bias).astype(np.float32)
    if not channels_last:
        h = np.moveaxis(h, -1, 1)
    bn = eqx.tree_at(lambda b: (b.scale, b.bias), bn, params)
    # (5 examples: not split over two axes; inference needs no named axis anyway)
    eval_mode = "vmap" if mode == "two_axes" else mode
    y, _ = _call(eqx.nn.inference_mode(bn), state, jnp.asarray(h), eval_mode)
    if not channels_last:
        y = np.moveaxis(np.asarray(y), 1, -1)
    assert_as_accurate(y, keras_ref, f"{name}/eval/y", library="Keras")


def test_the_recording_exercises_the_clipping(keras_ref):
    """What makes the replay above meaningful: the clipping binds in some steps
    and not in others, and `rmax_only` has r below 1/rmax (so a layer that derived
    rmin = 1/rmax, as the paper writes it, would fail the replay)."""
    for name in ("binding", "binding_4d"):
        r, rc = keras_ref[f"{name}/r"], keras_ref[f"{name}/r_clipped"]
        d, dc = keras_ref[f"{name}/d"], keras_ref[f"{name}/d_clipped"]
        bound = np.any(r != rc, 1) | np.any(d != dc, 1)
        assert bound.any() and not bound.all(), name
    assert np.array_equal(keras_ref["unclipped/r"], keras_ref["unclipped/r_clipped"])
    rmax = float(keras_ref["rmax_only/clipping/rmax"])
    r = keras_ref["rmax_only/r_clipped"]
    assert r.min() < 1 / rmax and r.max() == np.float32(rmax)


# ------------------------------------------------------------ the State and its checks


def test_state_holds_keras_statistics_and_clipping():
    """The five statistics as Keras initialises them (moving_stddev and
    renorm_stddev = sqrt of the variance's 1), float32; the clipping as arrays,
    no bound = rmin 0, rmax and dmax inf."""
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3, renorm=True, renorm_clipping={"rmax": 3.0}
    )
    stats = state.get(bn.state_index)
    assert isinstance(stats, eqx_bn.RenormStats)
    assert stats._fields == ("mean", "var", "stddev", "renorm_mean", "renorm_stddev")
    expected = (0.0, 1.0, 1.0, 0.0, 1.0)
    for value, fill in zip(stats, expected):
        assert value.dtype == jnp.float32 and value.shape == (3,)
        np.testing.assert_array_equal(value, np.full(3, fill, np.float32))
    clipping = state.get(bn.clipping_index)
    assert isinstance(clipping, eqx_bn.RenormClipping)
    assert [float(v) for v in clipping] == [0.0, 3.0, np.inf]
    assert all(v.shape == () and v.dtype == jnp.float32 for v in clipping)
    plain, plain_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3)
    assert plain.clipping_index is None
    assert isinstance(plain_state.get(plain.state_index), eqx_bn.RunningStats)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"renorm": True, "renorm_clipping": {"rmx": 2.0}}, "rmx.*rmax, rmin and dmax"),
        ({"renorm": True, "renorm_clipping": {"rmin": 2.0, "rmax": 1.0}}, "rmax"),
        ({"renorm": True, "renorm_clipping": {"dmax": -1.0}}, "dmax"),
        ({"renorm": True, "renorm_clipping": {"rmax": "big"}}, "rmax"),
        ({"renorm": True, "renorm_clipping": [("rmax", 2.0)]}, "dict"),
        ({"renorm": True, "renorm_momentum": 1.5}, "renorm_momentum"),
        ({"renorm_clipping": {"rmax": 2.0}}, "renorm=True"),
        ({"renorm_momentum": 0.9}, "renorm=True"),
    ],
)
def test_bad_renorm_config_is_refused(kwargs, match):
    """Keras's own checks (unknown keys, rmax < rmin, dmax < 0), and settings
    that would be silently ignored without renorm=True."""
    with pytest.raises(ValueError, match=match):
        eqx_bn.BatchNorm(3, **kwargs)


def test_inference_before_training_uses_the_initial_variance():
    """As Keras: moving_variance starts at 1, not moving_stddev**2 - eps."""
    x = normal((4, 3))
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None, renorm=True)
    plain, plain_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None)
    y, same = bn(x, state, inference=True)
    y_plain, _ = plain(x, plain_state, inference=True)
    np.testing.assert_array_equal(y, y_plain)
    assert same is state


# ------------------------------------------------------------ clipping schedules


def test_clipping_to_one_and_zero_is_plain_batch_norm():
    """r clipped to 1 and d to 0 (the warm-up of the paper and of CrossQ) gives
    plain BatchNorm's outputs and gradients, bitwise; and `set_renorm_clipping`
    sets the given bounds only."""
    x = normal((6, 3), seed=2) * 3 + 1
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3, None, renorm=True, renorm_clipping={"rmin": 0.5}
    )
    state = eqx_bn.set_renorm_clipping(bn, state, rmax=1.0, dmax=0.0)
    assert [float(v) for v in state.get(bn.clipping_index)] == [0.5, 1.0, 0.0]
    state = eqx_bn.set_renorm_clipping(bn, state, rmin=1.0)
    plain, plain_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None)

    @eqx.filter_jit
    def grads(layer, state):
        def loss(params, x):
            y, _ = eqx.tree_at(lambda b: (b.scale, b.bias), layer, params)(x, state)
            return jnp.sum(y * jnp.arange(3.0)[None]), y

        params = (layer.scale, layer.bias)
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    got, y = grads(bn, state)
    want, y_plain = grads(plain, plain_state)
    np.testing.assert_array_equal(y, y_plain)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_clipping_schedule_does_not_retrace():
    """Bounds passed as arrays each step (a schedule) reuse one compiled step, and
    take effect: a looser rmax changes the output where r binds."""
    model = eqx.nn.Sequential(
        [
            eqx.nn.Linear(2, 3, key=jax.random.key(0)),
            eqx_bn.BatchNorm(3, renorm=True, renorm_clipping={"rmin": 0.0}),
        ]
    )
    model, state = eqx.nn.make_with_state(lambda: model)()
    x = normal((8, 2)) * 5
    traces = []

    @eqx.filter_jit
    def step(model, state, x, rmax, dmax):
        traces.append(None)
        state = eqx_bn.set_renorm_clipping(model, state, rmax=rmax, dmax=dmax)
        return jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)

    outputs = []
    for t in range(3):
        rmax, dmax = 1.0 + t, 2.5 * t
        y, state = step(model, state, x, jnp.float32(rmax), jnp.float32(dmax))
        clipping = state.get(model[1].clipping_index)
        assert float(clipping.rmax) == rmax and float(clipping.dmax) == dmax
        outputs.append(y)
    assert len(traces) == 1
    assert not np.allclose(outputs[0], outputs[1])


def test_set_renorm_clipping_errors():
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, renorm=True)
    with pytest.raises(ValueError, match="dmax"):
        eqx_bn.set_renorm_clipping(bn, state, dmax=-1.0)
    with pytest.raises(ValueError, match="rmax"):
        eqx_bn.set_renorm_clipping(bn, state, rmin=2.0, rmax=1.0)
    with pytest.raises(TypeError):  # the runtime shape check: a scalar per bound
        eqx_bn.set_renorm_clipping(bn, state, rmax=jnp.ones(3))
    plain, plain_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3)
    with pytest.raises(ValueError, match="renorm=True"):
        eqx_bn.set_renorm_clipping(plain, plain_state, rmax=2.0)


# ------------------------------------------------------------ derivatives


def _formula(x, mean_axes, scale, bias, renorm_mean, renorm_stddev, clip, eps):
    """Batch Renormalization written out in plain jnp (Keras's formula), whole batch
    channels last: JAX differentiates it through the mean and variance."""
    scale, bias, renorm_mean, renorm_stddev = (
        jnp.reshape(v, (1,) * (x.ndim - 1) + (-1,))
        for v in (scale, bias, renorm_mean, renorm_stddev)
    )
    mean = jnp.mean(x, mean_axes, keepdims=True)
    var = jnp.var(x, mean_axes, keepdims=True)
    stddev = jnp.sqrt(var + eps)
    s = jnp.maximum(renorm_stddev, jnp.sqrt(eps))
    r = jnp.clip(stddev / s, clip[0], clip[1])
    d = jnp.clip((mean - renorm_mean) / s, -clip[2], clip[2])
    r, d = jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)
    return ((x - mean) / stddev * r + d) * scale + bias


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 2, 3)])
def test_renorm_gradient_equals_autodiff_of_the_formula(shape):
    """eqx_bn's own derivative (the fused closed form with r and d as constants)
    equals JAX's autodiff of the formula, in float64, first and second order."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(1.0, 2.0, shape))
        g = jnp.asarray(rng.normal(size=shape))
        c = shape[-1]
        bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
            c,
            None,
            eps=1e-3,
            renorm=True,
            renorm_clipping={"rmin": 0.8, "rmax": 1.1, "dmax": 0.2},
            channels_last=True,
            param_dtype=jnp.float64,
            force_float32_reductions=False,
        )
        running = eqx_bn.RenormStats(
            *(jnp.asarray(rng.uniform(0.5, 1.5, c)) for _ in range(5))
        )
        state = state.set(bn.state_index, running)
        scale = jnp.asarray(rng.normal(1.0, 0.3, c))
        bias = jnp.asarray(rng.normal(0.0, 0.3, c))
        axes = tuple(range(len(shape) - 1))

        def ours(x, scale, bias):
            layer = eqx.tree_at(lambda b: (b.scale, b.bias), bn, (scale, bias))
            fresh = jax.tree.map(lambda a: a, state)  # each call sets its own copy
            return jnp.sum(layer(x, fresh)[0] * g)

        def theirs(x, scale, bias):
            y = _formula(
                x,
                axes,
                scale,
                bias,
                running.renorm_mean,
                running.renorm_stddev,
                (0.8, 1.1, 0.2),
                1e-3,
            )
            return jnp.sum(y * g)

        @functools.partial(jax.jit, static_argnums=0)
        def derivatives(fn, args, tangents):
            """The gradient, and a Hessian-vector product (second order)."""
            grad = jax.grad(fn, argnums=(0, 1, 2))
            return grad(*args), jax.jvp(lambda *a: grad(*a), args, tangents)[1]

        args = (x, scale, bias)
        tangents = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in args)
        got = derivatives(ours, args, tangents)
        want = derivatives(theirs, args, tangents)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
            got,
            want,
        )


# ------------------------------------------------------------ composition


def test_masked_renorm_is_renorm_of_the_kept_examples():
    """A mask leaves the masked examples out of the batch statistics, of r and d,
    and of the five statistics: the kept examples' outputs and the new State are
    those of the batch without them."""
    x = normal((8, 3), seed=3) * 2 + 1
    keep = np.array([1, 1, 0, 1, 0, 1, 1, 1], bool)
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3, renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}
    )
    state = state.set(
        bn.state_index,
        eqx_bn.RenormStats(
            *(jnp.full(3, v, jnp.float32) for v in (0.1, 2, 1.2, 0.3, 0.7))
        ),
    )
    vmapped = eqx.filter_jit(
        jax.vmap(
            lambda x, m, s: bn(x, s, mask=m),
            axis_name="batch",
            in_axes=(0, 0, None),
            out_axes=(0, None),
        )
    )
    y, masked_state = vmapped(x, jnp.asarray(keep), state)
    y_kept, kept_state = vmapped(x[keep], jnp.ones(keep.sum(), bool), state)
    np.testing.assert_allclose(y[keep], y_kept, rtol=1e-6, atol=1e-6)
    for a, b in zip(masked_state.get(bn.state_index), kept_state.get(bn.state_index)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_renorm_with_unbiased_running_var():
    """With `unbiased_running_var=True` the inference statistics (moving_stddev,
    and moving_variance from it) track the unbiased variance, as PyTorch's running
    variance does; r and d, and renorm_stddev, stay with the biased variance that
    normalises the batch."""
    x = np.asarray(normal((5, 2), seed=4)) * 2
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        2,
        None,
        momentum=0.9,
        eps=1e-3,
        renorm=True,
        renorm_momentum=0.8,
        unbiased_running_var=True,
        channels_last=True,
    )
    _, state = eqx.filter_jit(bn)(jnp.asarray(x), state)
    got = state.get(bn.state_index)
    var, var_unbiased = x.var(0), x.var(0, ddof=1)
    stddev = 0.9 * 1 + 0.1 * np.sqrt(var_unbiased + 1e-3)
    np.testing.assert_allclose(got.stddev, stddev, rtol=1e-6)
    np.testing.assert_allclose(got.var, stddev**2 - 1e-3, rtol=1e-6)
    np.testing.assert_allclose(
        got.renorm_stddev, 0.8 + 0.2 * np.sqrt(var + 1e-3), rtol=1e-6
    )
    np.testing.assert_allclose(got.mean, 0.1 * x.mean(0), rtol=1e-6, atol=1e-7)


def test_a_batch_without_data_keeps_the_statistics():
    """As plain BatchNorm: a channel whose batch is NaN, or masked out entirely,
    keeps all five statistics (Keras would store NaN for good)."""
    x = np.array(normal((4, 2), seed=5))
    x[1, 0] = np.nan
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        2, None, renorm=True, channels_last=True
    )
    before = state.get(bn.state_index)
    train = eqx.filter_jit(bn)
    y, state = train(jnp.asarray(x), state)
    after = state.get(bn.state_index)
    assert np.isnan(y[:, 0]).all()
    for old, new in zip(before, after):
        assert new[0] == old[0] and new[1] != old[1]
    _, state = train(jnp.asarray(x), state, mask=jnp.zeros(4, bool))
    for old, new in zip(after, state.get(bn.state_index)):
        np.testing.assert_array_equal(old, new)


@eqx.filter_jit
def _train_step(model, x, state):
    """A training call of `model` on the batch `x`, jitted with the model as an
    argument (a jitted `jax.vmap(model)` would hold the model's arrays as
    constants, which Equinox warns about)."""
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )


def test_fold_renorm_batch_norm_is_exact():
    """Inference uses moving_mean and moving_variance only, so folding a renorm
    BatchNorm into the Linear before it gives the unfolded inference outputs."""
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(4, 3, key=jax.random.key(1)),
            eqx_bn.BatchNorm(3, renorm=True, renorm_clipping={"rmax": 2.0}),
        ]
    )
    x = normal((16, 4), seed=6) * 3 + 2
    for _ in range(3):  # statistics away from their initial values
        _, state = _train_step(model, x, state)
    model = eqx.nn.inference_mode(model)
    unfolded, _ = jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)
    folded_model = eqx_bn.fold_batch_norms(model, state)
    folded, _ = jax.vmap(folded_model, in_axes=(0, None), out_axes=(0, None))(x, state)
    np.testing.assert_allclose(folded, unfolded, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ State checks and interop


def test_a_plain_state_for_a_renorm_layer_is_refused():
    """The two kinds of State entry are not interchangeable (Keras's renorm
    moving_variance is derived from moving_stddev): the message says which."""
    bn, _ = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None, renorm=True)
    plain, plain_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None)
    swapped = eqx.tree_at(lambda b: b.state_index, bn, plain.state_index)
    with pytest.raises(ValueError, match="RenormStats.*renorm=False"):
        swapped(normal((4, 3)), plain_state)
    renorm, renorm_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3, None, renorm=True
    )
    swapped = eqx.tree_at(lambda b: b.state_index, plain, renorm.state_index)
    with pytest.raises(ValueError, match="RunningStats.*renorm=True"):
        swapped(normal((4, 3)), renorm_state)


def _trained_renorm_model():
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(3, 4, key=jax.random.key(2)),
            eqx_bn.BatchNorm(4, renorm=True, renorm_clipping={"rmax": 2.0}),
        ]
    )
    x = normal((8, 3), seed=7) * 2 + 1
    _, state = _train_step(model, x, state)
    return model, state


def test_flax_paths_name_the_renorm_statistics():
    """Flax (linen and NNX) has no Batch Renormalization; eqx_bn names the three
    extra statistics beside mean and var, and a round trip through Flax's variables
    restores all five (the bounds are configuration: the model's stay)."""
    from eqx_bn.interop import export_flax, flax_paths, load_flax, nnx_paths

    model, state = _trained_renorm_model()
    stats = ("mean", "var", "stddev", "renorm_mean", "renorm_stddev")
    paths = flax_paths(model)
    for name in stats:
        assert paths[f"batch_stats/layers_1/{name}"] == (
            f"state[model.layers[1].state_index].{name}"
        )
    assert {f"layers/1/{name}" for name in stats} <= set(nnx_paths(model))
    fresh_model, fresh_state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(3, 4, key=jax.random.key(3)),
            eqx_bn.BatchNorm(4, renorm=True, renorm_clipping={"dmax": 1.0}),
        ]
    )
    _, loaded = load_flax(fresh_model, fresh_state, export_flax(model, state))
    bn = fresh_model.layers[1]
    for ours, theirs in zip(loaded.get(bn.state_index), state.get(bn.state_index)):
        np.testing.assert_array_equal(ours, theirs)
    assert float(loaded.get(bn.clipping_index).dmax) == 1.0


def test_torch_refuses_a_renorm_layer():
    """PyTorch's BatchNorm has no renorm statistics: a ConversionError naming the
    layer, not a state_dict that loads into nothing."""
    from eqx_bn.interop import ConversionError, export_torch, torch_paths

    model, state = _trained_renorm_model()
    for convert in (lambda: export_torch(model, state), lambda: torch_paths(model)):
        with pytest.raises(ConversionError, match=r"layers\[1\].*renorm=True"):
            convert()

"""Ghost BatchNorm (issue 24): `eqx_bn.BatchNorm(virtual_batch_size=...)` against
tf_keras's `BatchNormalization(virtual_batch_size=...)`, without TensorFlow.

`tests/data/tf_keras/ghost.npz` (made by `tests/data/make_ghost_reference.py`;
semantics with citations in `tests/data/REFERENCES.md` section 7) records four
training calls and an inference call of tf_keras for an image batch (8 examples,
virtual batches of 2) and a vector batch (12 examples, virtual batches of 4), and
`tests/data/ghost_reference.py` is a NumPy model of the same semantics that the
generating script checked against tf_keras. tf_keras defines nothing for masks
(it fails); eqx_bn's masked semantics are checked against NumPy here.
"""

import importlib.util
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_as_accurate, normal

import eqx_bn

DATA = pathlib.Path(__file__).resolve().parent / "data"


def _load_reference_module():
    spec = importlib.util.spec_from_file_location(
        "ghost_reference", DATA / "ghost_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ghost_reference = _load_reference_module()


@pytest.fixture(scope="module")
def tf_ref():
    return dict(np.load(DATA / "tf_keras" / "ghost.npz"))


@eqx.filter_jit
def _call(bn, state, x, mode, mask=None, inference=None):
    """The layer on a batch: whole (`axis_name=None`), one example per vmap step,
    or over two nested named axes, whose examples `jax.lax.axis_index` numbers
    row-major. `mask`: one flag per example."""
    if mask is None:
        mask = jnp.ones(x.shape[:1], bool)
    if mode == "batched":
        return bn(x, state, mask=mask, inference=inference)

    def layer(x, mask, state):
        return bn(x, state, mask=mask, inference=inference)

    if mode == "vmap":
        return jax.vmap(
            layer, axis_name="batch", in_axes=(0, 0, None), out_axes=(0, None)
        )(x, mask, state)
    inner = jax.vmap(layer, axis_name="inner", in_axes=(0, 0, None), out_axes=(0, None))
    both = jax.vmap(inner, axis_name="outer", in_axes=(0, 0, None), out_axes=(0, None))
    split = (2, x.shape[0] // 2)
    y, state = both(x.reshape(*split, *x.shape[1:]), mask.reshape(split), state)
    return y.reshape(x.shape), state


_AXIS_NAME = {"batched": None, "vmap": "batch", "two_axes": ("outer", "inner")}


@eqx.filter_jit
def _train_vjp(bn, state, x, dy, mode):
    """Output, new State, and the input and parameter gradients of `sum(y * dy)`."""

    def f(params, x):
        layer = eqx.tree_at(lambda b: (b.scale, b.bias), bn, params)
        return _call(layer, state, x, mode)

    y, vjp, state = jax.vjp(f, (bn.scale, bn.bias), x, has_aux=True)
    (dgamma, dbeta), dx = vjp(dy)
    return y, state, dx, dgamma, dbeta


def _tf_layer(ref, name, mode, channels_last=True):
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        ref[f"{name}/gamma"].shape[0],
        _AXIS_NAME[mode],
        momentum=float(ref["momentum"]),
        eps=float(ref["epsilon"]),
        virtual_batch_size=int(ref[f"{name}/virtual_batch_size"]),
        channels_last=channels_last,
    )
    bn = eqx.tree_at(
        lambda b: (b.scale, b.bias),
        bn,
        (jnp.asarray(ref[f"{name}/gamma"]), jnp.asarray(ref[f"{name}/beta"])),
    )
    stats = eqx_bn.RunningStats(
        jnp.asarray(ref[f"{name}/moving_mean0"]),
        jnp.asarray(ref[f"{name}/moving_variance0"]),
    )
    return bn, state.set(bn.state_index, stats)


@pytest.mark.parametrize(
    "name, mode, channels_last",
    [
        ("image", "batched", True),
        ("image", "vmap", True),
        ("image", "batched", False),
        ("vector", "batched", True),
        ("vector", "vmap", True),
        ("vector", "two_axes", True),
    ],
)
def test_ghost_matches_tf_keras(tf_ref, name, mode, channels_last):
    """Four training calls (outputs, input and parameter gradients, moving
    statistics after each) and inference on a batch of 3, which no virtual batch
    size divides, equal tf_keras's within its own float32 error."""
    bn, state = _tf_layer(tf_ref, name, mode, channels_last)
    move = (lambda a: a) if channels_last else (lambda a: np.moveaxis(a, -1, 1))
    back = (lambda a: a) if channels_last else (lambda a: np.moveaxis(a, 1, -1))
    got = {}
    for x, dy in zip(tf_ref[f"{name}/x"], tf_ref[f"{name}/dy"]):
        y, state, dx, dgamma, dbeta = _train_vjp(
            bn, state, jnp.asarray(move(x)), jnp.asarray(move(dy)), mode
        )
        stats = state.get(bn.state_index)
        for key, value in (
            ("y", back(np.asarray(y))),
            ("dx", back(np.asarray(dx))),
            ("dgamma", dgamma),
            ("dbeta", dbeta),
            ("moving_mean", stats.mean),
            ("moving_variance", stats.var),
        ):
            got.setdefault(key, []).append(np.asarray(value))
    for key, values in got.items():
        assert_as_accurate(
            np.stack(values), tf_ref, f"{name}/{key}", library="tf_keras"
        )
    x_eval = jnp.asarray(move(tf_ref[f"{name}/eval/x"]))
    eval_mode = "vmap" if mode == "two_axes" else mode
    y, _ = _call(bn, state, x_eval, eval_mode, inference=True)
    assert_as_accurate(
        back(np.asarray(y)), tf_ref, f"{name}/eval/y", library="tf_keras"
    )


@pytest.mark.parametrize("mode", ["batched", "vmap", "two_axes"])
def test_virtual_batches_are_strided_as_tf_keras(tf_ref, mode):
    """Changing example i changes the outputs of exactly the examples of its
    virtual batch i % (batch / virtual_batch_size): the groups tf_keras was
    recorded with (found there the same way), also when the examples sit on two
    nested named axes (numbered row-major)."""
    groups = tf_ref["vector/groups"]
    assert np.array_equal(groups, ghost_reference.ghost_groups(12, 4))
    bn, state = _tf_layer(tf_ref, "vector", mode)
    x = tf_ref["vector/x"][0]

    @jax.jit
    def outputs(x):
        return _call(bn, jax.tree.map(lambda a: a, state), x, mode)[0]

    base = np.asarray(outputs(jnp.asarray(x)))
    for i in range(len(x)):
        changed = np.asarray(outputs(jnp.asarray(x).at[i].add(1.0))) != base
        assert np.array_equal(
            np.flatnonzero(changed.any(1)), np.flatnonzero(groups == groups[i])
        ), i


@pytest.mark.parametrize(
    "shape, virtual_batch_size, mode",
    [
        ((6, 4), 2, "batched"),
        ((6, 4), 3, "vmap"),
        ((8, 2, 3, 4), 2, "vmap"),
        ((8, 2, 3, 4), 4, "two_axes"),
        ((12, 5, 3), 3, "batched"),
    ],
)
def test_ghost_matches_the_numpy_reference(shape, virtual_batch_size, mode):
    """Other shapes and virtual batch sizes, two training calls and inference,
    against `ghost_reference.ghost_batch_norm` in float64."""
    rng = np.random.default_rng(sum(shape) + virtual_batch_size)
    c = shape[-1]
    # an offset per example, so that the virtual batches' means differ
    offsets = rng.normal(0, 2, (2, shape[0]) + (1,) * (len(shape) - 1))
    x = rng.normal(0, 1.5, (2, *shape)) + offsets
    gamma, beta = rng.normal(1, 0.3, c), rng.normal(0, 0.3, c)
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        c,
        _AXIS_NAME[mode],
        momentum=0.8,
        eps=1e-3,
        virtual_batch_size=virtual_batch_size,
        channels_last=True,
    )
    bn = eqx.tree_at(
        lambda b: (b.scale, b.bias),
        bn,
        (jnp.asarray(gamma, jnp.float32), jnp.asarray(beta, jnp.float32)),
    )
    mean, var = np.zeros(c), np.ones(c)
    for xt in x:
        y, state = _call(bn, state, jnp.asarray(xt, jnp.float32), mode)
        want, mean, var = ghost_reference.ghost_batch_norm(
            xt.astype(np.float32).astype(np.float64),
            gamma.astype(np.float32),
            beta.astype(np.float32),
            mean,
            var,
            virtual_batch_size=virtual_batch_size,
            momentum=0.8,
        )
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
        stats = state.get(bn.state_index)
        np.testing.assert_allclose(stats.mean, mean, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(stats.var, var, rtol=2e-6, atol=2e-6)
    x_eval = jnp.asarray(x[0, :5], jnp.float32)
    eval_mode = "vmap" if mode == "two_axes" else mode
    y, _ = _call(bn, state, x_eval, eval_mode, inference=True)
    want, _, _ = ghost_reference.ghost_batch_norm(
        np.asarray(x_eval, np.float64),
        gamma.astype(np.float32),
        beta.astype(np.float32),
        mean,
        var,
        virtual_batch_size=virtual_batch_size,
        training=False,
    )
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["batched", "vmap"])
def test_virtual_batch_as_large_as_the_batch_is_plain_batch_norm(mode):
    """One virtual batch: plain BatchNorm, bitwise (tf_keras's non-fused path; its
    default fused 4-d float32 layer differs, see REFERENCES.md)."""
    x = normal((8, 3, 2), seed=2)
    ghost, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3, _AXIS_NAME[mode], virtual_batch_size=8
    )
    plain, plain_state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, _AXIS_NAME[mode])
    y, state = _call(ghost, state, x, mode)
    y_plain, plain_state = _call(plain, plain_state, x, mode)
    np.testing.assert_array_equal(y, y_plain)
    for a, b in zip(state.get(ghost.state_index), plain_state.get(plain.state_index)):
        np.testing.assert_array_equal(a, b)


def test_inference_does_not_depend_on_the_batch():
    """Inference uses the running statistics, example by example: any batch size,
    the same output for an example whatever else is in the batch."""
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None, virtual_batch_size=4)
    _, state = eqx.filter_jit(bn)(normal((8, 3), seed=3) * 2 + 1, state)
    x = normal((5, 3), seed=4)
    y, _ = bn(x, state, inference=True)
    for i in range(5):
        y_i, _ = bn(x[i : i + 1], state, inference=True)
        np.testing.assert_array_equal(y_i[0], y[i])


@pytest.mark.parametrize("mode", ["batched", "vmap"])
def test_virtual_batch_size_must_divide_the_batch(mode):
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3, _AXIS_NAME[mode], virtual_batch_size=4
    )
    with pytest.raises(ValueError, match="multiple of the virtual batch size"):
        _call(bn, state, normal((6, 3)), mode)


@pytest.mark.parametrize("size", [0, -2, 2.0, True, "4"])
def test_bad_virtual_batch_size_is_refused(size):
    with pytest.raises(ValueError, match="virtual_batch_size"):
        eqx_bn.BatchNorm(3, virtual_batch_size=size)


# ------------------------------------------------------------ masks and other options


def _masked_ghost(x, keep, gamma, beta, size, eps, unbiased=False):
    """eqx_bn's masked Ghost BatchNorm in NumPy, float64, channels last: each
    virtual batch normalised with the statistics of its kept examples; for the
    running statistics the mean of every kept element and the pooled
    within-virtual-batch variance, sum_g n_g var_g / n (/ (n - k) unbiased, k the
    virtual batches with a kept element)."""
    count = x.shape[0] // size
    groups = np.arange(x.shape[0]) % count
    y = np.empty_like(x)
    total = m2 = n = k = 0.0
    for g in range(count):
        members = groups == g
        kept = x[members & keep]
        if kept.size:
            axes = tuple(range(x.ndim - 1))
            mean, var = kept.mean(axes), kept.var(axes)
            n_g = kept.size // x.shape[-1]
            total, m2, n, k = total + n_g * mean, m2 + n_g * var, n + n_g, k + 1
        else:
            mean, var = 0.0, 0.0
        y[members] = (x[members] - mean) / np.sqrt(var + eps) * gamma + beta
    return y, total / n, m2 / (n - k if unbiased else n)


@pytest.mark.parametrize("mode", ["batched", "vmap"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_masked_ghost_batch_norm(mode, unbiased):
    """A mask leaves examples out of their virtual batch's statistics (their own
    outputs still use them); the running statistics pool the kept elements, and a
    virtual batch with none left (group 1 here) drops out of them."""
    size, c = 3, 2
    x = np.asarray(normal((12, 2, c), seed=5), np.float64) * 2 + 1
    keep = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 0], bool)  # 4 groups of 3
    gamma, beta = np.array([1.5, 0.5]), np.array([0.1, -0.2])
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        c,
        _AXIS_NAME[mode],
        momentum=0.0,  # the running statistics become this batch's
        eps=1e-3,
        virtual_batch_size=size,
        channels_last=True,
        unbiased_running_var=unbiased,
    )
    bn = eqx.tree_at(
        lambda b: (b.scale, b.bias),
        bn,
        (jnp.asarray(gamma, jnp.float32), jnp.asarray(beta, jnp.float32)),
    )
    y, state = _call(
        bn, state, jnp.asarray(x, jnp.float32), mode, mask=jnp.asarray(keep)
    )
    want, mean, var = _masked_ghost(x, keep, gamma, beta, size, 1e-3, unbiased)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    stats = state.get(bn.state_index)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, var, rtol=1e-5)


def test_unmasked_unbiased_ghost_is_the_mean_of_unbiased_group_variances():
    """Without a mask the pooled unbiased variance is the mean over the virtual
    batches of their own unbiased variances (each n_g / (n_g - 1) times)."""
    x = np.asarray(normal((8, 3), seed=6), np.float64)
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3,
        None,
        momentum=0.0,
        virtual_batch_size=4,
        unbiased_running_var=True,
        channels_last=True,
    )
    _, state = eqx.filter_jit(bn)(jnp.asarray(x, jnp.float32), state)
    per_group = [x[g::2].var(0, ddof=1) for g in range(2)]
    np.testing.assert_allclose(
        state.get(bn.state_index).var, np.mean(per_group, 0), rtol=1e-5
    )


def test_ghost_with_renorm_corrects_towards_the_pooled_statistics():
    """With renorm=True too (tf_keras's combination, from its source): r and d
    come from the batch's pooled mean and within-virtual-batch variance, one per
    channel for every virtual batch; each virtual batch is normalised with its
    own statistics; the five statistics follow the pooled ones."""
    size, eps = 2, 1e-3
    x = np.asarray(normal((8, 3), seed=7), np.float64) * 2 + 1
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3,
        "batch",
        momentum=0.9,
        eps=eps,
        renorm=True,
        renorm_momentum=0.8,
        renorm_clipping={"rmax": 1.5, "dmax": 0.3},
        virtual_batch_size=size,
        channels_last=True,
    )
    y, state = _call(bn, state, jnp.asarray(x, jnp.float32), "vmap")
    groups = np.arange(8) % (8 // size)
    means = np.stack([x[groups == g].mean(0) for g in range(4)])
    variances = np.stack([x[groups == g].var(0) for g in range(4)])
    mean, var = means.mean(0), variances.mean(0)
    r = np.minimum(np.sqrt(var + eps) / 1.0, 1.5)
    d = np.clip((mean - 0.0) / 1.0, -0.3, 0.3)
    want = (x - means[groups]) / np.sqrt(variances[groups] + eps) * r + d
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    stats = state.get(bn.state_index)
    np.testing.assert_allclose(stats.mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.stddev, 0.9 + 0.1 * np.sqrt(var + eps), rtol=1e-6)
    np.testing.assert_allclose(stats.renorm_mean, 0.2 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        stats.renorm_stddev, 0.8 + 0.2 * np.sqrt(var + eps), rtol=1e-6
    )


@pytest.mark.parametrize("mode", ["batched", "vmap"])
def test_ghost_gradient_equals_autodiff_of_the_formula(mode):
    """The fused derivative per virtual batch equals JAX's autodiff of the
    reshape formula, float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        x = jnp.asarray(rng.normal(1, 2, (6, 2, 3)))
        g = jnp.asarray(rng.normal(size=(6, 2, 3)))
        bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
            3,
            _AXIS_NAME[mode],
            virtual_batch_size=2,
            channels_last=True,
            param_dtype=jnp.float64,
            force_float32_reductions=False,
        )
        scale, bias = (
            jnp.asarray(rng.normal(1, 0.3, 3)),
            jnp.asarray(rng.normal(size=3)),
        )

        def ours(x, scale, bias):
            layer = eqx.tree_at(lambda b: (b.scale, b.bias), bn, (scale, bias))
            y, _ = _call(layer, jax.tree.map(lambda a: a, state), x, mode)
            return jnp.sum(y * g)

        def theirs(x, scale, bias):
            xs = x.reshape(2, 3, 2, 3)  # (size, count, ...): strided groups
            mean = jnp.mean(xs, (0, 2), keepdims=True)
            var = jnp.var(xs, (0, 2), keepdims=True)
            y = (xs - mean) / jnp.sqrt(var + 1e-5) * scale.reshape(1, 1, 1, 3)
            return jnp.sum((y + bias.reshape(1, 1, 1, 3)).reshape(x.shape) * g)

        got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, scale, bias)
        want = jax.jit(jax.grad(theirs, argnums=(0, 1, 2)))(x, scale, bias)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

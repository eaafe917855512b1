"""eqx_bn.BatchNorm under transformations: grad, hessian, jvp, jit, scan, Sequential."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import channels_first, channels_last, flax_promotion

import eqx_bn

SHAPE = (6, 3, 4, 5)  # (batch, channels, H, W)


def data(seed=0, shape=SHAPE, offset=1.5):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = offset + 2.0 * jax.random.normal(k1, shape)
    cotangent = jax.random.normal(k2, shape)
    return x, cotangent


def flax_loss(use_fast_variance, mask=None, stats_weight=0.0):
    """`sum(y * ct) + stats_weight * sum(new running stats)` through flax.linen."""
    bn = nn.BatchNorm(momentum=0.9, use_fast_variance=use_fast_variance)
    variables = bn.init(jax.random.key(0), channels_last(jnp.ones(SHAPE)), False)

    def loss(x, params, ct):
        with flax_promotion():
            y, upd = bn.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                channels_last(x),
                False,
                mask=mask,
                mutable=["batch_stats"],
            )
        stats = upd["batch_stats"]
        extra = jnp.sum(stats["mean"]) + jnp.sum(stats["var"] ** 2)
        return jnp.sum(channels_first(y) * ct) + stats_weight * extra

    params = {
        "scale": jnp.array([0.5, 2.0, -1.0]),
        "bias": jnp.array([0.1, 0.0, -0.3]),
    }
    return loss, params


def our_loss(use_fast_variance, mask=None, stats_weight=0.0, layout_last=False):
    """The same loss through eqx_bn; `layout_last` runs the layer channels last
    (the loss still takes and compares channels-first arrays)."""
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3,
        momentum=0.9,
        use_fast_variance=use_fast_variance,
        channels_last=layout_last,
    )
    bn = eqx.tree_at(
        lambda b: (b.scale, b.bias),
        bn,
        (jnp.array([0.5, 2.0, -1.0]), jnp.array([0.1, 0.0, -0.3])),
    )

    def loss(x, bn, ct):
        x = channels_last(x) if layout_last else x
        y, new_state = jax.vmap(
            lambda xi, mi: bn(xi, state, mask=mi),
            axis_name="batch",
            in_axes=(0, None if mask is None else 0),
            out_axes=(0, None),
        )(x, None if mask is None else mask[:, 0, 0, :])
        y = channels_first(y) if layout_last else y
        stats = new_state.get(bn.state_index)
        extra = jnp.sum(stats.mean) + jnp.sum(stats.var**2)
        return jnp.sum(y * ct) + stats_weight * extra

    return loss, bn


def assert_grads_close(ours, theirs, scale=1.0):
    # float32 rounding of O(size) sums of O(1) products.
    tol = 64 * float(jnp.finfo(jnp.float32).eps) * scale
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "use_fast_variance, masked, stats_weight, layout_last",
    [
        (fast, masked, weight, False)
        for fast in (True, False)
        for masked in (False, True)
        for weight in (0.0, 1.0)
    ]
    + [(True, True, 1.0, True), (False, False, 0.0, True)],
)
def test_gradients_match_flax(use_fast_variance, masked, stats_weight, layout_last):
    x, ct = data()
    mask = None
    if masked:
        mask = jnp.array([True, False, True, True, False, True]).reshape(6, 1, 1, 1)
    f_loss, params = flax_loss(use_fast_variance, mask, stats_weight)
    o_loss, bn = our_loss(use_fast_variance, mask, stats_weight, layout_last)
    fx, fparams = jax.grad(f_loss, argnums=(0, 1))(x, params, ct)
    ox, obn = eqx.filter_jit(eqx.filter_grad(lambda d, ct: o_loss(*d, ct)))((x, bn), ct)
    assert_grads_close(ox, fx)
    assert_grads_close(obn.scale, fparams["scale"], scale=10)
    assert_grads_close(obn.bias, fparams["bias"], scale=10)


def test_hessian_matches_flax():
    """Second derivatives go through the custom JVP rule (jacfwd of jacrev)."""
    shape = (3, 2, 2)
    x = jnp.arange(12.0).reshape(shape) ** 1.5 / 7
    ct = jnp.linspace(-1.0, 1.0, 12).reshape(shape)
    bn = nn.BatchNorm(momentum=0.9)
    variables = bn.init(jax.random.key(0), jnp.ones((3, 2, 2)), False)

    def flax_f(x):
        y, _ = bn.apply(
            variables, jnp.moveaxis(x, 1, -1), False, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.tanh(jnp.moveaxis(y, -1, 1)) * ct)

    ours, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(2, axis_name=None)

    def our_f(x):
        # Equinox invalidates a State once it has been updated; hessian traces
        # this function several times, so each trace works on a fresh copy.
        y, _ = ours(x, jax.tree.map(lambda a: a, state))
        return jnp.sum(jnp.tanh(y) * ct)

    expected = jax.jit(jax.hessian(flax_f))(x)
    actual = jax.jit(jax.hessian(our_f))(x)
    assert actual.shape == shape + shape
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    # forward mode directly, too
    tangent = jnp.ones(shape)
    _, jvp_ours = jax.jvp(our_f, (x,), (tangent,))
    _, jvp_flax = jax.jvp(flax_f, (x,), (tangent,))
    np.testing.assert_allclose(jvp_ours, jvp_flax, rtol=1e-5, atol=1e-6)


def test_filter_jit_grad_and_scan_over_steps():
    """Training steps in a lax.scan, jitted, equal the same steps run one by one."""
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(4, 8, key=jax.random.key(1)),
            eqx_bn.BatchNorm(8, momentum=0.9),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(8, 1, key=jax.random.key(2)),
        ]
    )
    xs = jax.random.normal(jax.random.key(3), (5, 16, 4))

    def loss(model, state, x):
        y, state = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)
        return jnp.mean(y**2), state

    grad_fn = eqx.filter_value_and_grad(loss, has_aux=True)

    def step(carry, x):
        model, state = carry
        (value, state), grads = grad_fn(model, state, x)
        model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))
        return (model, state), value

    params, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def scanned(params, state, xs):
        def body(carry, x):
            params, state = carry
            (model, state), value = step((eqx.combine(params, static), state), x)
            return (eqx.filter(model, eqx.is_array), state), value

        return jax.lax.scan(body, (params, state), xs)

    (_, scan_state), scan_losses = scanned(params, state, xs)

    jitted_step = eqx.filter_jit(step)
    carry, losses = (model, state), []
    for x in xs:
        carry, value = jitted_step(carry, x)
        losses.append(value)
    np.testing.assert_allclose(scan_losses, jnp.stack(losses), rtol=1e-6)
    bn = model.layers[1]
    np.testing.assert_allclose(
        scan_state.get(bn.state_index).var, carry[1].get(bn.state_index).var, rtol=1e-6
    )
    assert not np.allclose(scan_state.get(bn.state_index).var, 1.0)


def test_sequential_passes_state_and_inference_mode_flips_it():
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx.nn.Linear(3, 4, key=jax.random.key(0)), eqx_bn.BatchNorm(4)]
    )
    x = jax.random.normal(jax.random.key(1), (10, 3))
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, new_state = batched(x, state)
    # training: per-feature batch statistics
    np.testing.assert_allclose(jnp.mean(y, axis=0), 0.0, atol=1e-6)
    inference = eqx.nn.inference_mode(model)
    assert inference is not model and model.layers[1].inference is False
    assert inference.layers[1].inference is True
    y_eval, after = jax.vmap(inference, in_axes=(0, None), out_axes=(0, None))(
        x, new_state
    )
    same = jax.tree.map(lambda a, b: bool((a == b).all()), after, new_state)
    assert jax.tree.all(same)
    bn_stats = new_state.get(model.layers[1].state_index)
    h = jax.vmap(model.layers[0])(x)
    expected = (h - bn_stats.mean[None]) / jnp.sqrt(bn_stats.var[None] + 1e-5)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-5, atol=1e-5)


def test_inference_override_and_no_axis_needed():
    """Evaluation needs no named axis (Flax #2606): the `inference=` override."""
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3)
    x = jnp.ones((3, 2))
    y, after = bn(x, state, inference=True)
    assert after is state
    np.testing.assert_allclose(y, 1.0 / jnp.sqrt(1.0 + 1e-5), rtol=1e-6)


def test_configuration_is_static():
    """Only arrays and the `inference` flag are leaves (Equinox #1074)."""
    bn, _ = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3, axis_name=("batch", "data"), momentum=0.9, dtype=jnp.bfloat16
    )
    leaves = jax.tree.leaves(bn)
    assert all(isinstance(leaf, jax.Array) or leaf is False for leaf in leaves)
    assert sum(isinstance(leaf, jax.Array) for leaf in leaves) == 2  # scale, bias
    replicated = jax.device_put(bn, jax.devices()[0])
    assert replicated.axis_name == ("batch", "data")


def test_bfloat16_training_gradients_are_float32_accurate():
    """bf16 inputs: statistics in float32, the gradient in x's dtype."""
    x, ct = data(shape=(8, 3, 4, 4))
    xb = x.astype(jnp.bfloat16)
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, axis_name=None)

    def loss(x):
        y, _ = bn(x, jax.tree.map(lambda a: a, state))  # fresh copy per trace
        return jnp.sum(y * ct)  # y is float32: bf16 x, float32 parameters

    g = jax.grad(loss)(xb)
    assert g.dtype == jnp.bfloat16
    g32 = jax.grad(loss)(xb.astype(jnp.float32))
    np.testing.assert_allclose(
        g.astype(jnp.float32), g32, rtol=float(jnp.finfo(jnp.bfloat16).eps), atol=1e-2
    )


def _vmapped(bn, state, x, nesting):
    """`bn` (channels last) over a batch `x` `(4, 2, 3)`: under `vmap`
    (`"vmap"`), under two named vmaps (`"two_axes"`), or per time step (axis 1)
    under an unnamed vmap inside the named one (`"unnamed_inside"`; then no new
    State, one per time step)."""
    if nesting == "vmap":
        return jax.vmap(
            lambda xi: bn(xi, state), axis_name="batch", out_axes=(0, None)
        )(x)
    if nesting == "two_axes":
        inner = jax.vmap(lambda xi: bn(xi, state), axis_name="b", out_axes=(0, None))
        both = jax.vmap(inner, axis_name="a", out_axes=(0, None))
        y, state = both(x.reshape((2, 2) + x.shape[1:]))
        return y.reshape(x.shape), state
    per_step = jax.vmap(lambda xt: bn(xt, state)[0])
    return jax.vmap(per_step, axis_name="batch")(x), None


@pytest.mark.parametrize("virtual_batch_size", [None, 2])
@pytest.mark.parametrize("nesting", ["vmap", "two_axes", "unnamed_inside"])
def test_grad_of_a_jitted_vmap(nesting, virtual_batch_size):
    """`jax.grad(jax.jit(f))`, `f` vmapping the layer, as `jax.jit(jax.grad(f))`.

    From outside the jit, JAX (0.10) traces the custom JVP's rule without the
    vmap axes in its axis environment: a rule (or a function it calls) jitted
    there, traced unbatched, could not hold the collectives over them."""
    axis_name = {"two_axes": ("a", "b")}.get(nesting, "batch")
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3,
        axis_name,
        momentum=0.9,
        channels_last=True,
        virtual_batch_size=virtual_batch_size,
    )
    # Batches of two examples (virtual batches, per time step) are normalised by
    # the spread of two values, which multiplies the last-bit differences between
    # the two orders of summation (inside and outside the jit) by 1/std: with two
    # values 0.07 apart (seed 0 under the test session's threefry counters), 30-fold,
    # past rtol=1e-5. This checks where the rule is traced, not conditioning: keep
    # every pair apart.
    x, ct = data(seed=5, shape=(4, 2, 3))
    pairs = jnp.abs(x[:, None] - x[None, :])[~np.eye(4, dtype=bool)]
    assert float(jnp.min(pairs)) > 0.2, "the data no longer keeps pairs apart"
    params, static = eqx.partition(bn, eqx.is_inexact_array)

    def loss(params, x, state):
        y, state = _vmapped(eqx.combine(params, static), state, x, nesting)
        return jnp.sum(y * ct), state

    def fresh():  # a State is used once
        return jax.tree.map(lambda a: a, state)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    got, got_state = jax.grad(jax.jit(loss), argnums=(0, 1), has_aux=True)(
        params, x, fresh()
    )
    want, want_state = jax.jit(grad)(params, x, fresh())
    for a, b in zip(
        jax.tree.leaves((got, got_state)), jax.tree.leaves((want, want_state))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

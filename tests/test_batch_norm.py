"""Parity of eqx_bn.BatchNorm with flax.linen.BatchNorm and flax.nnx.BatchNorm."""

import contextlib
import dataclasses
from unittest import mock

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import channels_first, channels_last, flax_promotion, flax_train_step
from hypothesis import given, settings, strategies as st

import eqx_bn
from eqx_bn._numerics import isolates_passes


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    features: int
    spatial: tuple[int, ...]
    momentum: float
    eps: float
    use_bias: bool
    use_scale: bool
    x_dtype: str
    out_dtype: str | None
    mask: str  # "none" | "example" | "element"
    use_fast_variance: bool
    channels_last: bool = False  # eqx_bn's layout; the comparisons are channels first
    # Force the fused path's pass isolation on or off (None: the layer's own rule,
    # which shares the passes on inputs as small as these).
    isolate: bool | None = None
    steps: int = 3


cases = st.builds(
    Case,
    batch=st.integers(2, 6),
    features=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    use_bias=st.booleans(),
    use_scale=st.booleans(),
    x_dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    out_dtype=st.sampled_from([None, None, "float32", "bfloat16"]),
    mask=st.sampled_from(["none", "example", "element"]),
    use_fast_variance=st.booleans(),
    channels_last=st.booleans(),
    isolate=st.sampled_from([None, True, False]),
)


def float32_case(**fields) -> Case:
    """A float32 case with scale, bias, momentum 0.9 and eps 1e-5; `fields` set
    the rest (batch, features, spatial, mask, use_fast_variance) or override."""
    defaults = dict(
        batch=4,
        features=3,
        spatial=(),
        momentum=0.9,
        eps=1e-5,
        use_bias=True,
        use_scale=True,
        x_dtype="float32",
        out_dtype=None,
        mask="none",
        use_fast_variance=True,
    )
    return Case(**{**defaults, **fields})


def make_inputs(case: Case, seed: int):
    """`steps` training batches (channels first) with offset, scaled channels, masks."""
    rng = np.random.default_rng(seed)
    shape = (case.batch, case.features, *case.spatial)
    offset = rng.uniform(-2, 2, size=(1, case.features) + (1,) * len(case.spatial))
    spread = rng.uniform(0.5, 2, size=offset.shape)
    xs, masks = [], []
    for _ in range(case.steps + 1):
        x = offset + spread * rng.standard_normal(shape)
        xs.append(jnp.asarray(x, dtype=case.x_dtype))
        if case.mask == "none":
            masks.append(None)
        elif case.mask == "example":
            m = rng.random(case.batch) < 0.7
            m[0] = True
            masks.append(
                jnp.asarray(m).reshape((case.batch,) + (1,) * (len(shape) - 1))
            )
        else:
            m = rng.random(shape) < 0.7
            m[0] = True  # every channel keeps at least one element
            masks.append(jnp.asarray(m))
    return xs, masks


def flax_linen_bn(case: Case) -> nn.BatchNorm:
    return nn.BatchNorm(
        momentum=case.momentum,
        epsilon=case.eps,
        use_bias=case.use_bias,
        use_scale=case.use_scale,
        dtype=case.out_dtype,
        use_fast_variance=case.use_fast_variance,
    )


def flax_reference(case: Case, xs, masks):
    """Train `steps` steps with flax.linen.BatchNorm, then evaluate on the last batch.

    Returns `[(y, mean, var) per step], y_eval`, channels first.
    """
    bn = flax_linen_bn(case)

    @jax.jit
    def run(xs, masks):
        with flax_promotion():
            variables = bn.init(jax.random.key(0), channels_last(xs[0]), False)
            outs = []
            for x, m in zip(xs[:-1], masks[:-1]):
                y, stats = flax_train_step(bn, variables, x, m)
                variables = {**variables, "batch_stats": stats}
                outs.append((y, stats["mean"], stats["var"]))
            y_eval = bn.apply(variables, channels_last(xs[-1]), True)
        return outs, channels_first(y_eval)

    return run(xs, masks)


def ours(case: Case, xs, masks, *, batched_call: bool):
    """The same with eqx_bn: per example under vmap, or on the whole batch.

    With `case.channels_last` the layer gets (and returns) channels-last arrays;
    the results are handed back channels first, as the references give them.
    """
    if case.channels_last:
        xs = [channels_last(x) for x in xs]
        masks = [None if m is None else channels_last(m) for m in masks]
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        case.features,
        axis_name=None if batched_call else "batch",
        momentum=case.momentum,
        eps=case.eps,
        use_bias=case.use_bias,
        use_scale=case.use_scale,
        dtype=case.out_dtype,
        use_fast_variance=case.use_fast_variance,
        channels_last=case.channels_last,
    )

    def call(layer, x, state, mask):
        if batched_call:
            return layer(x, state, mask=mask)
        # vmap hands each example its own slice of the mask.
        return jax.vmap(
            lambda xi, s, mi: layer(xi, s, mask=mi),
            axis_name="batch",
            in_axes=(0, None, None if mask is None else 0),
            out_axes=(0, None),
        )(x, state, mask)

    @eqx.filter_jit
    def run(bn, state, xs, masks):
        outs = []
        for x, m in zip(xs[:-1], masks[:-1]):
            y, state = call(bn, x, state, m)
            stats = state.get(bn.state_index)
            outs.append((y, stats.mean, stats.var))
        y_eval, state_after = call(eqx.nn.inference_mode(bn), xs[-1], state, None)
        return outs, y_eval, state, state_after

    rule = contextlib.nullcontext()
    if case.isolate is not None:
        rule = mock.patch.object(
            eqx_bn._batch_norm, "isolates_passes", lambda *_: case.isolate
        )
    with rule:
        outs, y_eval, state, state_after = run(bn, state, xs, masks)
    unchanged = jax.tree.map(np.array_equal, state_after, state)  # NumPy: no compile
    assert jax.tree.all(unchanged), "inference mode changed the state"
    if case.channels_last:
        outs = [(channels_first(y), mean, var) for y, mean, var in outs]
        y_eval = channels_first(y_eval)
    return outs, y_eval


def conditioning(case: Case, xs, masks) -> float:
    """How much Flax's one-pass variance `E[x^2] - E[x]^2` amplifies rounding.

    Its absolute error is about `eps * E[x^2]`, so relative to `var + eps` the
    amplification is `E[x^2] / (var + eps)`; the two-pass variance has none. eqx_bn
    shifts before the one-pass sums and is not affected, so Flax's error is the
    one that sets how close the two can be expected to agree.
    """
    if not case.use_fast_variance:
        return 1.0
    worst = 1.0
    for x, m in zip(xs[:-1], masks[:-1]):
        x = np.asarray(x, np.float64)
        w = np.ones_like(x) if m is None else np.broadcast_to(np.asarray(m), x.shape)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        n = w.sum(axes)
        mean = (w * x).sum(axes) / n
        second = (w * x * x).sum(axes) / n
        var = second - mean**2
        worst = max(worst, float(np.max(second / (var + case.eps))))
    return worst


def assert_close(actual, expected, kappa=1.0):
    """Equal up to float32 rounding (times `kappa`) or one ulp of a narrower dtype."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    # Statistics are accumulated in another order than Flax's: a few ulps of float32.
    tol = 16 * float(jnp.finfo(jnp.float32).eps) * kappa
    if actual.dtype != jnp.float32:
        tol = max(tol, float(jnp.finfo(actual.dtype).eps))
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        np.asarray(expected, np.float64),
        rtol=tol,
        atol=tol,
    )


def check_case(case: Case, seed: int, batched_call: bool, reference=None):
    """eqx_bn against `reference` (default: flax.linen) on the same training run."""
    xs, masks = make_inputs(case, seed)
    expected, expected_eval = (reference or flax_reference)(case, xs, masks)
    actual, actual_eval = ours(case, xs, masks, batched_call=batched_call)
    kappa = conditioning(case, xs, masks)
    for (y, mean, var), (fy, fmean, fvar) in zip(actual, expected):
        assert_close(mean, fmean)
        assert_close(var, fvar, kappa)
        assert_close(y, fy, kappa)
    assert_close(actual_eval, expected_eval, kappa)


@settings(max_examples=30, deadline=None)
@given(case=cases, seed=st.integers(0, 2**16), batched_call=st.booleans())
def test_matches_flax_linen(case, seed, batched_call):
    check_case(case, seed, batched_call)


def flax_nnx_reference(case: Case, xs, masks):
    """The same training run with flax.nnx.BatchNorm (matches linen with dtype=None)."""
    bn = nnx.BatchNorm(
        case.features,
        momentum=case.momentum,
        epsilon=case.eps,
        use_bias=case.use_bias,
        use_scale=case.use_scale,
        use_fast_variance=case.use_fast_variance,
        rngs=nnx.Rngs(0),
    )
    graphdef, variables = nnx.split(bn)

    @jax.jit  # one program, as the linen reference (eagerly: one per operation)
    def run(variables, xs, masks):
        bn = nnx.merge(graphdef, variables)
        outs = []
        with flax_promotion():
            for x, m in zip(xs[:-1], masks[:-1]):
                y = bn(channels_last(x), mask=None if m is None else channels_last(m))
                outs.append((channels_first(y), bn.mean[...], bn.var[...]))
            bn.eval()
            y_eval = bn(channels_last(xs[-1]))
        return outs, channels_first(y_eval)

    return run(variables, xs, masks)


def nnx_agrees_with_linen(case: Case) -> bool:
    """nnx matches linen with `dtype=None`, except for a half-precision `x` with
    neither scale nor bias: linen returns x's dtype there, nnx float32 (see
    `test_nnx_and_linen_differ_without_affine_parameters`). eqx_bn follows linen."""
    no_affine = not (case.use_scale or case.use_bias)
    return case.out_dtype is None and not (no_affine and case.x_dtype != "float32")


def test_nnx_and_linen_differ_without_affine_parameters():
    x = jnp.ones((4, 3), jnp.bfloat16)
    linen = nn.BatchNorm(use_running_average=False, use_scale=False, use_bias=False)
    with flax_promotion():
        variables = linen.init(jax.random.key(0), x)
        y_linen, _ = linen.apply(variables, x, mutable=["batch_stats"])
        nnx_bn = nnx.BatchNorm(3, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
        y_nnx = nnx_bn(x)
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3, axis_name=None, use_scale=False, use_bias=False
    )
    y_ours, _ = bn(x, state)
    assert y_linen.dtype == jnp.bfloat16 and y_nnx.dtype == jnp.float32
    assert y_ours.dtype == y_linen.dtype


@settings(max_examples=8, deadline=None)
@given(
    case=cases.filter(nnx_agrees_with_linen),
    seed=st.integers(0, 2**16),
    batched_call=st.booleans(),
)
def test_matches_flax_nnx(case, seed, batched_call):
    check_case(case, seed, batched_call, reference=flax_nnx_reference)


class TestAgainstEquinoxBatchNorm:
    """Where `eqx.nn.BatchNorm`'s numbers differ from Flax's, and eqx_bn's do not.

    - `mode="ema"` (Equinox's default) normalises training batches with a blend of
      the running and batch statistics (after the first step), not with the batch's
      own statistics: training outputs differ from the second step on.
    - `mode="batch"` trains like Flax, but evaluates with running averages divided by
      `1 - momentum**steps` (zero-debiasing), so eval outputs differ.
    """

    case = float32_case(batch=8, spatial=(4, 4), use_fast_variance=False)

    def equinox_run(self, mode, xs):
        bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            self.case.features, "batch", momentum=self.case.momentum, mode=mode
        )
        call = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        ys = []
        for x in xs[:-1]:
            y, state = call(x, state)
            ys.append(y)
        infer = eqx.nn.inference_mode(bn)
        y_eval, _ = jax.vmap(
            infer, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(xs[-1], state)
        return ys, y_eval

    def test_ema_mode_normalises_training_batches_differently(self):
        xs, masks = make_inputs(self.case, 0)
        expected, _ = flax_reference(self.case, xs, masks)
        actual, _ = ours(self.case, xs, masks, batched_call=False)
        ema, _ = self.equinox_run("ema", xs)
        # Step 2: Flax and eqx_bn use the batch's own statistics, "ema" does not.
        assert_close(actual[1][0], expected[1][0])
        assert not np.allclose(ema[1], expected[1][0], atol=1e-3)

    def test_batch_mode_trains_alike_but_evaluates_debiased(self):
        xs, masks = make_inputs(self.case, 0)
        expected, expected_eval = flax_reference(self.case, xs, masks)
        actual, actual_eval = ours(self.case, xs, masks, batched_call=False)
        batch, batch_eval = self.equinox_run("batch", xs)
        for y_eqx, (fy, _, _) in zip(batch, expected):
            # Equinox divides by sqrt(var + eps) instead of multiplying by rsqrt:
            # the same value up to a few float32 ulps.
            np.testing.assert_allclose(y_eqx, fy, rtol=1e-5, atol=1e-5)
        assert_close(actual_eval, expected_eval)
        assert not np.allclose(batch_eval, expected_eval, atol=1e-3)


@pytest.mark.parametrize("isolate", [True, False])
@pytest.mark.parametrize("mask", ["none", "example", "element"])
def test_both_pass_layouts_match_flax(isolate, mask):
    """The fused path with isolated passes (large inputs) and with shared ones (small
    channels-first feature maps, small inputs; see `isolates_passes`) gives Flax's
    numbers either way."""
    case = float32_case(spatial=(8, 8), mask=mask, isolate=isolate)
    check_case(case, 0, batched_call=False)
    check_case(case, 1, batched_call=True)
    check_case(dataclasses.replace(case, channels_last=True), 2, batched_call=False)


@pytest.mark.parametrize(
    "batch, spatial", [(4, (1, 1)), (4, (1, 3)), (3, (2, 1, 1)), (1, (2, 2))]
)
@pytest.mark.parametrize("mask", ["none", "example", "element"])
def test_size_one_axes_match_flax(batch, spatial, mask):
    """Size-1 axes (1x1 feature maps, a batch of one) are squeezed out before the
    computation, which XLA:CPU runs far faster; shapes and numbers are Flax's."""
    case = float32_case(batch=batch, spatial=spatial, mask=mask)
    check_case(case, 0, batched_call=False)
    check_case(case, 1, batched_call=True)
    check_case(dataclasses.replace(case, channels_last=True), 2, batched_call=True)


def test_pass_isolation_rule():
    assert isolates_passes((64, 64, 32, 32), 1)  # 1024-element runs
    assert isolates_passes((64, 128, 8, 16), 1)  # 128
    assert not isolates_passes((64, 256, 8, 8), 1)  # 64: stays in cache
    assert not isolates_passes((512, 4, 4), 0, replicas=64)  # per example, vmap
    assert isolates_passes((1024, 512), 1)  # no spatial axis
    assert isolates_passes((512,), 0, replicas=1024)
    assert isolates_passes((64, 4, 4, 512), 3)  # channels last: any size but...
    assert not isolates_passes((64, 2, 2, 64), 3)  # ...in cache (16Ki elements)
    assert not isolates_passes((2, 2, 64), 2, replicas=64)  # the same under vmap
    assert not isolates_passes((512,), 0)  # one example of an MLP, no vmap


def test_vmap_axis_sizes_count_towards_the_rule():
    """Under vmap the layer sees one example; the batch counts in the rule."""
    seen = []

    def spy(shape, channel_axis, replicas=1):
        seen.append(replicas)
        return isolates_passes(shape, channel_axis, replicas)

    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3)
    with mock.patch.object(eqx_bn._batch_norm, "isolates_passes", spy):
        jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            jnp.ones((6, 3, 2)), state
        )
    assert seen == [6]

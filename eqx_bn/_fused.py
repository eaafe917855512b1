"""The numerics of one BatchNorm call: normalisation, and the fused training path.

The training path is a `jax.custom_jvp` whose tangent is the closed-form BatchNorm
derivative. Reverse mode transposes it, which gives the familiar analytic gradient
(two per-channel reductions over `g` and `g * x_hat`) instead of the long chain that
autodiff builds through the mean, the variance and the `rsqrt`. Being a JVP rule, it
stays differentiable: `jax.hessian` and `jax.jvp` work through it. Only numbers
live here; the layer's configuration is interpreted in `_batch_norm.py`.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array

from ._dtypes import promote_arrays
from ._stats import (
    Moments,
    Reduction,
    expand_channels,
    global_sums,
    moments,
    private_copies,
)


class TrainConfig(NamedTuple):
    """Static configuration of the training path (hashable, part of the jit key)."""

    reduction: Reduction
    eps: float
    use_fast_variance: bool
    stat_dtype: np.dtype
    out_dtype: np.dtype


def normalize(
    x: Array,
    mean: Array,
    var: Array,
    scale: Array | None,
    bias: Array | None,
    eps: float,
    out_dtype: np.dtype,
    axes: tuple[int, ...],
) -> Array:
    """`(x - mean) * (rsqrt(var + eps) * scale) + bias`, in Flax's order and dtypes."""
    y, m = promote_arrays(x, expand_channels(mean, axes))
    y = y - m
    mul = lax.rsqrt(var + eps)
    if scale is not None:
        mul, s = promote_arrays(mul, scale)
        mul = mul * s
    y, mul = promote_arrays(y, expand_channels(mul, axes))
    y = y * mul
    if bias is not None:
        y, b = promote_arrays(y, expand_channels(bias, axes))
        y = y + b
    return y.astype(out_dtype)


def _forward(cfg: TrainConfig, x, passes, mask, scale, bias) -> tuple[Array, Moments]:
    stats = moments(
        passes,
        mask,
        cfg.reduction,
        use_fast_variance=cfg.use_fast_variance,
        dtype=cfg.stat_dtype,
    )
    y = normalize(
        x,
        stats.mean,
        stats.var,
        scale,
        bias,
        cfg.eps,
        cfg.out_dtype,
        cfg.reduction.axes,
    )
    return y, stats


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def train_normalize(
    cfg: TrainConfig,
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
) -> tuple[Array, Moments]:
    """Normalises `x` with its own batch statistics; returns the output and the stats.

    The statistics are differentiable outputs too (their tangents are exact), so a
    loss that reads the updated running statistics is differentiated correctly.
    """
    passes = private_copies(x, 2, cfg.reduction.isolate_passes)
    return _forward(cfg, x, passes, mask, scale, bias)


@train_normalize.defjvp
def _train_normalize_jvp(cfg: TrainConfig, primals, tangents):
    """The closed-form tangent, shaped so that its transpose is three fused passes.

    With `c = x - mean`, `mul = rsqrt(var + eps) * scale` and the masked sums
    `S1 = sum(dx)`, `S2 = sum(c * dx)`:

        dy = dx * mul + (dbias - dmean * mul) + c * dmul
        dmean = S1 / n,  dvar = 2 S2 / n,  dmul = d(rsqrt(var + eps)) * scale + ...

    Reverse mode transposes this into `sum(g)`, `sum(g * c)` and one elementwise
    pass for the input gradient. The per-channel broadcast term carries
    `dbias - dmean * mul` together, so its transpose is a reduction of `g` alone, and
    each use of `x` and `mean` has its own copy (`private_copies`), so no full-size
    intermediate is written between the passes.
    """
    x, mask, scale, bias = primals
    dx, _, dscale, dbias = tangents
    isolate = cfg.reduction.isolate_passes
    x_stats_a, x_stats_b, x_sums, x_out = private_copies(x, 4, isolate)
    y, stats = _forward(cfg, x, (x_stats_a, x_stats_b), mask, scale, bias)

    red = cfg.reduction
    axes = red.axes
    x_sums, x_out = x_sums.astype(cfg.stat_dtype), x_out.astype(cfg.stat_dtype)
    dxs = dx.astype(cfg.stat_dtype)
    denom = jnp.maximum(stats.count, jnp.ones_like(stats.count))
    mean_sums, mean_out = private_copies(stats.mean, 2, isolate)

    centred = x_sums - expand_channels(mean_sums, axes)
    sum_dx, sum_centred_dx = global_sums((dxs, centred * dxs), mask, red)
    dmean = sum_dx / denom
    dvar = 2 * sum_centred_dx / denom

    inv = lax.rsqrt(stats.var + cfg.eps)
    dinv = -0.5 * inv * inv * inv * dvar
    if scale is None:
        mul, dmul = inv, dinv
    else:
        inv_s, s = promote_arrays(inv, scale)
        dinv_s, ds = promote_arrays(dinv, dscale)
        mul, dmul = inv_s * s, dinv_s * s + inv_s * ds
    offset, mul = promote_arrays(-dmean, mul)
    offset = offset * mul
    if bias is not None:
        offset, db = promote_arrays(offset, dbias)
        offset = offset + db
    dy, mul_b = promote_arrays(dxs, expand_channels(mul, axes))
    dy = dy * mul_b
    dy, offset_b = promote_arrays(dy, expand_channels(offset, axes))
    dy = dy + offset_b
    dy, dmul_b = promote_arrays(dy, expand_channels(dmul, axes))
    centred_out = (x_out - expand_channels(mean_out, axes)).astype(dy.dtype)
    dy = dy + centred_out * dmul_b
    dstats = Moments(dmean, dvar, jnp.zeros_like(stats.count))
    return (y, stats), (dy.astype(y.dtype), dstats)

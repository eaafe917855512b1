"""Batch statistics: a local masked reduction, then an exact sum over named axes.

Flax averages per-device means (`lax.pmean` of local means). Here every member of the
reduction contributes *sums and counts*, so the result is the statistics of the global
batch even when masks or shards leave members with different numbers of elements.
With equal, unmasked shards the two agree up to float rounding.

BatchNorm is memory-bound, so these functions are written for the fusions that XLA
makes: every full-size expression feeds exactly one reduction (see `private_copies`),
so that each reduction reads its inputs once and nothing full-size is written.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from ._typing import AxisName


class Reduction(NamedTuple):
    """Where the statistics of one channel are collected.

    - `axes`: the local axes of `x` summed over (every axis but the channel axis).
    - `axis_name`: named axes (vmap/pmap/shard_map) summed over afterwards, or None.
    - `axis_index_groups`: sub-groups of `axis_name`, as in `jax.lax.psum`.
    - `isolate_passes`: give each full-size pass its own copy of its inputs (see
        `private_copies` and `isolates_passes`).
    """

    axes: tuple[int, ...]
    axis_name: AxisName | None
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    isolate_passes: bool = True


def isolates_passes(
    shape: tuple[int, ...], channel_axis: int, replicas: int = 1
) -> bool:
    """Whether `private_copies` pays off for an input of `shape`, channels on
    `channel_axis`, of which `replicas` are reduced together (the sizes of the named
    axes: under `vmap`, the batch).

    Measured on XLA:CPU (jax 0.10.2) with interleaved A/B timing of the layer's
    gradient: isolating the passes is 13-30% faster when each channel's contiguous
    run (the spatial size) is 128 elements or more, or when there is no spatial axis
    (channels minor), and 16-86% slower for runs of 2 to 64 elements (8x8 and 4x4
    feature maps), where the shared expression stays in cache. Below 64Ki elements
    in all (256 KiB of float32) everything stays in cache and sharing is as fast or
    faster (channels last, 16Ki elements: 0.99x Flax's time shared, 1.14x isolated).
    """
    if int(np.prod(shape, dtype=np.int64)) * replicas <= 2**16:
        return False
    run = int(np.prod(shape[channel_axis + 1 :], dtype=np.int64))
    return run == 1 or run >= 128


class Moments(NamedTuple):
    """Per-channel mean, biased variance and number of elements that contributed."""

    mean: Float[Array, " channels"]
    var: Float[Array, " channels"]
    count: Float[Array, " channels"]


def private_copies(v: Array, n: int, enabled: bool = True) -> tuple[Array, ...]:
    """`n` copies of `v` that XLA cannot merge back into one.

    When one broadcast per-channel vector (or one conversion of `x` to float32)
    feeds several full-size consumers, XLA's CPU backend writes the shared
    expression out in full and reads it back, because a reduction fusion cannot
    share a producer. Giving each consumer its own copy keeps every pass fused. The
    barrier costs nothing at run time (on `x` it only asks for `x` itself in
    memory, which its several readers need anyway), and it is differentiable, so
    higher-order derivatives still work. XLA does merge two identical barriers, so
    take all the copies of one array in one call.

    With `enabled=False` every copy is `v` itself (see `isolates_passes`).
    """
    if n == 1 or not enabled:
        return (v,) * n
    return tuple(lax.optimization_barrier((v,) * n))


def align_mask(mask: Array, ndim: int) -> Array:
    """`mask` with leading size-1 axes added up to `ndim`, as broadcasting reads it."""
    return jnp.reshape(mask, (1,) * (ndim - mask.ndim) + mask.shape)


def _masked_sum(v: Array, mask: Array | None, axes: tuple[int, ...]) -> Array:
    """`jnp.sum(v, axes, where=mask)`, summing first where the mask is constant.

    XLA's CPU reductions cannot fuse a `select`, so a mask applied element by
    element writes the masked array out in full first. A mask that is constant
    along some axes (one flag per example, say) is applied to the partial sums over
    those axes instead, which are small. `select` ignores what it does not pick, so
    NaN or inf in masked-out elements stay out of the result either way.
    """
    if mask is None:
        return jnp.sum(v, axis=axes)
    m = align_mask(mask, v.ndim)
    constant = tuple(a for a in axes if m.shape[a] == 1)
    partial = jnp.sum(v, axis=constant, keepdims=True) if constant else v
    keep = jnp.broadcast_to(m, partial.shape)
    return jnp.sum(jnp.where(keep, partial, jnp.zeros_like(partial)), axis=axes)


def global_sums(
    values: tuple[Array, ...], mask: Array | None, red: Reduction
) -> tuple[Array, ...]:
    """Sums each of `values` over the local axes, then all of them over the named axes.

    `mask` (broadcastable to the values) selects the elements that count. The
    partial sums go to one `psum` as a tuple: across devices that is one
    all-reduce, and under `vmap` each becomes its own reduction over the batch,
    which XLA merges with the local one. (Stacking them into one array instead
    kept XLA from merging: a channels-last layer under `vmap` wrote per-example
    partial sums out and ran 35% slower.)
    """
    masks = (
        (None,) * len(values)
        if mask is None
        else private_copies(mask, len(values), red.isolate_passes)
    )
    local = tuple(_masked_sum(v, m, red.axes) for v, m in zip(values, masks))
    if red.axis_name is None:
        return local
    return tuple(
        lax.psum(local, red.axis_name, axis_index_groups=red.axis_index_groups)
    )


def _first_position(v: Array, axes: tuple[int, ...]) -> Array:
    """`v` at index 0 along `axes`.

    With a batch sharded over an explicit-sharding mesh (`jax.make_mesh`'s default),
    JAX cannot slice one element out of a sharded dimension. Along such dimensions
    a one-hot sum picks it instead, after slicing the others, so it is a tiny
    reduction (an all-reduce of one value per channel).
    """
    spec = tuple(jax.typeof(v).sharding.spec)
    spec += (None,) * (v.ndim - len(spec))
    sliced = [a for a in axes if spec[a] is None]
    kept = [i for i in range(v.ndim) if i not in sliced]
    v = v[tuple(0 if i in sliced else slice(None) for i in range(v.ndim))]
    sharded = tuple(kept.index(a) for a in axes if a not in sliced)
    if not sharded:
        return v
    first = lax.broadcasted_iota(jnp.int32, v.shape, sharded[0]) == 0
    for a in sharded[1:]:
        first = first & (lax.broadcasted_iota(jnp.int32, v.shape, a) == 0)
    return jnp.sum(jnp.where(first, v, jnp.zeros_like(v)), axis=sharded)


def _shift(x: Array, mask: Array | None, red: Reduction, dtype: np.dtype) -> Array:
    """A per-channel value inside the data, the same on every member of the reduction.

    Subtracting it before the one-pass sums keeps `E[x^2] - E[x]^2` accurate when
    |mean| >> std: it is the (masked) average of each member's first element, in
    `dtype`. Only the first elements are converted, so that the conversion of `x`
    itself stays fused into the reduction that reads it.
    """
    first = _first_position(x, red.axes).astype(dtype)
    if mask is None:
        weight = jnp.ones_like(first)
    else:
        weight = _first_position(jnp.broadcast_to(mask, x.shape), red.axes).astype(
            dtype
        )
    first = jnp.where(weight > 0, first, jnp.zeros_like(first))
    if red.axis_name is not None:
        first, weight = lax.psum(
            (first, weight), red.axis_name, axis_index_groups=red.axis_index_groups
        )
    return lax.stop_gradient(first / jnp.maximum(weight, jnp.ones_like(weight)))


def element_count(
    x: Array, mask: Array | None, red: Reduction, dtype: np.dtype
) -> Array:
    """Number of elements per channel that the statistics are taken over, in `dtype`.

    Along the axes where the mask does not vary, the count is a product of sizes
    rather than a sum over the broadcast mask, which would cost a pass over `x`.
    """
    channel_axis = next(i for i in range(x.ndim) if i not in red.axes)
    channels = x.shape[channel_axis]
    if mask is None:
        local = float(np.prod([x.shape[a] for a in red.axes]))
        count = jnp.full((channels,), local, dtype=dtype)
    else:
        m = align_mask(mask, x.ndim)
        varying = tuple(a for a in red.axes if m.shape[a] != 1)
        repeats = float(np.prod([x.shape[a] for a in red.axes if m.shape[a] == 1]))
        count = jnp.sum(m.astype(dtype), axis=varying, keepdims=True) * repeats
        count = jnp.broadcast_to(jnp.reshape(count, (-1,)), (channels,))
    if red.axis_name is None:
        return count
    return lax.psum(count, red.axis_name, axis_index_groups=red.axis_index_groups)


def moments(
    passes: tuple[Float[Array, "..."], Float[Array, "..."]],
    mask: Bool[Array, "..."] | None,
    red: Reduction,
    *,
    use_fast_variance: bool,
    dtype: np.dtype,
) -> Moments:
    """Mean and biased variance per channel of `x`, reduced in `dtype`.

    `passes` is `x` twice, as `private_copies(x, 2)` gives it: each of the two
    reductions converts its own copy to `dtype`, so that a half-precision `x` is
    read as such rather than written out in float32 first. (Take the copies once
    per call of the layer: XLA merges two barriers on the same array.)

    With `use_fast_variance`, the shifted first and second sums are two independent
    reductions of `x` that XLA runs without writing anything full-size; otherwise
    the variance is a second pass over `x - mean`, as Flax's two-pass mode. The
    variance is clipped at zero. Channels with no element (everything masked) get
    mean 0 and variance 0 instead of Flax's NaN; the caller sees `count == 0`.
    """
    x_a, x_b = (v.astype(dtype) for v in passes)
    count = element_count(x_a, mask, red, dtype)
    denom = jnp.maximum(count, jnp.ones_like(count))
    if use_fast_variance:
        shift = _shift(passes[0], mask, red, dtype)
        shift_a, shift_b = private_copies(shift, 2, red.isolate_passes)
        centred_a = x_a - expand_channels(shift_a, red.axes)
        centred_b = x_b - expand_channels(shift_b, red.axes)
        first, second = global_sums((centred_a, centred_b * centred_b), mask, red)
        delta = first / denom
        mean = shift + delta
        var = jnp.maximum(jnp.zeros_like(delta), second / denom - delta * delta)
    else:
        (total,) = global_sums((x_a,), mask, red)
        mean = total / denom
        centred = x_b - expand_channels(mean, red.axes)
        (squares,) = global_sums((centred * centred,), mask, red)
        var = squares / denom
    return Moments(mean, var, count)


def expand_channels(v: Array, axes: tuple[int, ...]) -> Array:
    """Broadcasts a per-channel vector back against the layout of `x`."""
    return jnp.expand_dims(v, axes) if axes else v

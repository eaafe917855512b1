"""Batch statistics: a local masked reduction, then an exact sum over named axes.

Flax averages per-device means (`lax.pmean` of local means). Here every member of the
reduction contributes *sums and counts*, so the result is the statistics of the global
batch even when masks or shards leave members with different numbers of elements.
With equal, unmasked shards the two agree up to float rounding.
"""

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from ._typing import AxisName


class Reduction(NamedTuple):
    """Where the statistics of one channel are collected.

    - `axes`: the local axes of `x` summed over (every axis but the channel axis).
    - `axis_name`: named axes (vmap/pmap/shard_map) summed over afterwards, or None.
    - `axis_index_groups`: sub-groups of `axis_name`, as in `jax.lax.psum`.
    """

    axes: tuple[int, ...]
    axis_name: AxisName | None
    axis_index_groups: tuple[tuple[int, ...], ...] | None


class Moments(NamedTuple):
    """Per-channel mean, biased variance and number of elements that contributed."""

    mean: Float[Array, " channels"]
    var: Float[Array, " channels"]
    count: Float[Array, " channels"]


def global_sums(
    values: tuple[Array, ...], where: Array | None, red: Reduction
) -> tuple[Array, ...]:
    """Sums each of `values` over the local axes, then all of them over the named axes.

    The per-channel partial sums are stacked so that they travel in one `psum`.
    """
    local = tuple(jnp.sum(v, axis=red.axes, where=where) for v in values)
    if red.axis_name is None:
        return local
    total = lax.psum(
        jnp.stack(local), red.axis_name, axis_index_groups=red.axis_index_groups
    )
    return tuple(total[i] for i in range(len(values)))


def _first_position(v: Array, axes: tuple[int, ...]) -> Array:
    index = tuple(0 if i in axes else slice(None) for i in range(v.ndim))
    return v[index]


def _shift(x: Array, mask: Array | None, red: Reduction) -> Array:
    """A per-channel value inside the data, the same on every member of the reduction.

    Subtracting it before the one-pass sums keeps `E[x^2] - E[x]^2` accurate when
    |mean| >> std: it is the (masked) average of each member's first element.
    """
    first = _first_position(x, red.axes)
    if mask is None:
        weight = jnp.ones_like(first)
    else:
        weight = _first_position(jnp.broadcast_to(mask, x.shape), red.axes).astype(
            x.dtype
        )
    first = jnp.where(weight > 0, first, jnp.zeros_like(first))
    if red.axis_name is not None:
        both = lax.psum(
            jnp.stack([first, weight]),
            red.axis_name,
            axis_index_groups=red.axis_index_groups,
        )
        first, weight = both[0], both[1]
    return lax.stop_gradient(first / jnp.maximum(weight, jnp.ones_like(weight)))


def element_count(x: Array, mask: Array | None, red: Reduction) -> Array:
    """Number of elements per channel that the statistics are taken over."""
    channel_axis = next(i for i in range(x.ndim) if i not in red.axes)
    if mask is None:
        local = 1
        for a in red.axes:
            local *= x.shape[a]
        count = jnp.full((x.shape[channel_axis],), float(local), dtype=x.dtype)
        if red.axis_name is None:
            return count
        return lax.psum(count, red.axis_name, axis_index_groups=red.axis_index_groups)
    (count,) = global_sums((jnp.broadcast_to(mask, x.shape).astype(x.dtype),), None, red)
    return count


def moments(
    x: Float[Array, "..."],
    mask: Bool[Array, "..."] | None,
    red: Reduction,
    *,
    use_fast_variance: bool,
) -> Moments:
    """Mean and biased variance per channel of `x` (already in the reduction dtype).

    With `use_fast_variance`, one pass over `x` gives shifted first and second sums;
    otherwise the variance is a second pass over `x - mean`, as Flax's two-pass mode.
    The variance is clipped at zero. Channels with no element (everything masked)
    get mean 0 and variance 0 instead of Flax's NaN; the caller sees `count == 0`.
    """
    where = None if mask is None else jnp.broadcast_to(mask, x.shape)
    count = element_count(x, mask, red)
    denom = jnp.maximum(count, jnp.ones_like(count))
    if use_fast_variance:
        shift = _shift(x, mask, red)
        centred = x - expand_channels(shift, red.axes)
        first, second = global_sums((centred, centred * centred), where, red)
        delta = first / denom
        mean = shift + delta
        var = jnp.maximum(jnp.zeros_like(delta), second / denom - delta * delta)
    else:
        (total,) = global_sums((x,), where, red)
        mean = total / denom
        centred = x - expand_channels(mean, red.axes)
        (squares,) = global_sums((centred * centred,), where, red)
        var = squares / denom
    return Moments(mean, var, count)


def expand_channels(v: Array, axes: tuple[int, ...]) -> Array:
    """Broadcasts a per-channel vector back against the layout of `x`."""
    return jnp.expand_dims(v, axes) if axes else v

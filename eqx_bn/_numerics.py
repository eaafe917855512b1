"""The numbers of one BatchNorm call: batch statistics, normalisation, the running
averages, and the custom JVP of the training path.

Pure functions of arrays and of static Python values (axes, axis names, dtypes); the
layer's configuration is read in `_batch_norm.py`, which calls `train` (a training
call: the output and the State entry after it) or `normalize` (inference, frozen).

**What is traced** follows the call: without a mask the element counts are Python
numbers (no mask arithmetic, no sums of ones over the named axes), without named axes
there is no `psum`, and the grouped `psum` appears only with `axis_index_groups`.
`train`'s work is done by jitted functions of the arrays (the custom JVP's primal and
rule, the State entry's update), so that a network's BatchNorms of one kind are
traced, batched, differentiated and lowered once.

**Statistics.** Flax averages per-device means (`lax.pmean` of local means). Here every
member of the reduction contributes *sums and counts*, so the result is the
statistics of the global batch even when masks or shards leave members with
different numbers of elements. With equal, unmasked shards the two agree up to float
rounding. One-pass variances subtract a shift first (`_shift`), so `E[x^2] - E[x]^2`
stays accurate when |mean| >> std.

**Fusion.** BatchNorm is memory-bound, so these functions are written for the
fusions that XLA makes: every full-size expression feeds exactly one reduction (see
`_copies`), so that each reduction reads its inputs once and nothing full-size is
written.

**Variants.** Ghost BatchNorm's virtual batches (`virtual_batches`) and Batch
Renormalization's correction (`renorm`) are options of the same training path: see
`_virtual_batch_sums` and `_renormalised`.

**Derivative.** The training path is a `jax.custom_jvp` whose tangent is the
closed-form BatchNorm derivative. Reverse mode transposes it, which gives the
familiar analytic gradient (two per-channel reductions over `g` and `g * x_hat`)
instead of the long chain that autodiff builds through the mean, the variance and the
`rsqrt`. Being a JVP rule, it stays differentiable: `jax.hessian` and `jax.jvp` work
through it.

**Dtypes.** eqx_bn must round exactly as Flax does, and Flax relies on standard
promotion (`bfloat16 - float32 -> float32`). Promotion here is explicit (`promote`),
so that the library also runs under `jax_numpy_dtype_promotion="strict"`.
"""

import functools
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array

AxisName = Hashable | tuple[Hashable, ...]
Groups = tuple[tuple[int, ...], ...] | None
"""`axis_index_groups` as the layer keeps them (hashable), or None."""


# --------------------------------------------------------------------------- dtypes


def promote(*dtypes) -> np.dtype:
    """The dtype that standard promotion gives for `dtypes`."""
    with jax.numpy_dtype_promotion("standard"):
        return np.dtype(jnp.result_type(*dtypes))


def _promoted(a: Array, b: Array) -> tuple[Array, Array]:
    """`a` and `b` cast to their standard-promoted dtype."""
    dtype = promote(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype)


# --------------------------------------------------------------------------- layout


def align_mask(mask: Array, ndim: int) -> Array:
    """`mask` with leading size-1 axes added up to `ndim`, as broadcasting reads it."""
    return jnp.reshape(mask, (1,) * (ndim - mask.ndim) + mask.shape)


def drop_unit_axes(
    x: Array, mask: Array | None, channel_axis: int
) -> tuple[Array, Array | None, int]:
    """`x` (and `mask`) without their size-1 axes other than the channel axis, and
    where the channel axis is then.

    XLA:CPU runs a fused elementwise-and-reduce kernel over an array with size-1
    axes several times slower: the training step of a `(1024, 512, 1, 1)` batch (a
    feature map pooled to 1x1) took 12x the time of the same data as `(1024, 512)`,
    in Flax (channels last) as well. Squeezing is a bitcast, and so is the reshape
    of the result back to `x`'s shape.
    """
    unit = tuple(i for i, d in enumerate(x.shape) if d == 1 and i != channel_axis)
    if not unit:
        return x, mask, channel_axis
    if mask is not None:
        mask = jnp.squeeze(align_mask(mask, x.ndim), unit)
    channel_axis -= sum(1 for i in unit if i < channel_axis)
    return jnp.squeeze(x, unit), mask, channel_axis


def _expand(v: Array, axes: tuple[int, ...], row: Array | None = None) -> Array:
    """A per-channel vector, broadcastable against the layout of `x`.

    With `row` (strided virtual batches over named axes), `v` is a table with one
    row per virtual batch (a parameter: one row for all), and this member's row
    is taken first.
    """
    if row is not None:
        v = v[row] if v.shape[0] > 1 else v[0]
    return jnp.expand_dims(v, axes) if axes else v


# --------------------------------------------------------------- pass isolation


def isolates_passes(
    shape: tuple[int, ...], channel_axis: int, replicas: int = 1
) -> bool:
    """Whether `_copies` pays off for an input of `shape`, channels on
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


def _copies(v: Array, n: int, isolate: bool) -> tuple[Array, ...]:
    """`n` copies of `v` that XLA cannot merge back into one (with `isolate`), or
    `v` itself `n` times.

    When one broadcast per-channel vector (or one conversion of `x` to float32)
    feeds several full-size consumers, XLA's CPU backend writes the shared
    expression out in full and reads it back, because a reduction fusion cannot
    share a producer. Giving each consumer its own copy keeps every pass fused. The
    barrier costs nothing at run time (on `x` it only asks for `x` itself in
    memory, which its several readers need anyway), and it is differentiable, so
    higher-order derivatives still work. XLA does merge two identical barriers, so
    take all the copies of one array in one call. Whether to isolate:
    `isolates_passes`.
    """
    if n == 1 or not isolate:
        return (v,) * n
    return tuple(lax.optimization_barrier((v,) * n))


# ------------------------------------------------------------------- statistics


class Moments(NamedTuple):
    """Per-channel mean, biased variance and number of elements that contributed:
    a Python number when it is known without looking at the data (no mask), else
    an array."""

    mean: Array
    var: Array
    count: Array | float


class Renorm(NamedTuple):
    """What Batch Renormalization's correction is measured against: the renorm
    moving mean and standard deviation before this step, and the clipping bounds
    (scalars; no bound is `rmin = 0`, `rmax = dmax = inf`). All arrays, so that
    new values (a schedule) need no new trace."""

    mean: Array
    stddev: Array
    rmin: Array
    rmax: Array
    dmax: Array


class Virtual(NamedTuple):
    """Strided virtual batches over named axes: how many, and the one this member
    is in (`virtual_batch_row`, taken once per call where the axes are bound)."""

    count: int
    row: Array


def _psum(
    values, axis_name: AxisName | None, groups: Groups, virtual: Virtual | None = None
):
    """`values` summed over the named axes (as they are, with none); over
    `virtual` strided virtual batches, summed per virtual batch into tables
    (`_virtual_batch_sums`)."""
    if axis_name is None:
        return values
    if virtual is not None:
        return _virtual_batch_sums(values, axis_name, groups, virtual)
    return lax.psum(values, axis_name, axis_index_groups=groups)


def axis_names(axis_name: AxisName | None) -> tuple[Hashable, ...]:
    """The named axes as a tuple: none, one, or the given tuple of names."""
    if axis_name is None:
        return ()
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _member_index(axis_name: AxisName, groups: Groups) -> Array:
    """This member's index along the named axes (row-major over a tuple of names,
    as `jax.lax.axis_index` numbers it), within its group with `groups`."""
    index = lax.axis_index(axis_name)
    if groups is None:
        return index
    position = np.zeros(sum(map(len, groups)), np.int32)
    for group in groups:
        position[list(group)] = np.arange(len(group))
    return jnp.asarray(position)[index]


def virtual_batch_row(axis_name: AxisName, groups: Groups, virtual: int) -> Array:
    """The strided virtual batch of this member: member `i` joins virtual batch
    `i % virtual`, as tf_keras reshapes a batch to `(size, virtual, ...)`."""
    return _member_index(axis_name, groups) % virtual


def unbound_axes(axis_name: AxisName | None) -> list[Hashable]:
    """The named axes whose size JAX does not know here.

    Those that no `vmap`, `pmap` or `shard_map` binds around the call; and, in one
    place, a vmap axis that does bind it: differentiating a jitted function from
    outside (`jax.grad(jax.jit(f))`, `f` vmapping a layer), JAX (0.10) traces the
    custom JVP rule that `vmap` batched without the vmap axis in its axis
    environment, so that a collective that looks a size up (`lax.all_gather`)
    raises `NameError: unbound axis name`, and so does any collective in a function
    jitted there (which is traced unbatched), while a `psum` of traced values
    still works.
    """
    unbound = []
    for name in axis_names(axis_name):
        try:
            lax.axis_size(name)
        except NameError:
            unbound.append(name)
    return unbound


def _virtual_batch_sums(values, axis_name: AxisName, groups: Groups, virtual: Virtual):
    """Per strided virtual batch, the sums of `values` over its members: tables
    with one row per virtual batch, the same on every member, which takes its own
    row where they meet `x` (`_expand`). The statistics stay tables until then, so
    that under `vmap` they are computed once, not once per example.

    Over `jax.vmap` axes alone, the members' values are gathered (under `vmap`,
    that is the batched array itself: no copy) and the rows of each virtual batch
    summed, as cheap as a `psum`. Over device axes (pmap, shard_map), each member
    puts its values into its virtual batch's row of a table of zeros and one
    `psum` adds the tables up: one all-reduce of `virtual.count` times the size.
    The same sums where a vmap axis has no known size (`unbound_axes`): correct, but
    under `vmap` a table per example is summed, much slower than the gather.
    """
    manual = jax.sharding.get_abstract_mesh().manual_axes
    names = axis_names(axis_name)
    if not any(name in manual for name in names) and not unbound_axes(names):

        def table(v: Array) -> Array:
            every = v
            for name in reversed(names):  # row-major, as axis_index numbers them
                every = lax.all_gather(every, name)
            every = jnp.reshape(every, (-1, virtual.count) + v.shape)
            return jnp.sum(every, axis=0)

        return jax.tree.map(table, values)
    rows = jnp.arange(virtual.count, dtype=virtual.row.dtype) == virtual.row

    def spread(v: Array) -> Array:
        hot = jnp.reshape(rows, rows.shape + (1,) * v.ndim)
        return jnp.where(hot, v[None], jnp.zeros_like(v)[None])

    return lax.psum(jax.tree.map(spread, values), axis_name, axis_index_groups=groups)


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
    return jnp.sum(lax.select(keep, partial, jnp.zeros_like(partial)), axis=axes)


def _sums(
    values: tuple[Array, ...],
    mask: Array | None,
    axes: tuple[int, ...],
    axis_name: AxisName | None,
    groups: Groups,
    isolate: bool,
    virtual: Virtual | None = None,
) -> tuple[Array, ...]:
    """Sums each of `values` over the local `axes`, then all of them over the named
    axes (per virtual batch with `virtual`).

    `mask` (broadcastable to the values) selects the elements that count. The
    partial sums go to one `psum` as a tuple: across devices that is one
    all-reduce, and under `vmap` each becomes its own reduction over the batch,
    which XLA merges with the local one. (Stacking them into one array instead
    kept XLA from merging: a channels-last layer under `vmap` wrote per-example
    partial sums out and ran 35% slower.)
    """
    masks = (
        (None,) * len(values) if mask is None else _copies(mask, len(values), isolate)
    )
    local = tuple(_masked_sum(v, m, axes) for v, m in zip(values, masks))
    return tuple(_psum(local, axis_name, groups, virtual))


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


def _shift(
    x: Array,
    mask: Array | None,
    axes: tuple[int, ...],
    axis_name: AxisName | None,
    groups: Groups,
    replicas: int,
    dtype: np.dtype,
    virtual: Virtual | None = None,
) -> Array:
    """A per-channel value inside the data, the same on every member of the reduction.

    Subtracting it before the one-pass sums keeps `E[x^2] - E[x]^2` accurate when
    |mean| >> std: it is the (masked) average of each member's first element, in
    `dtype`. Only the first elements are converted, so that the conversion of `x`
    itself stays fused into the reduction that reads it. Without a mask every
    member contributes one element: the average divides by `replicas` (the
    members of one virtual batch, with `virtual`).
    """
    first = _first_position(x, axes).astype(dtype)
    if mask is None:
        if axis_name is not None:
            first = _psum(first, axis_name, groups, virtual) / replicas
        return lax.stop_gradient(first)
    weight = _first_position(jnp.broadcast_to(mask, x.shape), axes).astype(dtype)
    first = lax.select(weight > 0, first, jnp.zeros_like(first))
    first, weight = _psum((first, weight), axis_name, groups, virtual)
    return lax.stop_gradient(first / jnp.maximum(weight, 1.0))


def _masked_count(
    x: Array,
    mask: Array,
    axes: tuple[int, ...],
    axis_name: AxisName | None,
    groups: Groups,
    virtual: Virtual | None = None,
) -> Array:
    """Number of elements per channel that `mask` keeps, in `x`'s dtype: shaped as
    the axes not in `axes` (the channels; under virtual batches of a whole batch,
    the virtual batches and the channels).

    Along the axes where the mask does not vary, the count is a product of sizes
    rather than a sum over the broadcast mask, which would cost a pass over `x`.
    """
    m = align_mask(mask, x.ndim)
    varying = tuple(a for a in axes if m.shape[a] != 1)
    repeats = float(np.prod([x.shape[a] for a in axes if m.shape[a] == 1]))
    count = jnp.sum(m.astype(x.dtype), axis=varying, keepdims=True)
    if repeats != 1:
        count = count * repeats
    kept = tuple(x.shape[i] for i in range(x.ndim) if i not in axes)
    count = jnp.broadcast_to(jnp.squeeze(count, axes), kept)
    return _psum(count, axis_name, groups, virtual)


def _moments(
    x_a: Array,
    x_b: Array,
    mask: Array | None,
    *,
    axes: tuple[int, ...],
    axis_name: AxisName | None,
    groups: Groups,
    replicas: int,
    fast_variance: bool,
    dtype: np.dtype,
    isolate: bool,
    virtual: Virtual | None = None,
) -> Moments:
    """Mean and biased variance per channel of `x`, reduced in `dtype` (tables of
    them over `virtual` strided virtual batches).

    `x_a` and `x_b` are `x` twice, as `_copies` gives it: each of the two
    reductions converts its own copy to `dtype`, so that a half-precision `x` is
    read as such rather than written out in float32 first.

    With `fast_variance`, the shifted first and second sums are two independent
    reductions of `x` that XLA runs without writing anything full-size; otherwise
    the variance is a second pass over `x - mean`, as Flax's two-pass mode. The
    variance is clipped at zero. Channels with no element (everything masked) get
    mean 0 and variance 0 instead of Flax's NaN; the caller sees `count == 0`.
    """
    raw, shared = x_a, x_b is x_a
    row = None if virtual is None else virtual.row
    x_a = x_a.astype(dtype)
    x_b = x_a if shared else x_b.astype(dtype)
    if mask is None:
        count = float(replicas * np.prod([x_a.shape[a] for a in axes]))
        denom = count
    else:
        count = _masked_count(x_a, mask, axes, axis_name, groups, virtual)
        denom = jnp.maximum(count, 1.0)
    if fast_variance:
        shift = _shift(raw, mask, axes, axis_name, groups, replicas, dtype, virtual)
        shift_a, shift_b = _copies(shift, 2, isolate)
        centred_a = x_a - _expand(shift_a, axes, row)
        centred_b = centred_a if shared else x_b - _expand(shift_b, axes, row)
        first, second = _sums(
            (centred_a, centred_b * centred_b),
            mask,
            axes,
            axis_name,
            groups,
            isolate,
            virtual,
        )
        delta = first / denom
        mean = shift + delta
        var = jnp.maximum(0.0, second / denom - delta * delta)
    else:
        (total,) = _sums((x_a,), mask, axes, axis_name, groups, isolate, virtual)
        mean = total / denom
        centred = x_b - _expand(mean, axes, row)
        (squares,) = _sums(
            (centred * centred,), mask, axes, axis_name, groups, isolate, virtual
        )
        var = squares / denom
    return Moments(mean, var, count)


# ---------------------------------------------------------------- normalisation


def _multiplier(var: Array, scale: Array | None, eps: float) -> Array:
    """`rsqrt(var + eps) * scale`, in Flax's dtypes."""
    mul = lax.rsqrt(var + eps)
    if scale is None:
        return mul
    mul, s = _promoted(mul, scale)
    return mul * s


def _apply(
    x: Array,
    mean: Array,
    mul: Array,
    bias: Array | None,
    axes: tuple[int, ...],
    out_dtype: np.dtype,
    row: Array | None = None,
) -> Array:
    """`(x - mean) * mul + bias`, in Flax's order and dtypes."""
    y, m = _promoted(x, _expand(mean, axes, row))
    return _scale_shift(y - m, _expand(mul, axes, row), bias, axes, out_dtype, row)


def _scale_shift(
    centred: Array,
    mul: Array,
    bias: Array | None,
    axes: tuple[int, ...],
    out_dtype: np.dtype,
    row: Array | None = None,
) -> Array:
    """`centred * mul + bias`, `mul` expanded against `centred` already."""
    y, mul = _promoted(centred, mul)
    y = y * mul
    if bias is not None:
        y, b = _promoted(y, _expand(bias, axes, row))
        y = y + b
    return y.astype(out_dtype)


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
    """`(x - mean) * (rsqrt(var + eps) * scale) + bias`, in Flax's order and dtypes:
    the inference path, with the running averages.

    **Arguments:**

    - `x`: the input; its channel axis is the one not in `axes`.
    - `mean`, `var`: per-channel statistics.
    - `scale`, `bias`: per-channel parameters, or None.
    - `eps`: added to `var`.
    - `out_dtype`: the dtype of the result.
    - `axes`: every axis of `x` but the channel axis.
    """
    return _apply(x, mean, _multiplier(var, scale, eps), bias, axes, out_dtype)


class Config(NamedTuple):
    """The static settings of a training call, hashable (a `jax.jit` static
    argument): see `train` for each."""

    axes: tuple[int, ...]
    axis_name: AxisName | None
    axis_index_groups: Groups
    replicas: int
    eps: float
    fast_variance: bool
    stat_dtype: np.dtype
    out_dtype: np.dtype
    isolate: bool
    virtual_batches: int | None


def _moments_of(
    x_a: Array, x_b: Array, mask: Array | None, row: Array | None, config: Config
) -> Moments:
    """`_moments` with `config`'s settings; `row`: this member's virtual batch."""
    virtual = None if row is None else Virtual(config.virtual_batches, row)
    return _moments(
        x_a,
        x_b,
        mask,
        axes=config.axes,
        axis_name=config.axis_name,
        groups=config.axis_index_groups,
        replicas=config.replicas,
        fast_variance=config.fast_variance,
        dtype=config.stat_dtype,
        isolate=config.isolate,
        virtual=virtual,
    )


def _counted(stats: Moments, mask: Array | None) -> Array | None:
    """The count as an output of the custom JVP: an array with a mask; None
    without, where it is a Python number."""
    return stats.count if mask is not None else None


@functools.partial(jax.jit, static_argnames="config")
def _fused_primal(
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    renorm: Renorm | None,
    row: Array | None,
    *,
    config: Config,
) -> tuple[Array, Array, Array, Array | None]:
    """`_fused` itself: the output, the statistics and the count."""
    eps = config.eps
    stats = _moments_of(*_copies(x, 2, config.isolate), mask, row, config)
    if renorm is not None:
        scale, bias = _renormalised(
            stats, renorm, eps, config.virtual_batches, scale, bias
        )
    mul = _multiplier(stats.var, scale, eps)
    y = _apply(x, stats.mean, mul, bias, config.axes, config.out_dtype, row)
    return y, stats.mean, stats.var, _counted(stats, mask)


def _closed_form(
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    renorm: Renorm | None,
    row: Array | None,
    dx: Array,
    dscale: Array | None,
    dbias: Array | None,
    *,
    config: Config,
) -> tuple[tuple, tuple]:
    """`_fused`'s primal outputs and their closed-form tangent, shaped so that its
    transpose is three fused passes.

    With `c = x - mean`, `mul = rsqrt(var + eps) * scale` and the masked sums
    `S1 = sum(dx)`, `S2 = sum(c * dx)`:

        dy = dx * mul + (dbias - dmean * mul) + c * dmul
        dmean = S1 / n,  dvar = 2 S2 / n,  dmul = d(rsqrt(var + eps)) * scale + ...

    Reverse mode transposes this into `sum(g)`, `sum(g * c)` and one elementwise
    pass for the input gradient. The per-channel broadcast term carries
    `dbias - dmean * mul` together, so its transpose is a reduction of `g` alone,
    and each use of `x` and `mean` has its own copy (`_copies`), so no
    full-size intermediate is written between the passes.
    """
    axes, eps, isolate = config.axes, config.eps, config.isolate
    stat_dtype = config.stat_dtype
    x_a, x_b, x_sums, x_out = _copies(x, 4, isolate)
    stats = _moments_of(x_a, x_b, mask, row, config)
    if renorm is not None:
        # r and d are constants: scale' = r scale and bias' = d scale + bias
        # have the tangents r dscale and d dscale + dbias.
        scale, bias, dscale, dbias = _renormalised(
            stats, renorm, eps, config.virtual_batches, scale, bias, (dscale, dbias)
        )
    inv = lax.rsqrt(stats.var + eps)
    mul = inv
    if scale is not None:
        inv_s, s = _promoted(inv, scale)
        mul = inv_s * s
    # The output and the tangent share what XLA would merge anyway: the
    # broadcast multiplier, and without isolation `x - mean` where it is
    # computed in the same dtype.
    mul_b = _expand(mul, axes, row)
    mean_sums, mean_out = _copies(stats.mean, 2, isolate)
    centred = x_sums.astype(stat_dtype) - _expand(mean_sums, axes, row)
    if not isolate and promote(x.dtype, stat_dtype) == stat_dtype:
        centred_y = centred
    else:
        centred_y, mean_y = _promoted(x, _expand(stats.mean, axes, row))
        centred_y = centred_y - mean_y
    y = _scale_shift(centred_y, mul_b, bias, axes, config.out_dtype, row)

    dxs = dx.astype(stat_dtype)
    denom = stats.count if mask is None else jnp.maximum(stats.count, 1.0)
    virtual = None if row is None else Virtual(config.virtual_batches, row)
    sum_dx, sum_centred_dx = _sums(
        (dxs, centred * dxs),
        mask,
        axes,
        config.axis_name,
        config.axis_index_groups,
        isolate,
        virtual,
    )
    dmean = sum_dx / denom
    dvar = 2 * sum_centred_dx / denom

    dinv = -0.5 * inv * inv * inv * dvar
    if scale is None:
        dmul = dinv
    else:
        dinv_s, ds = _promoted(dinv, dscale)
        dmul = dinv_s * s + inv_s * ds
    # `mul` is at least as wide as the statistics: neither is promoted.
    offset = -dmean.astype(mul.dtype) * mul
    if bias is not None:
        offset, db = _promoted(offset, dbias)
        offset = offset + db
    dy, mul_b = _promoted(dxs, mul_b)
    dy = dy * mul_b
    dy, offset_b = _promoted(dy, _expand(offset, axes, row))
    dy = dy + offset_b
    dy, dmul_b = _promoted(dy, _expand(dmul, axes, row))
    if isolate:
        centred = x_out.astype(stat_dtype) - _expand(mean_out, axes, row)
    dy = dy + centred.astype(dy.dtype) * dmul_b
    count = _counted(stats, mask)
    dcount = None if count is None else jnp.zeros_like(count)
    return (y, stats.mean, stats.var, count), (
        dy.astype(y.dtype),
        dmean,
        dvar,
        dcount,
    )


_closed_form_jit = jax.jit(_closed_form, static_argnames="config")


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fused(
    config: Config,
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    renorm: Renorm | None,
    row: Array | None,
) -> tuple[Array, Array, Array, Array | None]:
    """The training path of one call: `(y, mean, var, count)`, `count` an array
    with a mask and None without (see `_train_normalize`); its tangent is
    `_closed_form`'s.

    The custom JVP is called where the layer is, under the caller's `vmap`s;
    what it runs, the primal and the rule, are jitted functions of the arrays
    (`config` static), so that a network's BatchNorms of one kind trace,
    batch, differentiate and lower them once. (A custom JVP *inside* a jitted
    function would be traced unbatched there, and its rule later, where a
    `jax.grad` of a jitted function differentiates: without the vmap axes that
    its collectives need. Called here, the rule is batched as the caller's
    `vmap`s batch it; see `_fused_jvp`.)
    """
    return _fused_primal(x, mask, scale, bias, renorm, row, config=config)


@_fused.defjvp
def _fused_jvp(config: Config, primals: tuple, tangents: tuple) -> tuple:
    """`_closed_form`, jitted where the named axes are bound. Differentiating a
    jitted function from outside (`jax.grad(jax.jit(f))`, `f` vmapping a layer),
    JAX traces this rule under the layer's `vmap` without its axis in the axis
    environment (`unbound_axes`): a jitted function, traced unbatched, could not
    hold the collectives then, so the rule is traced as it is, its collectives
    batched by that `vmap`."""
    x, mask, scale, bias, renorm, row = primals
    dx, _, dscale, dbias, _, _ = tangents
    unbound = config.axis_name is not None and unbound_axes(config.axis_name)
    rule = _closed_form if unbound else _closed_form_jit
    return rule(x, mask, scale, bias, renorm, row, dx, dscale, dbias, config=config)


def _train_normalize(
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    renorm: Renorm | None,
    config: Config,
) -> tuple[Array, Moments]:
    """Normalises `x` with its own batch statistics; returns the output and the
    statistics, with exact tangents for both (a loss that reads the updated running
    averages is differentiated correctly). Arguments as `train`'s; the statistics
    are tables, one row per virtual batch, with virtual batches.
    """
    row = None
    if config.axis_name is not None and config.virtual_batches is not None:
        # An argument of the custom JVP, not a value it closes over: its rule may
        # be traced where the vmap of this call has gone (see `unbound_axes`).
        row = virtual_batch_row(
            config.axis_name, config.axis_index_groups, config.virtual_batches
        )
    y, mean, var, count = _fused(config, x, mask, scale, bias, renorm, row)
    if count is None:
        local = np.prod([x.shape[a] for a in config.axes])
        count = float(config.replicas * local)
    return y, Moments(mean, var, count)


def _batch_values(stats: Moments, unbiased: bool) -> tuple[Array, Array, Array, Array]:
    """The batch's mean and variance to average in, and where each is defined.

    A channel without valid statistics (every element masked out, or a NaN/Inf in
    the batch) has none. With `unbiased`, the variance is PyTorch's: `n / (n - 1)`
    times the biased one, undefined for one element. A Python count is known to be
    more than one (the layer refuses one element without a mask).
    """
    ok = jnp.isfinite(stats.mean) & jnp.isfinite(stats.var)
    masked = not isinstance(stats.count, float)
    if masked:
        ok = ok & (stats.count > 0)
    batch_var, var_ok = stats.var, ok
    if unbiased:
        n = stats.count
        if masked:
            batch_var = stats.var * (n / jnp.maximum(n - 1, 1.0))
            var_ok = ok & (n > 1)
        else:
            n = np.asarray(n, stats.var.dtype)  # rounded as an array count would be
            batch_var = stats.var * (n / (n - 1))
    return stats.mean, ok, batch_var, var_ok


def _moving(previous: Array, batch: Array, keep: Array, momentum: float) -> Array:
    """`momentum * previous + (1 - momentum) * batch` where `keep`, else `previous`."""
    decayed = momentum * previous
    # Standard promotion happens at the sum, as in Flax's expression.
    avg = decayed + ((1 - momentum) * batch).astype(decayed.dtype)
    return lax.select(keep, avg, previous).astype(previous.dtype)


def _running_average(
    old: tuple[Array, Array], stats: Moments, momentum: float, unbiased: bool
) -> tuple[Array, Array]:
    """Flax's exponential moving average of `old = (mean, var)` towards `stats`,
    except where the batch has no valid statistics.

    Flax turns the running averages into NaN, for good, when the mask excludes
    every element of a channel or the batch holds a NaN/Inf. Here those channels
    keep their previous running averages; the NaN still shows in this step's
    output (and so in the loss), so the bad batch does not go unnoticed. With
    `unbiased`, the variance averaged in is PyTorch's (see `_batch_values`).
    """
    mean, ok, var, var_ok = _batch_values(stats, unbiased)
    return _moving(old[0], mean, ok, momentum), _moving(old[1], var, var_ok, momentum)


def cumulative_average(
    old: tuple[Array, Array, Array], stats: Moments, unbiased: bool
) -> tuple[Array, Array, Array]:
    """PyTorch's cumulative moving average (`momentum=None`) of `old = (mean, var,
    num_batches)` towards `stats`: the batch is counted first, then each average
    moves by `1 / num_batches` of the way, `(1 - f) * old + f * batch` as PyTorch
    writes it (so the first batch, `f = 1`, replaces the initial values). Channels
    without valid statistics keep theirs, as in `_running_average`; the batch is
    counted anyway, as PyTorch counts every training call.
    """
    mean, ok, var, var_ok = _batch_values(stats, unbiased)
    num_batches = old[2] + 1
    new = []
    for previous, batch, keep in ((old[0], mean, ok), (old[1], var, var_ok)):
        take = jnp.ones((), previous.dtype) / num_batches.astype(previous.dtype)
        avg = (1 - take) * previous + (take.astype(batch.dtype) * batch).astype(
            previous.dtype
        )
        new.append(lax.select(keep, avg, previous))
    return new[0], new[1], num_batches


def merge_moments(
    pooled: tuple[Array, Array, Array], stats: Moments
) -> tuple[Array, Array, Array]:
    """Chan et al.'s merge of the statistics of two sets of elements, per channel:
    `pooled = (count, mean, m2)`, `m2` the sum of squared deviations from the
    mean, and this batch's `stats`. The result is that of all the elements
    together: the variance is `m2 / count` (`/ (count - 1)` unbiased). It never
    forms `E[x^2] - E[x]^2`, which cancels in float32 when |mean| >> std. A
    channel without valid statistics in the batch keeps `pooled`'s.
    """
    count_a, mean_a, m2_a = pooled
    dtype = mean_a.dtype
    count_b = jnp.broadcast_to(jnp.asarray(stats.count, dtype), mean_a.shape)
    mean_b = stats.mean.astype(dtype)
    m2_b = stats.var.astype(dtype) * count_b
    ok = (count_b > 0) & jnp.isfinite(mean_b) & jnp.isfinite(m2_b)
    count = count_a + count_b
    share = count_b / jnp.where(count > 0, count, 1)
    delta = mean_b - mean_a
    mean = mean_a + delta * share
    m2 = m2_a + m2_b + delta * delta * count_a * share
    return tuple(
        lax.select(ok, new, old)
        for new, old in ((count, count_a), (mean, mean_a), (m2, m2_a))
    )


# ------------------------------------------------------------ Ghost BatchNorm


def _pool_virtual_batches(stats: Moments) -> Moments:
    """The batch's statistics from the tables of its virtual batches' (one row
    each), as tf_keras updates its moving statistics under `virtual_batch_size`.

    The mean of every valid element; the *within*-virtual-batch variance
    `sum_g n_g var_g / n` (the spread between the virtual batches is left out; with
    equal counts, tf_keras's mean of the virtual batches' variances); and as
    `count` the valid elements per virtual batch that holds any, `n / k`, so that
    the unbiased variance, `count / (count - 1)` times it, is the pooled
    `sum_g n_g var_g / (n - k)`: with equal counts, the mean of the virtual
    batches' unbiased variances.
    """
    if isinstance(stats.count, float):  # no mask: every virtual batch is as full
        return Moments(jnp.mean(stats.mean, 0), jnp.mean(stats.var, 0), stats.count)
    n = stats.count
    total, m2, count, holding = (
        jnp.sum(v, axis=0)
        for v in (n * stats.mean, n * stats.var, n, (n > 0).astype(n.dtype))
    )
    denom = jnp.maximum(count, 1.0)
    return Moments(total / denom, m2 / denom, count / jnp.maximum(holding, 1.0))


# ------------------------------------------------------ Batch Renormalization


def renorm_correction(
    mean: Array, var: Array, renorm: Renorm, eps: float
) -> tuple[Array, Array]:
    """Keras's `r` and `d` for a batch's `mean` and biased `var`, clipped, without
    gradient: `r = sqrt(var + eps) / s`, `d = (mean - renorm.mean) / s` with
    `s = max(renorm.stddev, sqrt(eps))`; then `r = min(max(r, rmin), rmax)` and
    `d = clip(d, -dmax, dmax)`, in Keras's order."""
    dtype = mean.dtype
    eps = jnp.asarray(eps, dtype)
    s = jnp.maximum(renorm.stddev.astype(dtype), jnp.sqrt(eps))
    r = jnp.sqrt(var + eps) / s
    d = (mean - renorm.mean.astype(dtype)) / s
    r = jnp.minimum(
        jnp.maximum(r, renorm.rmin.astype(dtype)), renorm.rmax.astype(dtype)
    )
    dmax = renorm.dmax.astype(dtype)
    return lax.stop_gradient(r), lax.stop_gradient(jnp.clip(d, -dmax, dmax))


def _renormalised(
    stats: Moments,
    renorm: Renorm,
    eps: float,
    virtual_batches: int | None,
    scale: Array | None,
    bias: Array | None,
    tangents: tuple[Array | None, Array | None] | None = None,
) -> tuple[Array, ...]:
    """`(x_hat * r + d) * scale + bias` as one affine map of `x_hat`: Keras's
    `scale' = r scale` and `bias' = d scale + bias` (`r` and `d + bias` without a
    scale). Under virtual batches `r` and `d` come from the pooled statistics, as
    tf_keras's, one per channel for every virtual batch.

    Returns `(scale', bias')`; given `tangents = (dscale, dbias)` of `scale` and
    `bias`, also theirs: `r` and `d` have none, so `(r dscale, d dscale + dbias)`.
    """
    if virtual_batches is not None:
        stats = _pool_virtual_batches(stats)
    r, d = renorm_correction(stats.mean, stats.var, renorm, eps)
    if virtual_batches is not None:  # one row, as the parameters are given then
        r, d = r[None], d[None]

    def corrected(s: Array, b: Array | None) -> tuple[Array, Array]:
        """`(r s, d s + b)`: linear in `(s, b)`, so it maps tangents too."""
        r_s, s = _promoted(r, s)
        new_s, new_b = r_s * s, d.astype(r_s.dtype) * s
        if b is not None:
            new_b, b = _promoted(new_b, b)
            new_b = new_b + b
        return new_s, new_b

    def shifted(b: Array | None, base: Array) -> Array:
        if b is None:
            return base
        base, b = _promoted(base, b)
        return base + b

    if scale is None:
        out = (r, shifted(bias, d))
    else:
        out = corrected(scale, bias)
    if tangents is None:
        return out
    dscale, dbias = tangents
    if scale is None:
        return out + (jnp.zeros_like(r), shifted(dbias, jnp.zeros_like(d)))
    return out + corrected(dscale, dbias)


def _renorm_running_average(
    old: tuple[Array, Array, Array, Array, Array],
    stats: Moments,
    momentum: float,
    renorm_momentum: float,
    eps: float,
    unbiased: bool,
) -> tuple[Array, Array, Array, Array, Array]:
    """Keras's update of Batch Renormalization's statistics `old = (mean, var,
    stddev, renorm_mean, renorm_stddev)` from a batch's (`KBN.py:549-586`): the
    renorm ones follow `renorm_momentum`, the inference ones `momentum`, with
    `stddev = sqrt(var + eps)` averaged and `var = max(stddev^2 - eps, 0)`
    derived from it. Channels without valid statistics keep theirs, as in
    `_running_average`; with `unbiased` the inference statistics follow the unbiased
    variance (the renorm ones stay with the biased variance that normalises the
    batch).
    """
    mean, ok, var, var_ok = _batch_values(stats, unbiased)
    stddev = _moving(old[2], jnp.sqrt(var + eps), var_ok, momentum)
    derived = jnp.maximum(stddev * stddev - eps, 0.0)
    return (
        _moving(old[0], mean, ok, momentum),
        lax.select(var_ok, derived, old[1]).astype(old[1].dtype),
        stddev,
        _moving(old[3], mean, ok, renorm_momentum),
        _moving(old[4], jnp.sqrt(stats.var + eps), ok, renorm_momentum),
    )


# ------------------------------------------------------------- a training call


def train_statistics(
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    renorm: Renorm | None,
    normalize_with: tuple[Array, Array] | None,
    config: Config,
) -> tuple[Array, Moments]:
    """The output of a training call and the batch's statistics (pooled over the
    virtual batches, under Ghost BatchNorm), as `train` computes them, without the
    State entry's update: the count stays a Python number where it is one
    (`eqx_bn.recalibrate` accumulates them). Arguments as `train`'s."""
    if normalize_with is None:
        y, stats = _train_normalize(x, mask, scale, bias, renorm, config)
        if config.virtual_batches is not None:
            stats = _pool_virtual_batches(stats)
        return y, stats
    # The whole batch's statistics, given: this batch's are only pooled (no
    # virtual batches or renorm: accumulation refuses those layers), and JAX's own
    # rules differentiate them (the output does not read them).
    stats = _moments_of(*_copies(x, 2, config.isolate), mask, None, config)
    y = normalize(
        x, *normalize_with, scale, bias, config.eps, config.out_dtype, config.axes
    )
    return y, stats


class Update(NamedTuple):
    """How a training call moves the layer's State entry, hashable (a `jax.jit`
    static argument): `momentum`, `renorm_momentum` (None but for Batch
    Renormalization) and `unbiased` as the entry's kind takes them (see
    `update_entry`); `pool`: the entry is the `(count, mean, m2)` that a step
    accumulating micro-batches has pooled so far, merged with the batch's
    (`merge_moments`)."""

    momentum: float | None
    renorm_momentum: float | None
    unbiased: bool
    pool: bool


def update_entry(
    entry: tuple[Array, ...], stats: Moments, update: Update, eps: float
) -> tuple[Array, ...]:
    """The arrays of a State entry after a batch with `stats`, by the entry's kind:
    the pooled moments (`merge_moments`) with `update.pool`, else Batch
    Renormalization's five (`_renorm_running_average`) with a `renorm_momentum`,
    else the cumulative average's three (`cumulative_average`) with
    `momentum=None`, else the exponential moving average's two
    (`_running_average`)."""
    if update.pool:
        return merge_moments(entry, stats)
    momentum, unbiased = update.momentum, update.unbiased
    if update.renorm_momentum is not None:
        return _renorm_running_average(
            entry, stats, momentum, update.renorm_momentum, eps, unbiased
        )
    if momentum is None:
        return cumulative_average(entry, stats, unbiased)
    return _running_average(entry, stats, momentum, unbiased)


@functools.partial(jax.jit, static_argnames=("number", "config", "update"))
def _entry_after(
    entry: tuple[Array, ...],
    mean: Array,
    var: Array,
    count: Array | None,
    *,
    number: float | None,
    config: Config,
    update: Update,
) -> tuple[Array, ...]:
    """The State entry after a batch with these statistics (tables over virtual
    batches, pooled here): `count` an array, or None and `number` the count."""
    stats = Moments(mean, var, number if count is None else count)
    if config.virtual_batches is not None:
        stats = _pool_virtual_batches(stats)
    return update_entry(entry, stats, update, config.eps)


@functools.partial(jax.jit, static_argnames=("config", "update"))
def _train_given(
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    entry: tuple[Array, ...],
    normalize_with: tuple[Array, Array],
    *,
    config: Config,
    update: Update,
) -> tuple[Array, tuple[Array, ...]]:
    """`train` with `normalize_with`: no custom JVP, one jitted call."""
    y, stats = train_statistics(x, mask, scale, bias, None, normalize_with, config)
    return y, update_entry(entry, stats, update, config.eps)


def train(
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    entry: tuple[Array, ...],
    renorm: Renorm | None,
    normalize_with: tuple[Array, Array] | None,
    *,
    config: Config,
    update: Update,
) -> tuple[Array, tuple[Array, ...]]:
    """One training call: `x` normalised with its own batch statistics, and the
    layer's State entry moved towards them.

    Its work is done by jitted functions of the arrays, everything else static
    (`config`, `update`), for the time it takes to trace and compile a network:
    its BatchNorms of equal shapes and settings are then traced, batched,
    differentiated and lowered once instead of once each (a ResNet-18 has 20
    BatchNorms of 5 kinds). XLA inlines the calls, so the compiled program is
    the same. They are the custom JVP's primal and rule (`_fused`), and the
    entry's update (`_entry_after`); with `normalize_with`, one (`_train_given`).

    **Arguments:**

    - `x`: the input; its channel axis is the one not in `config.axes`.
    - `mask`: boolean, broadcastable to `x`: the elements that count; or None.
    - `scale`, `bias`: per-channel parameters, or None; one row, `(1, channels)`,
        with virtual batches.
    - `entry`: the arrays of the layer's State entry (`update_entry`), or with
        `update.pool`, the `(count, mean, m2)` pooled so far (`merge_moments`).
    - `renorm`: Batch Renormalization's correction (`_renormalised`), or None.
    - `normalize_with`: the `(mean, var)` to normalise with instead of the
        batch's own (which are still what the entry takes in), or None.
    - `config`: the reduction and normalisation (a `Config`):
        - `axes`: every axis of `x` but the channel axis, reduced locally.
        - `axis_name`, `axis_index_groups`: the named axes (and groups along
            them) reduced afterwards, as `jax.lax.psum` takes them;
            `axis_name=None` for none.
        - `replicas`: how many members the named axes reduce together into one
            statistic (1 with none; the members of one virtual batch with
            virtual batches over named axes): `x.size / channels * replicas`
            elements per channel without a mask.
        - `eps`: added to the variance.
        - `fast_variance`: one shifted pass (see `_moments`) instead of two.
        - `stat_dtype`: the dtype in which the statistics are reduced.
        - `out_dtype`: the dtype of the output.
        - `isolate`: give each full-size pass its own copy of its inputs
            (`isolates_passes`).
        - `virtual_batches`: Ghost BatchNorm's virtual batches, or None. With
            `axis_name`, the members of the named axes are split in that many
            strided virtual batches (`virtual_batch_row`); without, `x` holds
            them along the axis before the channels (the layer reshapes a whole
            batch to `(size, virtual_batches, ...)`, as tf_keras). The entry
            follows the statistics pooled over them (`_pool_virtual_batches`).
    - `update`: how the entry moves (an `Update`).

    **Returns:**

    `(y, entry)`: the output and the entry's new arrays.
    """
    if normalize_with is not None:
        return _train_given(
            x, mask, scale, bias, entry, normalize_with, config=config, update=update
        )
    y, stats = _train_normalize(x, mask, scale, bias, renorm, config)
    number = stats.count if isinstance(stats.count, float) else None
    count = None if number is not None else stats.count
    new = _entry_after(
        entry, stats.mean, stats.var, count, number=number, config=config, update=update
    )
    return y, new

"""Gradient accumulation with BatchNorm: a batch split into micro-batches, one
gradient, each BatchNorm's running statistics updated once from what it pooled.

How the layers take part: for the length of an accumulated step, each BatchNorm's
State entry is a [`Pooling`][eqx_bn._batch_norm.Pooling] instead of its running
statistics. A layer that finds one normalises as usual (with the micro-batch's
statistics, or with the `normalize_with` statistics given), merges the moments of
its input into the entry (counts, means and squared deviations, as Chan et al.)
and leaves the running statistics alone; at the end of the step each layer updates
them once, from the pooled moments (`BatchNorm._finish_pooling`). The entry's type
is known when the step is traced, so a plain call pays nothing for this.

`full_batch_statistics=True` normalises every micro-batch with the statistics of
the whole batch. Those of a BatchNorm depend on the earlier BatchNorms' (its input
is normalised by them), so they are the fixed point of one pass over the
micro-batches, `s = F(params, s)`: each pass makes one more level of BatchNorm
depth exact, and a pass that changes nothing ends the search. The gradient goes
through them by the adjoint method: with `L(params, s)` the mean loss,
`l = dL/ds + (dF/ds)^T l` (again exact after one step per level of depth), then
`dL/dparams + (dF/dparams)^T l`. Every pass runs the micro-batches one after the
other under `jax.checkpoint`, so memory stays that of one micro-batch.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from ._batch_norm import BatchNorm, Pooling
from ._describe import describe
from ._numerics import promote
from ._recalibrate import _entries, _with_entries

LossFn = Callable[[PyTree, eqx.nn.State, Any], tuple[Array, tuple[eqx.nn.State, Any]]]
ValueAndGrad = Callable[
    [PyTree, eqx.nn.State, Any],
    tuple[tuple[Array, tuple[eqx.nn.State, Any]], PyTree],
]


# ------------------------------------------------------------- State entries


def _pooling_refusal(where: str, bn: BatchNorm) -> ValueError | None:
    """Why a training BatchNorm cannot pool micro-batches, or None: Batch
    Renormalization and Ghost BatchNorm normalise per batch in ways that pooled
    statistics cannot reproduce, so a step of them is refused rather than given
    other numbers than one step on the whole batch."""
    if bn.renorm:
        return ValueError(
            f"accumulate=k: BatchNorm {where} has renorm=True, which accumulated "
            "steps do not support: Batch Renormalization corrects each batch with "
            "r and d measured against its renorm statistics and updates those once "
            "per batch (Keras), and neither the per-micro-batch correction nor one "
            "update from pooled moments is that. Train it without accumulate= "
            "(a batch that fits at once), or freeze the layer "
            "(eqx_bn.freeze_batch_norms) for the accumulated steps."
        )
    if bn.virtual_batch_size is not None:
        return ValueError(
            f"accumulate=k: BatchNorm {where} has virtual_batch_size="
            f"{bn.virtual_batch_size}, which accumulated steps do not support: Ghost "
            "BatchNorm's running statistics follow each virtual batch's own "
            "variance (tf_keras), and moments pooled over micro-batches mix the "
            "virtual batches' spread in. Train it without accumulate= (a batch "
            "that fits at once), or without virtual_batch_size (accumulate=k alone "
            "normalises each micro-batch with its own statistics, as ghost batches "
            "of the micro-batch's size)."
        )
    return None


def _batch_norms(model: PyTree) -> dict[Any, BatchNorm]:
    """The model's BatchNorms that train (not frozen), by their State key; a
    ValueError for one that cannot pool (`_pooling_refusal`)."""
    is_bn = lambda v: isinstance(v, BatchNorm)  # noqa: E731
    found = {}
    for path, v in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_bn)[0]:
        if is_bn(v) and v.frozen is None:
            refusal = _pooling_refusal("model" + jax.tree_util.keystr(path), v)
            if refusal is not None:
                raise refusal
            found[v.state_index.marker] = v
    return found


def start_pooling(
    model: PyTree, state: eqx.nn.State, normalize_with: tuple | None = None
) -> eqx.nn.State:
    """A new State whose BatchNorm entries are `Pooling`s that have seen nothing,
    holding the running statistics; `normalize_with`: one `(mean, var)` per
    BatchNorm, in State order, for every micro-batch to be normalised with, or
    None for each micro-batch's own. `state` itself stays valid."""
    entries, norms = {}, _batch_norms(model)
    given = iter(normalize_with or ())
    for key, value in _entries(state).items():
        if key in norms:
            zero = jnp.zeros_like(value.mean)
            with_ = None if normalize_with is None else next(given)
            entries[key] = Pooling(value, (zero, zero, zero), with_)
    return _with_entries(state, entries)


def pooled_statistics(state: eqx.nn.State) -> tuple:
    """The `(mean, biased variance)` each BatchNorm pooled so far, in State order."""
    out = []
    for value in _entries(state).values():
        if isinstance(value, Pooling):
            count, mean, m2 = value.pooled
            out.append((mean, m2 / jnp.maximum(count, 1.0)))
    return tuple(out)


def finish_pooling(model: PyTree, state: eqx.nn.State) -> eqx.nn.State:
    """The State after the step: each BatchNorm's running statistics updated once,
    from the moments it pooled."""
    norms = _batch_norms(model)
    return _with_entries(
        state,
        {
            key: norms[key]._finish_pooling(value)
            for key, value in _entries(state).items()
            if isinstance(value, Pooling)
        },
    )


# --------------------------------------------------------------- the batch


def micro_batches(batch: Any, k: int) -> Any:
    """Every leaf of `batch` split along its first axis into `k` equal parts,
    stacked: `(n, ...)` becomes `(k, n // k, ...)`, micro-batch `i` holding the
    examples `i, i + k, i + 2k, ...`. Interleaved, not in blocks: a batch sharded
    over devices along its first axis then gives micro-batches sharded the same
    way, each device holding its part of every one (blocks would put a whole
    micro-batch on a few devices)."""

    def split(path: tuple, leaf: Any) -> Array:
        shape = jnp.shape(leaf)
        where = f"batch{jax.tree_util.keystr(path)}"
        if not shape:
            raise ValueError(
                f"accumulate={k}: {where} ({describe(leaf)}) has no leading axis to "
                f"split into {k} micro-batches. Every leaf of the batch is split "
                "along its first axis: give one value per example (e.g. one dropout "
                "key per example, `jax.random.split(key, n)`)."
            )
        if shape[0] % k:
            raise ValueError(
                f"accumulate={k}: {where} of shape {shape} does not split into {k} "
                f"micro-batches of equal size: its first axis ({shape[0]}) is not a "
                f"multiple of {k}. Pass batches of a multiple of {k} examples."
            )
        return jnp.moveaxis(jnp.reshape(leaf, (shape[0] // k, k) + shape[1:]), 1, 0)

    return jax.tree_util.tree_map_with_path(split, batch)


def check_accumulation(accumulate: Any, full_batch_statistics: bool, where: str) -> int:
    """`accumulate` as an int, or the error for a count that is not one."""
    if isinstance(accumulate, bool) or not isinstance(accumulate, (int, np.integer)):
        raise TypeError(
            f"{where}: accumulate must be an int, the number of micro-batches per "
            f"step, got {accumulate!r}."
        )
    if accumulate < 1:
        raise ValueError(
            f"{where}: accumulate must be a positive int, the number of "
            f"micro-batches per step (1 for none), got {accumulate}."
        )
    if full_batch_statistics and accumulate == 1:
        raise ValueError(
            f"{where}: full_batch_statistics=True is for accumulated steps: pass "
            "accumulate=k too (k micro-batches per step). Without accumulation "
            "every BatchNorm sees the whole batch already."
        )
    return int(accumulate)


# --------------------------------------------------------------- gradients


def _mean_update(acc: PyTree, grads: PyTree, i: Array) -> PyTree:
    """`optax.MultiSteps`'s running mean of the gradients, `acc + (g - acc) / (i +
    1)`, in its dtypes (a float32 accumulator, promoted with the gradient)."""

    def one(a: Array, g: Array) -> Array:
        dtype = promote(a.dtype, g.dtype)
        a, g = a.astype(dtype), g.astype(dtype)
        return a + (g - a) / (i + 1).astype(dtype)

    return jax.tree.map(one, acc, grads)


def _all_equal(a: PyTree, b: PyTree) -> Array:
    same = [jnp.all(x == y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return jnp.all(jnp.stack(same)) if same else jnp.array(True)


def pooled_value_and_grad(loss_fn: LossFn, k: int) -> ValueAndGrad:
    """Each micro-batch normalised with its own statistics (what the micro-batches
    of `optax.MultiSteps` see), the BatchNorm statistics pooled."""
    grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)

    def value_and_grad(model: PyTree, state: eqx.nn.State, batch: Any):
        trainable = eqx.filter(model, eqx.is_inexact_array)
        acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)

        def one(carry: tuple, part: Any) -> tuple:
            state, acc, i = carry
            (loss, (state, aux)), grads = grad_fn(model, state, part)
            acc = _mean_update(acc, eqx.filter(grads, eqx.is_inexact_array), i)
            return (state, acc, i + 1), (loss, aux)

        start = (start_pooling(model, state), acc, jnp.zeros((), jnp.int32))
        parts = micro_batches(batch, k)
        (state, acc, _), (losses, aux) = jax.lax.scan(one, start, parts)
        grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, trainable)
        return (jnp.mean(losses), (finish_pooling(model, state), aux)), grads

    return value_and_grad


def exact_value_and_grad(loss_fn: LossFn, k: int) -> ValueAndGrad:
    """Every micro-batch normalised with the whole batch's statistics, in every
    BatchNorm: the whole batch's loss, outputs, gradients and statistics."""

    def value_and_grad(model: PyTree, state: eqx.nn.State, batch: Any):
        parts = micro_batches(batch, k)
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def run(params: PyTree, given: tuple) -> tuple:
            # Every micro-batch normalised with `given`: the mean loss and what
            # each BatchNorm pooled; the State and the aux outputs beside.
            model = eqx.combine(params, static)

            def one(state: eqx.nn.State, part: Any) -> tuple:
                loss, (state, aux) = loss_fn(model, state, part)
                return state, (loss, aux)

            start = start_pooling(model, state, given)
            pooled, (losses, aux) = jax.lax.scan(jax.checkpoint(one), start, parts)
            return (jnp.mean(losses), pooled_statistics(pooled)), (pooled, aux)

        # At most one pass per BatchNorm (a chain of them), and one to see that
        # nothing changes.
        passes = len(_batch_norms(model)) + 1
        guess = jax.tree.map(
            jnp.zeros_like, pooled_statistics(start_pooling(model, state))
        )

        def search(c: tuple) -> tuple:
            new, _, i = c
            return run(params, new)[0][1], new, i + 1

        found, _, _ = jax.lax.while_loop(
            lambda c: (c[2] < passes) & ~_all_equal(c[0], c[1]),
            search,
            (run(params, guess)[0][1], guess, jnp.ones((), jnp.int32)),
        )
        (loss, _), vjp, (pooled, aux) = jax.vjp(run, params, found, has_aux=True)
        one = jnp.ones_like(loss)

        def adjoint(c: tuple) -> tuple:
            new, _, _, i = c
            grads, following = vjp((one, new))
            return following, new, grads, i + 1

        zero = jax.tree.map(jnp.zeros_like, found)
        grads, first = vjp((one, zero))
        _, _, grads, _ = jax.lax.while_loop(
            lambda c: (c[3] < passes + 1) & ~_all_equal(c[0], c[1]),
            adjoint,
            (first, zero, grads, jnp.ones((), jnp.int32)),
        )
        return (loss, (finish_pooling(model, pooled), aux)), grads

    return value_and_grad

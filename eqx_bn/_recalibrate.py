"""`recalibrate`: every BatchNorm's running statistics recomputed from batches, the
weights fixed (PyTorch's `torch.optim.swa_utils.update_bn`).

For the pass, each `BatchNorm` of the model is replaced by an `_Accumulating` layer
holding it: it runs the BatchNorm in training mode (its output uses the batch's
statistics, as the model's next layers expect) and folds the batch's statistics
into an accumulator kept in the State, under the BatchNorm's own index. The
BatchNorms themselves, their momentum included, are never changed; at the end each
accumulator becomes the entry the BatchNorm keeps (`RunningStats`, or
`CumulativeStats` for `momentum=None`) in a copy of the caller's State. A renorm
layer's `RenormStats` follow Keras's own update and are refused (`_refusal`).
"""

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Shaped

from ._batch_norm import BatchNorm, CumulativeStats, RunningStats
from ._describe import describe
from ._numerics import cumulative_average, merge_moments
from ._progress import progress
from ._typing import typecheck

ApplyFn = Callable[[PyTree, eqx.nn.State, Any], tuple[Any, eqx.nn.State]]
"""`apply(model, state, batch) -> (out, state)`: one training-mode call of the model on
a batch, returning the State the model gave back."""


class _Pooled(NamedTuple):
    """What `population=True` accumulates per channel: the number of elements, their
    mean and the sum of squared deviations from it (Chan et al.'s merge needs
    nothing else), and the number of batches."""

    count: Float[Array, " channels"]
    mean: Float[Array, " channels"]
    m2: Float[Array, " channels"]
    num_batches: Int[Array, ""]


class _Accumulating(eqx.nn.StatefulLayer):
    """Stands in for one BatchNorm during `recalibrate`: its training output, and
    this batch's statistics folded into the accumulator under its index."""

    norm: BatchNorm
    population: bool = eqx.field(static=True)

    def __getattr__(self, name: str) -> Any:
        # The model may read its BatchNorm's configuration (`self.bn.input_size`)
        # while it runs: this layer answers for the one it holds.
        if name.startswith("__") or name == "norm":
            raise AttributeError(name)
        return getattr(self.norm, name)

    def __call__(
        self,
        x: Shaped[Array, "*shape"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        mask: Shaped[Array, "*mask_shape"] | None = None,
    ) -> tuple[Shaped[Array, "*shape"], eqx.nn.State]:
        # Training statistics whatever the mode asked for, as update_bn's model.train().
        del key, inference
        y, stats = self.norm._train_with_moments(x, mask)
        if stats is None:  # an empty batch: nothing to count, as in training
            return y, state
        acc = state.get(self.norm.state_index)
        if self.population:
            count, mean, m2 = merge_moments((acc.count, acc.mean, acc.m2), stats)
            acc = _Pooled(count, mean, m2, acc.num_batches + 1)
        else:
            acc = CumulativeStats(
                *cumulative_average(acc, stats, self.norm.unbiased_running_var)
            )
        return y, state.set(self.norm.state_index, acc)


def _accumulator(bn: BatchNorm, population: bool) -> CumulativeStats | _Pooled:
    """A reset accumulator: PyTorch's `reset_running_stats()` (mean 0, variance 1,
    count 0) for the default, nothing seen for `population=True`."""
    shape, dtype = (bn.input_size,), bn.running_dtype
    count = jnp.zeros((), jnp.int32)
    if population:
        wide = jnp.promote_types(dtype, jnp.float32)
        zeros = jnp.zeros(shape, wide)
        return _Pooled(zeros, zeros, zeros, count)
    return CumulativeStats(jnp.zeros(shape, dtype), jnp.ones(shape, dtype), count)


def _entry(
    bn: BatchNorm, acc: CumulativeStats | _Pooled
) -> RunningStats | CumulativeStats:
    """The State entry `bn` keeps, holding the accumulated statistics."""
    dtype = bn.running_dtype
    if isinstance(acc, _Pooled):
        n = acc.count
        denominator = n - 1 if bn.unbiased_running_var else n
        defined = denominator > 0
        var = jnp.where(defined, acc.m2 / jnp.where(defined, denominator, 1), 1)
        mean = jnp.where(n > 0, acc.mean, 0)
        mean, var = mean.astype(dtype), var.astype(dtype)
    else:
        mean, var = acc.mean, acc.var
    if bn.momentum is None:
        return CumulativeStats(mean, var, acc.num_batches)
    return RunningStats(mean, var)


def _is_norm(v: Any) -> bool:
    return isinstance(v, BatchNorm)


def _refusal(where: str, bn: BatchNorm, population: bool) -> ValueError | None:
    """Why `bn` cannot be recalibrated, or None. A renorm layer's training output
    depends on the renorm statistics the pass would recompute; a ghost layer's
    statistics are per virtual batch, which `population=True`'s pooling of every
    example does not give."""
    freeze = (
        "or freeze that layer (frozen='statistics', e.g. eqx_bn.freeze_batch_norms "
        "on the part of the model that holds it) so that recalibrate leaves its "
        "statistics as they are."
    )
    if bn.renorm:
        return ValueError(
            f"recalibrate: BatchNorm {where} has renorm=True, which recalibrate "
            "does not support: Batch Renormalization's training output is corrected "
            "towards its renorm statistics, the very ones a recalibration would "
            "recompute, and its five statistics follow Keras's update rule, which "
            "has no recalibration pass to match. Update them with training steps "
            "(a learning rate of 0 keeps the weights), " + freeze
        )
    if bn.virtual_batch_size is not None and population:
        return ValueError(
            f"recalibrate(population=True): BatchNorm {where} has "
            f"virtual_batch_size={bn.virtual_batch_size}: its running statistics are "
            "each virtual batch's own (tf_keras's), which the statistics of all "
            "the examples pooled together are not. Use population=False (the "
            "average over the batches of each batch's ghost statistics, as training "
            "averages them), " + freeze
        )
    return None


def _replace_norms(model: PyTree, population: bool) -> tuple[PyTree, list[BatchNorm]]:
    """`model` with each BatchNorm in an `_Accumulating`, and those BatchNorms. A
    frozen one stays as it is: `update_bn` skips `FrozenBatchNorm2d`. A ValueError
    for one that cannot be recalibrated (`_refusal`)."""
    found: list[BatchNorm] = []

    def swap(path, v):
        if not _is_norm(v) or v.frozen is not None:
            return v
        refusal = _refusal("model" + jax.tree_util.keystr(path), v, population)
        if refusal is not None:
            raise refusal
        found.append(v)
        # Its own inference flag makes no difference here: one compiled pass
        # whether the model came in inference mode or not.
        return _Accumulating(eqx.nn.inference_mode(v, False), population)

    return jax.tree_util.tree_map_with_path(swap, model, is_leaf=_is_norm), found


def _with_entries(state: eqx.nn.State, entries: dict) -> eqx.nn.State:
    """A new State: `state`'s entries, those whose key is in `entries` replaced by
    its value (of any structure); `state` itself stays valid."""
    values, keys = state.tree_flatten()  # Equinox's pytree protocol: keys as data
    return eqx.nn.State.tree_unflatten(
        keys, tuple(entries.get(k, v) for k, v in zip(keys, values))
    )


def _entries(state: eqx.nn.State) -> dict:
    values, keys = state.tree_flatten()
    return dict(zip(keys, values))


def _first(batch: Any) -> Any:
    """As `update_bn`: of a loader's `(input, target, ...)`, the input."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _call_per_example(model, state, batch):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        _first(batch), state
    )


def _call_whole(model, state, batch):
    return model(_first(batch), state)


@eqx.filter_jit
def _step(model: PyTree, state: eqx.nn.State, batch: Any, apply: ApplyFn):
    out = apply(model, state, batch)
    if not (
        isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], eqx.nn.State)
    ):
        raise TypeError(
            "recalibrate: apply(model, state, batch) must return (out, state), the "
            "model's output and the eqx.nn.State it gave back, got "
            f"{describe(out)}. E.g. `apply=lambda model, state, batch: "
            "jax.vmap(model, axis_name='batch', in_axes=(0, None), "
            "out_axes=(0, None))(batch['image'], state)`."
        )
    return out[1]


def _auto(mesh: Mesh) -> Mesh:
    """`mesh` with every axis of type Auto: the same devices, in the same order."""
    return Mesh(
        mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim
    )


def _batch_mesh(batch: Any) -> Mesh | None:
    """The mesh the batch is spread over, if it is spread over several devices."""
    for leaf in jax.tree.leaves(batch):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and len(sharding.device_set) > 1:
            return sharding.mesh
    return None


def _on_auto_mesh(batch: Any) -> Any:
    """The batch's leaves sharded explicitly, re-placed (without a copy) on the Auto
    version of their mesh: JAX 0.10 cannot `psum` over a vmap axis sharded
    explicitly, which a BatchNorm under the default per-example call does."""

    def place(leaf):
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return leaf
        if all(t == AxisType.Auto for t in sharding.mesh.axis_types):
            return leaf
        return jax.device_put(leaf, NamedSharding(_auto(sharding.mesh), sharding.spec))

    return jax.tree.map(place, batch)


def _check_batches(batches: Any) -> None:
    if isinstance(batches, (jax.Array, np.ndarray)) or not isinstance(
        batches, Iterable
    ):
        raise TypeError(
            "recalibrate: batches must be an iterable of batches (a list, a data "
            f"loader, a generator), got {describe(batches)}. For one batch, pass "
            "[x]; to split an array into batches, e.g. `jnp.split(x, n)` or "
            "`(x[i : i + 64] for i in range(0, len(x), 64))`."
        )


@typecheck
def recalibrate(
    model: PyTree,
    state: eqx.nn.State,
    batches: Iterable,
    *,
    apply: ApplyFn | None = None,
    population: bool = False,
) -> eqx.nn.State:
    r"""Recomputes every BatchNorm's running statistics from `batches`, the weights
    fixed: PyTorch's `torch.optim.swa_utils.update_bn`.

    After averaging weights (SWA, an EMA of the parameters) the running statistics
    no longer describe the activations the model produces; a pass over some
    training batches measures them again. Each `eqx_bn.BatchNorm` forgets its
    statistics and runs in training mode (its output normalised with the batch's
    statistics, as in training), and its new running mean and variance are

    - by default, the average over the batches of each batch's mean and variance
        (the unbiased one where the layer has `unbiased_running_var=True`), every
        batch weighing the same whatever its size: `update_bn`'s cumulative
        average, as a `BatchNorm(momentum=None)` computes it;
    - with `population=True`, the mean and variance of all the examples' values
        together (every element weighing the same, the variance pooled with the
        spread between batches, unbiased once over all of them where the layer
        is), which PyTorch does not offer. Both are exact for a first BatchNorm;
        deeper ones see inputs normalised with each batch's statistics, as in
        training.

    Nothing of the model changes: its BatchNorms keep their momentum (for the
    statistics' next updates in training), and a `momentum=None` layer's count
    becomes the number of batches, as `update_bn` leaves `num_batches_tracked`.
    Frozen BatchNorms ([`eqx_bn.freeze_batch_norms`][]) are left as they are, as
    `update_bn` skips `torchvision.ops.FrozenBatchNorm2d`. A Ghost BatchNorm
    (`virtual_batch_size=`) takes each batch's statistics as training does, from
    its virtual batches (so each batch must hold a multiple of the virtual batch
    size); `population=True` and Batch Renormalization (`renorm=True`) are
    refused, as the message explains. Other stateful layers
    run with their State but keep their entries as given.

    !!! Example

        ```python
        state = eqx_bn.recalibrate(swa_model, state, [x[:64], x[64:128]])
        logits, _ = jax.vmap(eqx.nn.inference_mode(swa_model),
                             in_axes=(0, None), out_axes=(0, None))(x, state)
        ```

    Every batch of one shape runs one compiled step (`eqx.filter_jit`); a batch of
    another shape, typically a shorter last one, compiles once more. (Padding it
    with masked examples would need every model to take a mask.) The batches may
    be sharded over devices: the model and State are then placed, replicated, on
    the batches' mesh (the default per-example call runs a batch on a mesh of
    explicit axes, `jax.make_mesh`'s default, on the same mesh with Auto axes,
    without a copy: JAX 0.10 cannot reduce over a vmap axis sharded explicitly).
    On a terminal a progress bar counts the batches (with tqdm installed;
    `TQDM_DISABLE=1` hides it).

    **Arguments:**

    - `model`: the model; in inference mode or not (its BatchNorms are run in
        training mode either way, other layers as they are: PyTorch's `update_bn`
        switches Dropout to training too, this does not).
    - `state`: its `eqx.nn.State`; it is neither changed nor used up (a new one is
        returned).
    - `batches`: an iterable of batched inputs, read once (a list, a data loader,
        a generator). A batch that is a tuple or list is `(input, target, ...)`,
        and its first element is the input, as in `update_bn`.
    - `apply`: `apply(model, state, batch) -> (out, state)`, one call of the
        model on a batch, for models called in another way (several inputs,
        `shard_map`, a dict batch). By default `model(x, state)` under
        `jax.vmap(model, axis_name="batch", in_axes=(0, None),
        out_axes=(0, None))`, or directly when every BatchNorm takes whole
        batches (`axis_name=None`).
    - `population`: the statistics of all the examples together, instead of the
        average of the batches'.

    **Returns:**

    A new `eqx.nn.State` for `model`, with the recomputed statistics. With no
    batch, every BatchNorm's statistics are reset (mean 0, variance 1), as
    `update_bn` leaves them.

    **Raises:**

    - `TypeError`: if `batches` is an array or not iterable (the message shows
        how to split an array), or `apply` does not return `(out, state)`.
    - `ValueError`: as `eqx_bn.BatchNorm` does, for a batch that does not fit
        the model; for a BatchNorm (not frozen) with `renorm=True`, or with a
        `virtual_batch_size` and `population=True` (the message says why, and
        what to do instead).
    """
    _check_batches(batches)
    pass_model, norms = _replace_norms(model, population)
    if not norms:
        return _with_entries(state, {})
    pass_state = _with_entries(
        state, {bn.state_index.marker: _accumulator(bn, population) for bn in norms}
    )
    per_example = apply is None and not all(bn.axis_name is None for bn in norms)
    apply = apply or (_call_per_example if per_example else _call_whole)
    replicated = None
    for i, batch in enumerate(progress(batches, desc="recalibrate", unit="batch")):
        if per_example:
            batch = _on_auto_mesh(batch)
        if i == 0:
            mesh = _batch_mesh(batch)
            if mesh is not None:
                replicated = NamedSharding(mesh, PartitionSpec())
                pass_model, pass_state = eqx.filter_shard(
                    (pass_model, pass_state), replicated
                )
        pass_state = _step(pass_model, pass_state, batch, apply)
    accumulated = _entries(pass_state)
    new = _with_entries(
        state,
        {
            bn.state_index.marker: _entry(bn, accumulated[bn.state_index.marker])
            for bn in norms
        },
    )
    # One placement for the whole State: the mesh the batches were on, if any.
    return new if replicated is None else eqx.filter_shard(new, replicated)

"""Training with explicit State: a `TrainState` holder and jitted train/eval steps.

The Flax workflow (a `TrainState` with `batch_stats`, `apply(..., mutable=
["batch_stats"])` in the loss, running averages in evaluation) becomes:

- a loss written as a plain function of the model and its `eqx.nn.State`,
  `loss_fn(model, state, batch) -> (loss, (state, aux))`;
- `TrainState.create(model, state, optimizer)`, a PyTree holding everything that
  changes during training;
- `make_train_step(loss_fn)` and `make_eval_step(fn)`, each jitted once.

The holder keeps the model split, once, into its arrays (`params`) and the rest
(`static`, a static field), so that every leaf of a `TrainState` is an array and a
step is a plain `jax.jit` with the holder's buffers donated. `eqx.filter_jit`
would re-partition the whole PyTree on every call, about doubling the dispatch cost
of a small model's step; this way a step costs what a jitted Flax step costs.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PyTree

from ._typing import typecheck

LossFn = Callable[[PyTree, eqx.nn.State, Any], tuple[Array, tuple[eqx.nn.State, Any]]]
"""`loss_fn(model, state, batch) -> (loss, (state, aux))`: `loss` a scalar, `state`
the `eqx.nn.State` returned by the model's stateful layers, `aux` any PyTree of
arrays (logits, metrics) or `None`."""


def _shape_of(out: Any) -> str:
    """A short description of a loss function's output, for error messages."""
    if isinstance(out, tuple):
        return "(" + ", ".join(_shape_of(o) for o in out) + ")"
    return type(out).__name__


@eqx.filter_jit
def _init(
    params: PyTree, state: eqx.nn.State, optimizer: optax.GradientTransformation
) -> tuple[PyTree, eqx.nn.State, optax.OptState, Array]:
    # One compiled call instead of one eager op (and one compilation) per array.
    # The copies are fresh buffers: jit would hand an unchanged input straight back.
    params, state = jax.tree.map(lambda x: jnp.array(x, copy=True), (params, state))
    with jax.numpy_dtype_promotion("standard"):  # Optax's code, as in apply_gradients
        opt_state = optimizer.init(eqx.filter(params, eqx.is_inexact_array))
    return params, state, opt_state, jnp.zeros((), jnp.int32)


class TrainState(eqx.Module):
    """Everything that changes during training: the model's arrays, its `State`, the
    optimiser state and the step count. It is a PyTree: it can be jitted, vmapped,
    saved with `eqx.tree_serialise_leaves` and restored into a `TrainState` of the
    same structure.

    Build it with [`TrainState.create`][]; read the trained model back with
    `train_state.model`.

    !!! Example

        ```python
        import equinox as eqx, jax, optax, eqx_bn
        from eqx_bn.train import TrainState

        model, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3)
        ts = TrainState.create(model, state, optax.sgd(0.1))
        ts.step, ts.model.input_size  # (Array(0, dtype=int32), 3)
        ```

    **Fields:**

    - `params`: the model's arrays (`eqx.filter(model, eqx.is_array)`), `None`
        where the model holds something else.
    - `state`: the model's `eqx.nn.State` (the BatchNorm running averages).
    - `opt_state`: the optimiser state, for the model's floating-point arrays.
    - `step`: the number of optimiser updates applied, an int32 scalar.
    - `static`: the rest of the model (configuration, flags, functions).
    - `tx`: the `optax.GradientTransformation`.
    """

    params: PyTree
    state: eqx.nn.State
    opt_state: optax.OptState
    step: Int[Array, ""]
    static: PyTree = eqx.field(static=True)
    tx: optax.GradientTransformation = eqx.field(static=True)

    @classmethod
    @typecheck
    def create(
        cls,
        model: PyTree,
        state: eqx.nn.State,
        optimizer: optax.GradientTransformation,
    ) -> "TrainState":
        """Builds the holder for `model` and its `state`, and initialises `optimizer`
        on the model's floating-point arrays.

        The arrays are copied: `make_train_step` donates the holder's buffers to each
        step, and the copy keeps `model` and `state` usable after that.

        !!! Example

            ```python
            import equinox as eqx, jax, optax, eqx_bn
            from eqx_bn.train import TrainState

            model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
                [eqx.nn.Linear(3, 4, key=jax.random.key(0)), eqx_bn.BatchNorm(4)]
            )
            ts = TrainState.create(model, state, optax.adam(1e-3))
            ```

        **Arguments:**

        - `model`: the model, any PyTree (usually an `eqx.Module`), as returned by
            `eqx.nn.make_with_state`.
        - `state`: its `eqx.nn.State`.
        - `optimizer`: an `optax.GradientTransformation`.

        **Returns:**

        A `TrainState` at step 0.
        """
        params, static = eqx.partition(model, eqx.is_array)
        params, state, opt_state, step = _init(params, state, optimizer)
        return cls(
            params=params,
            state=state,
            opt_state=opt_state,
            step=step,
            static=static,
            tx=optimizer,
        )

    @property
    def model(self) -> PyTree:
        """The model: `params` and `static` recombined."""
        return eqx.combine(self.params, self.static)


@typecheck
def apply_gradients(
    train_state: TrainState, grads: PyTree, state: eqx.nn.State
) -> TrainState:
    """One optimiser update: the next `TrainState`, holding the model's new `state`.

    Use it to write a custom step; [`make_train_step`][] calls it for you. It is a
    function rather than a method because the loss consumes `train_state.state`
    (`eqx.nn.State` refuses to be used twice), after which Equinox cannot bind a
    method to `train_state` any more.

    !!! Example

        ```python
        from eqx_bn.train import apply_gradients

        @jax.jit
        def my_step(ts, batch):  # `loss_fn` as in `make_train_step`'s example
            (loss, (state, aux)), grads = eqx.filter_value_and_grad(
                loss_fn, has_aux=True
            )(ts.model, ts.state, batch)
            return apply_gradients(ts, grads, state), loss

        ts, loss = my_step(ts, (x, x + 1.0))
        ```

    **Arguments:**

    - `train_state`: the current `TrainState`.
    - `grads`: gradients shaped like the model (as `eqx.filter_grad` returns
        them: `None` for anything that is not a floating-point array).
    - `state`: the `eqx.nn.State` returned by the loss.

    **Returns:**

    A new `TrainState`, with `step` increased by one.
    """
    grads = eqx.filter(grads, eqx.is_inexact_array)
    trainable = eqx.filter(train_state.params, eqx.is_inexact_array)
    # Optax relies on standard promotion (Adam's bias correction mixes float and
    # int32); run it as designed even when the caller's config is strict.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = train_state.tx.update(
            grads, train_state.opt_state, trainable
        )
    params = eqx.apply_updates(train_state.params, updates)
    return dataclasses.replace(
        train_state,
        params=params,
        state=state,
        opt_state=opt_state,
        step=train_state.step + 1,
    )


@typecheck
def make_train_step(
    loss_fn: LossFn, *, donate: bool = True
) -> Callable[[TrainState, Any], tuple[TrainState, Array, Any]]:
    """Builds a jitted training step from a loss function.

    `loss_fn(model, state, batch) -> (loss, (state, aux))` is called with the model
    as it is held (in training mode, unless some layers were put in inference mode
    on purpose, e.g. a frozen BatchNorm for fine-tuning); its gradient with respect
    to the model's floating-point arrays updates the model through the optimiser,
    and the `state` it returns (the new BatchNorm running averages) becomes the
    `TrainState`'s state.

    The step is `jax.jit`-compiled once per structure of `TrainState` and batch.

    !!! Example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, optax, eqx_bn
        from eqx_bn.train import TrainState, make_train_step

        def loss_fn(model, state, batch):
            x, y = batch
            batched = jax.vmap(model, axis_name="batch",
                               in_axes=(0, None), out_axes=(0, None))
            pred, state = batched(x, state)
            return jnp.mean((pred - y) ** 2), (state, pred)

        model, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3)
        ts = TrainState.create(model, state, optax.sgd(0.1))
        train_step = make_train_step(loss_fn)
        x = jax.random.normal(jax.random.key(0), (8, 3))
        ts, loss, pred = train_step(ts, (x, x + 1.0))
        ```

    **Arguments:**

    - `loss_fn`: `loss_fn(model, state, batch) -> (loss, (state, aux))`, with
        `loss` a scalar; `aux` is any PyTree of arrays, or `None`. Randomness
        (dropout keys) travels in `batch`.
    - `donate`: donate the input `TrainState`'s buffers to the step, so that the
        update happens in place. The `TrainState` passed in cannot be used again:
        write `ts, loss, aux = train_step(ts, batch)`.

    **Returns:**

    `train_step(train_state, batch) -> (train_state, loss, aux)`.
    """

    def checked_loss(model: PyTree, state: eqx.nn.State, batch: Any) -> Any:
        out = loss_fn(model, state, batch)
        if not (
            isinstance(out, tuple)
            and len(out) == 2
            and isinstance(out[1], tuple)
            and len(out[1]) == 2
            and isinstance(out[1][0], eqx.nn.State)
        ):
            raise TypeError(
                "make_train_step: loss_fn(model, state, batch) must return "
                "(loss, (state, aux)) with state an eqx.nn.State, got "
                f"{_shape_of(out)}. Return the State that the model gave back, and "
                "None as aux when there is nothing else: "
                "`return loss, (state, None)`."
            )
        return out

    def step(ts: TrainState, batch: Any) -> tuple[TrainState, Array, Any]:
        grad_fn = eqx.filter_value_and_grad(checked_loss, has_aux=True)
        (loss, (state, aux)), grads = grad_fn(ts.model, ts.state, batch)
        return apply_gradients(ts, grads, state), loss, aux

    return jax.jit(step, donate_argnums=(0,) if donate else ())


@typecheck
def make_eval_step(fn: Callable[..., Any]) -> Callable[[TrainState, Any], Any]:
    """Builds a jitted evaluation step: `fn` called with the model in inference mode.

    Every stateful layer then reads its running averages (BatchNorm normalises with
    the running mean and variance) and leaves the `State` as it is. Pass the loss
    function itself to get the held-out loss, or any metric function.

    !!! Example

        ```python
        from eqx_bn.train import make_eval_step

        eval_step = make_eval_step(loss_fn)  # the loss of the example above
        loss, (state, pred) = eval_step(ts, (x, x + 1.0))  # `state` equals `ts.state`
        ```

    **Arguments:**

    - `fn`: `fn(model, state, batch) -> out`, with the same calling convention
        as the loss given to [`make_train_step`][].

    **Returns:**

    `eval_step(train_state, batch) -> out`, jitted; the `TrainState` is not donated.
    """

    def step(ts: TrainState, batch: Any) -> Any:
        return fn(eqx.nn.inference_mode(ts.model), ts.state, batch)

    return jax.jit(step)

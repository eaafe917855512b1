"""Training with explicit State: a `TrainState` holder and jitted train/eval steps.

The Flax workflow (a `TrainState` with `batch_stats`, `apply(..., mutable=
["batch_stats"])` in the loss, running averages in evaluation) becomes:

- a loss written as a plain function of the model and its `eqx.nn.State`,
  `loss_fn(model, state, batch) -> (loss, (state, aux))`;
- `TrainState.create(model, state, optimizer)`, a PyTree holding everything that
  changes during training;
- `make_train_step(loss_fn)` and `make_eval_step(fn)`, each jitted once.

The holder keeps the model split, once, into its arrays and the rest, and stores
every array as a flat tuple, with all structure in one static field: each step is
a plain `jax.jit` with the holder's buffers donated, and passing the holder costs
what passing a Flax `TrainState` costs. (`eqx.filter_jit` would re-partition the
whole PyTree on every call, and even a plain `jax.jit` of nested Equinox modules
flattens them one by one: for the seed MLP with Adam, 4x and 1.5x the per-step
time of a jitted Flax step; this layout takes about 0.75x.)
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


class Structure:
    """Everything about a `TrainState` that is not an array: the PyTree structures of
    the model's arrays, the State and the optimiser state, the rest of the model
    (configuration, flags, functions) and the optimiser itself.

    It is a static field of `TrainState`, so it is part of the jit cache key. Its
    hash is computed once and equality tries identity first: the steps compare it
    on every call, and a step's output carries the very object of its input.
    """

    __slots__ = ("params", "static", "state", "opt_state", "tx", "_hash")

    def __init__(self, params, static, state, opt_state, tx):
        self.params = params  # treedef of the model's arrays
        self.static = static  # the model without its arrays
        self.state = state  # treedef of the eqx.nn.State
        self.opt_state = opt_state  # treedef of the optimiser state
        self.tx = tx
        try:
            self._hash = hash((params, static, state, opt_state, tx))
        except TypeError:  # an unhashable leaf in the model: fall back on identity
            self._hash = id(self)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Structure) or self._hash != other._hash:
            return False
        pairs = [
            (self.params, other.params),
            (self.state, other.state),
            (self.opt_state, other.opt_state),
            (self.tx, other.tx),
        ]
        return all(a == b for a, b in pairs) and bool(
            eqx.tree_equal(self.static, other.static)
        )

    def __repr__(self) -> str:
        return f"Structure(model={type(self.static).__name__}, tx={self.tx!r})"


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
    saved with `eqx.tree_serialise_leaves` and restored into a `TrainState` made the
    same way (same model configuration and optimiser).

    Build it with [`TrainState.create`][]; read the model back with
    `train_state.model` and its State with `train_state.state`.

    The arrays are kept as flat tuples and everything else in one static
    [`Structure`][]: flattening a `TrainState` (which `jax.jit` does on every call)
    then costs about what flattening a Flax `TrainState` costs, where Equinox modules
    would be flattened one by one, three times over with Adam's two moments.

    !!! Example

        ```python
        import equinox as eqx, jax, optax, eqx_bn
        from eqx_bn.train import TrainState

        model, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3)
        ts = TrainState.create(model, state, optax.sgd(0.1))
        ts.step, ts.model.input_size  # (Array(0, dtype=int32), 3)
        ```

    **Fields:**

    - `param_leaves`: the model's arrays, `jax.tree.leaves` order.
    - `state_leaves`: the arrays of its `eqx.nn.State` (BatchNorm running averages).
    - `opt_leaves`: the arrays of the optimiser state.
    - `step`: the number of optimiser updates applied, an int32 scalar.
    - `structure`: the static rest, a [`Structure`][].

    **Properties:** `model`, `state`, `opt_state`, `params` (the model's arrays,
    `None` elsewhere, as `eqx.filter(model, eqx.is_array)`) and `tx`, each rebuilt
    from the leaves when read: every read of `state` gives a fresh `eqx.nn.State`.
    """

    param_leaves: tuple[Array, ...]
    state_leaves: tuple[Array, ...]
    opt_leaves: tuple[Array, ...]
    step: Int[Array, ""]
    structure: Structure = eqx.field(static=True)

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
        param_leaves, param_def = jax.tree.flatten(params)
        state_leaves, state_def = jax.tree.flatten(state)
        opt_leaves, opt_def = jax.tree.flatten(opt_state)
        return cls(
            param_leaves=tuple(param_leaves),
            state_leaves=tuple(state_leaves),
            opt_leaves=tuple(opt_leaves),
            step=step,
            structure=Structure(param_def, static, state_def, opt_def, optimizer),
        )

    @property
    def params(self) -> PyTree:
        """The model's arrays, shaped like the model (`None` for non-arrays)."""
        return jax.tree.unflatten(self.structure.params, self.param_leaves)

    @property
    def model(self) -> PyTree:
        """The model: its arrays and the rest recombined."""
        return eqx.combine(self.params, self.structure.static)

    @property
    def state(self) -> eqx.nn.State:
        """The model's `eqx.nn.State`, a fresh object on every read."""
        return jax.tree.unflatten(self.structure.state, self.state_leaves)

    @property
    def opt_state(self) -> optax.OptState:
        """The optimiser state, over the model's floating-point arrays."""
        return jax.tree.unflatten(self.structure.opt_state, self.opt_leaves)

    @property
    def tx(self) -> optax.GradientTransformation:
        """The optimiser."""
        return self.structure.tx


@typecheck
def apply_gradients(
    train_state: TrainState, grads: PyTree, state: eqx.nn.State
) -> TrainState:
    """One optimiser update: the next `TrainState`, holding the model's new `state`.

    Use it to write a custom step; [`make_train_step`][] calls it for you. Like
    Flax's `TrainState.apply_gradients`, with the State passed explicitly.

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
    structure = train_state.structure
    params = train_state.params
    grads = eqx.filter(grads, eqx.is_inexact_array)
    trainable = eqx.filter(params, eqx.is_inexact_array)
    # Optax relies on standard promotion (Adam's bias correction mixes float and
    # int32); run it as designed even when the caller's config is strict.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = structure.tx.update(
            grads, train_state.opt_state, trainable
        )
    params = eqx.apply_updates(params, updates)
    param_leaves = _leaves(params, structure.params, "the model's arrays", "")
    state_leaves = _leaves(
        state,
        structure.state,
        "the State returned by the loss",
        " Return the State that the model gave back for the State it was given.",
    )
    opt_leaves = _leaves(opt_state, structure.opt_state, "the optimiser state", "")
    return dataclasses.replace(
        train_state,
        param_leaves=param_leaves,
        state_leaves=state_leaves,
        opt_leaves=opt_leaves,
        step=train_state.step + 1,
    )


def _leaves(tree: PyTree, expected: Any, what: str, fix: str) -> tuple[Array, ...]:
    leaves, treedef = jax.tree.flatten(tree)
    if treedef != expected:
        raise ValueError(
            f"apply_gradients: {what} changed structure during the step: expected "
            f"{expected}, got {treedef}.{fix}"
        )
    return tuple(leaves)


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

"""Training with explicit State: a `TrainState` holder and jitted train/eval steps.

The Flax workflow (a `TrainState` with `batch_stats`, `apply(..., mutable=
["batch_stats"])` in the loss, running averages in evaluation) becomes:

- a loss written as a plain function of the model and its `eqx.nn.State`,
  `loss_fn(model, state, batch) -> (loss, (state, aux))`;
- `TrainState.create(model, state, optimizer)`, a PyTree holding everything that
  changes during training;
- `make_train_step(loss_fn)` and `make_eval_step(fn)`, each jitted once;
- `TrainState.from_flax` / `TrainState.to_flax` to resume a Flax run (optimiser
  state included) and to hand one back.

The holder keeps the model split, once, into its arrays and the rest, and stores
every array as a flat tuple, with all structure in one static field: each step is
a plain `jax.jit` (donating the holder's buffers if asked to), and passing the
holder costs what passing a Flax `TrainState` costs. (`eqx.filter_jit` would
re-partition the whole PyTree on every call, and even a plain `jax.jit` of nested
Equinox modules flattens them one by one: for the seed MLP with Adam, 4x and 1.5x
the per-step time of a jitted Flax step; this layout takes about 0.75x.)
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Int, PyTree

from ._describe import describe
from ._typing import typecheck

__all__ = [
    "LossFn",
    "Structure",
    "TrainState",
    "apply_gradients",
    "make_eval_step",
    "make_train_step",
]

LossFn = Callable[[PyTree, eqx.nn.State, Any], tuple[Array, tuple[eqx.nn.State, Any]]]
"""`loss_fn(model, state, batch) -> (loss, (state, aux))`: `loss` a scalar, `state`
the `eqx.nn.State` returned by the model's stateful layers, `aux` any PyTree of
arrays (logits, metrics) or `None`."""


def _flax_train_state():
    """The Flax TrainState conversion, imported on first use: importing `eqx_bn.train`
    loads nothing from `eqx_bn.interop`."""
    from .interop import flax_train_state

    return flax_train_state


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
    params: PyTree, state: eqx.nn.State, optimizer: Any
) -> tuple[PyTree, eqx.nn.State, optax.OptState, Array]:
    # One compiled call instead of one eager op (and one compilation) per array.
    # The copies are fresh buffers: jit would hand an unchanged input straight back.
    params, state = jax.tree.map(lambda x: jnp.array(x, copy=True), (params, state))
    with jax.numpy_dtype_promotion("standard"):  # Optax's code, as in apply_gradients
        opt_state = optimizer.init(eqx.filter(params, eqx.is_inexact_array))
    return params, state, opt_state, jnp.zeros((), jnp.int32)


_UNSET: Any = object()


def _strong(x: Any) -> Any:
    """`x` without a weak type. A weakly typed leaf (`jnp.asarray(1e-4)`, what
    Optax's `init` gives for a Python hyperparameter) is a different jit cache key
    than the same dtype held strongly, and would compile every step once more."""
    if isinstance(x, jax.Array) and x.weak_type:
        return jax.lax.convert_element_type(x, x.dtype)
    return x


@jax.jit
def _fresh(leaves: list) -> list:
    # One compiled call: fresh buffers (jit would hand an unchanged input straight
    # back), so that a donating step cannot delete what the caller still holds, nor
    # be given one buffer twice (tied weights, one array for two hyperparameters).
    return [jnp.array(_strong(x), copy=True) for x in leaves]


def _check_optimizer(optimizer: Any, where: str) -> None:
    """Any object with `init` and `update` (a `GradientTransformation`,
    `optax.MultiSteps`...) is an optimiser; say how to fix anything else."""
    if callable(getattr(optimizer, "init", None)) and callable(
        getattr(optimizer, "update", None)
    ):
        return
    if callable(optimizer):
        name = getattr(optimizer, "__name__", type(optimizer).__name__)
        if getattr(optimizer, "__module__", "").startswith("optax"):
            example = f"`optax.{name}(learning_rate=1e-3)`"
        else:  # e.g. `optax.inject_hyperparams(optax.adam)`, not yet called
            example = "`optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)`"
        hint = f" `{name}` is a function that builds one: call it, e.g. {example}."
    elif isinstance(optimizer, (int, float)):
        hint = f" Got a number: pass `optax.sgd({optimizer})` or `optax.adam(...)`."
    else:
        hint = ""
    raise TypeError(
        f"{where}: `optimizer` must be an Optax optimiser, an object with `init` and "
        f"`update` methods (`optax.adam(1e-3)`, `optax.chain(...)`, "
        f"`optax.MultiSteps(...)`), got {type(optimizer).__name__}.{hint}"
    )


def _paths(tree: PyTree) -> list[str]:
    return [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _first_difference(a: str, b: str) -> str:
    """Where two long PyTreeDef strings first differ, with a little context."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 40)
    return f"held ...{a[lo : i + 40]}..., new ...{b[lo : i + 40]}..."


def _matching_leaves(
    tree: PyTree, expected: Any, old: tuple[Array, ...], name: str, fix: str
) -> tuple[Array, ...]:
    """The leaves of `tree` for `TrainState.replace`: the same structure, shapes and
    dtypes as the held ones (Python scalars are converted to the held dtype)."""
    leaves, treedef = jax.tree.flatten(tree)
    held_paths, paths = _paths(jax.tree.unflatten(expected, old)), _paths(tree)
    if held_paths != paths:
        lost = [p for p in held_paths if p not in paths][:5]
        new = [p for p in paths if p not in held_paths][:5]
        raise ValueError(
            f"TrainState.replace: the new {name} does not have the structure of the "
            f"held one. Leaves only in the held {name}: {', '.join(lost) or 'none'}; "
            f"only in the new one: {', '.join(new) or 'none'}. {fix}"
        )
    out, problems = [], []
    for path, leaf, held in zip(paths, leaves, old):
        if isinstance(leaf, (bool, int, float)) and jnp.shape(held) == ():
            kind, held_kind = np.asarray(leaf).dtype.kind, np.dtype(held.dtype).kind
            # Only a lossless conversion: a float cast to an int32 slot (a
            # learning rate built as `learning_rate=1`) would be truncated.
            if not (
                kind == held_kind
                or (kind in "iu" and held_kind in "iuf")
                or (kind == "b" and held_kind == "b")
            ):
                problems.append(
                    f"{name}{path}: the held value is {describe(held)}, which cannot "
                    f"hold the {type(leaf).__name__} {leaf!r} (it would be "
                    "truncated); build the optimiser with a value of that kind, e.g. "
                    "`learning_rate=1.0` rather than `learning_rate=1`"
                )
                out.append(leaf)
                continue
            leaf = jnp.asarray(leaf, held.dtype)
        if not hasattr(leaf, "dtype") or (
            jnp.shape(leaf) != jnp.shape(held) or leaf.dtype != held.dtype
        ):
            problems.append(
                f"{name}{path}: expected {describe(held)}, got {describe(leaf)}"
            )
        out.append(leaf)
    if problems:
        raise ValueError(
            "TrainState.replace: new leaves that do not fit the held ones (shape, "
            "dtype or kind): " + "; ".join(problems) + f". {fix}"
        )
    if treedef != expected:
        raise ValueError(
            f"TrainState.replace: the new {name} does not have the structure of the "
            f"held one: the same leaves, but a different configuration (static "
            f"fields): {_first_difference(str(expected), str(treedef))}. {fix}"
        )
    return tuple(_fresh(out))


def _step(step: Any) -> Array:
    """A new `step` for `TrainState.replace`: an integer that int32 holds."""
    # `True` is an int to Python, and int32 would wrap (or refuse) a larger one.
    is_int = not isinstance(step, (bool, np.bool_)) and (
        isinstance(step, (int, np.integer))
        or (
            hasattr(step, "dtype")
            and jnp.shape(step) == ()
            and jnp.issubdtype(step.dtype, jnp.integer)
        )
    )
    if not is_int:
        raise ValueError(
            f"TrainState.replace: `step` must be an integer, got {step!r}. Pass the "
            "number of optimiser updates applied, e.g. `step=0`."
        )
    if isinstance(step, (int, np.integer)):
        info = np.iinfo(np.int32)
        if not info.min <= step <= info.max:
            raise ValueError(
                f"TrainState.replace: `step` must be an integer in int32's range "
                f"[{info.min}, {info.max}] (the step is held as int32, as in Flax), "
                f"got {step}."
            )
    return _fresh([jnp.asarray(step, jnp.int32)])[0]


class TrainState(eqx.Module):
    """Everything that changes during training: the model's arrays, its `State`, the
    optimiser state and the step count. It is a PyTree: it can be jitted, vmapped,
    saved with `eqx.tree_serialise_leaves` and restored into a `TrainState` made the
    same way (same model configuration and optimiser).

    Build it with [`TrainState.create`][] (or [`TrainState.from_flax`][] to resume
    a Flax run); read the model back with `train_state.model` and its State with
    `train_state.state`; change any part with [`TrainState.replace`][].

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
    from the leaves when read: every read of `state` gives a fresh `eqx.nn.State`,
    and changing what a read returned (`ts.opt_state.hyperparams["learning_rate"]
    = 0.01`) changes nothing in the holder; pass the changed object to
    [`TrainState.replace`][] instead.

    Flax's `TrainState` fields and these: `params` + `batch_stats` -> `model` +
    `state`; `opt_state` -> `opt_state`; `tx` -> `tx` (the `optimizer` given to
    `create`); `step` -> `step`; `apply_fn` -> none (call the model).
    """

    param_leaves: tuple[Array, ...]
    state_leaves: tuple[Array, ...]
    opt_leaves: tuple[Array, ...]
    step: Int[Array, ""]
    structure: Structure = eqx.field(static=True)

    @classmethod
    def _assemble(
        cls,
        params: PyTree,
        static: PyTree,
        state: eqx.nn.State,
        opt_state: Any,
        step: Array,
        optimizer: Any,
    ) -> "TrainState":
        param_leaves, param_def = jax.tree.flatten(params)
        state_leaves, state_def = jax.tree.flatten(state)
        opt_leaves, opt_def = jax.tree.flatten(opt_state)
        return cls(
            param_leaves=tuple(map(_strong, param_leaves)),
            state_leaves=tuple(map(_strong, state_leaves)),
            opt_leaves=tuple(map(_strong, opt_leaves)),
            step=_strong(step),
            structure=Structure(param_def, static, state_def, opt_def, optimizer),
        )

    @classmethod
    @typecheck
    def create(
        cls,
        model: PyTree,
        state: eqx.nn.State,
        optimizer: Any,
    ) -> "TrainState":
        """Builds the holder for `model` and its `state`, and initialises `optimizer`
        on the model's floating-point arrays.

        The arrays are copied, so `model` and `state` stay usable whatever happens
        to the holder (even with `make_train_step(..., donate=True)`).

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
        - `optimizer`: an Optax optimiser: an `optax.GradientTransformation`, or
            any object with `init(params)` and `update(updates, state, params)`
            such as `optax.MultiSteps(...)` (as Flax's `TrainState` takes it).

        **Returns:**

        A `TrainState` at step 0.

        **Raises:**

        - `TypeError`: `optimizer` is not an optimiser (the message says how to
            make one).
        """
        _check_optimizer(optimizer, "TrainState.create")
        params, static = eqx.partition(model, eqx.is_array)
        params, state, opt_state, step = _init(params, state, optimizer)
        return cls._assemble(params, static, state, opt_state, step, optimizer)

    @classmethod
    @typecheck
    def from_flax(
        cls,
        model: eqx.Module,
        state: eqx.nn.State,
        checkpoint: Mapping,
        optimizer: Any,
        *,
        mapping: Mapping[str, Any] | None = None,
        ignore_extra: bool = False,
    ) -> "TrainState":
        """Resumes a Flax training run: a saved Flax `TrainState` (with a
        `batch_stats` field) as a `TrainState` whose next step is Flax's next step.

        `params` and `batch_stats` go into the model and its State as
        [`eqx_bn.interop.load_flax`][] puts them; the optimiser state's
        parameter-shaped parts (SGD's momentum `trace`, Adam's `mu` and `nu`,
        `MultiSteps`' `acc_grads`...) are paired with the model the same way, and
        its other leaves (`count`, `inject_hyperparams`' hyperparameters) are
        copied; `step` carries over.

        !!! Example

            ```python
            checkpoint = eqx_bn.interop.read_checkpoint("ckpts/checkpoint_1000")
            model, state = eqx.nn.make_with_state(ResNet18)(num_classes=10, key=key)
            ts = TrainState.from_flax(model, state, checkpoint, optax.adam(1e-3))
            ```

        **Arguments:**

        - `model`, `state`: the Equinox model and its State (their values are not
            used, only their structure, shapes and dtypes).
        - `checkpoint`: the Flax `TrainState` as
            [`eqx_bn.interop.read_checkpoint`][] (`read_msgpack`, `read_orbax`) or
            `flax.serialization.to_state_dict` give it: `{"step": ..., "params":
            ..., "batch_stats": ..., "opt_state": ...}`.
        - `optimizer`: the optimiser Flax trained with (its `tx`), built the same
            way: the Flax optimiser state must have the structure this one's
            `init` gives.
        - `mapping`: overrides of the parameter pairing, as for `load_flax`.
        - `ignore_extra`: skip top-level entries other than `step`, `params`,
            `batch_stats` and `opt_state` (more fields of a `TrainState` subclass)
            instead of raising.

        **Returns:**

        A `TrainState` at the checkpoint's step.

        **Raises:**

        - `ConversionError`: listing every missing, unexpected or mismatched entry
            of `params`, `batch_stats` and `opt_state` (for instance all of `mu`
            and `nu` when the checkpoint was trained with SGD), and layers with no
            conversion rule. Nothing is built then.
        - `TypeError`: `optimizer` is not an optimiser.
        """
        _check_optimizer(optimizer, "TrainState.from_flax")
        with jax.numpy_dtype_promotion("standard"):  # Optax's `init`, as in create
            model, state, opt_state, step = _flax_train_state().load(
                model,
                state,
                checkpoint,
                optimizer,
                mapping=mapping,
                ignore_extra=ignore_extra,
            )
        params, static = eqx.partition(model, eqx.is_array)
        return cls._assemble(params, static, state, opt_state, step, optimizer)

    def to_flax(self, *, mapping: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The holder as a saved Flax `TrainState`, the inverse of
        [`TrainState.from_flax`][].

        Flax restores it into a `TrainState` made with the same `tx` and a
        `batch_stats` field, and continues exactly where this one stopped:

        ```text
        target = FlaxTrainState.create(apply_fn=..., params=..., batch_stats=..., tx=tx)
        flax_ts = flax.serialization.from_state_dict(target, ts.to_flax())
        # or through a file:
        eqx_bn.interop.write_msgpack("ckpt.msgpack", ts.to_flax())
        with open("ckpt.msgpack", "rb") as f:
            flax_ts = flax.serialization.from_bytes(target, f.read())
        ```

        **Arguments:**

        - `mapping`: overrides of the parameter pairing, as for `export_flax`.

        **Returns:**

        `{"step": ..., "params": ..., "batch_stats": ..., "opt_state": ...}` as
        nested dicts of numpy arrays in Flax's layout (`batch_stats` only when the
        model has a BatchNorm), NamedTuples as dicts of their fields and tuples as
        `{"0": ..., "1": ...}`, as `flax.serialization.to_state_dict` writes them.

        **Raises:**

        - `ConversionError`: the model has layers with no conversion rule, or the
            optimiser state has parts not shaped like the parameters (Adafactor's
            factored `v_row`/`v_col`).
        """
        return _flax_train_state().export(
            self.model, self.state, self.opt_state, self.step, mapping=mapping
        )

    def replace(
        self,
        *,
        model: PyTree = _UNSET,
        state: eqx.nn.State = _UNSET,
        opt_state: Any = _UNSET,
        step: Any = _UNSET,
        **others: Any,
    ) -> "TrainState":
        """A copy with some parts replaced, as Flax's `train_state.replace(...)`.

        Each new part must have the structure, shapes and dtypes of the held one,
        so that the optimiser state still fits the model and the compiled steps
        are reused (arrays are held strongly typed, so `jnp.asarray(1e-4)` does
        not compile them again); the model's non-array configuration may change
        (e.g. a layer frozen with `eqx.nn.inference_mode`), which compiles them
        once more.

        The new arrays are copied, as by `create`: what was passed in stays usable
        whatever happens to the holder (even with `make_train_step(...,
        donate=True)`), and one array given for two leaves is two buffers.

        !!! Example

            ```python
            ts = TrainState.create(model, state, optax.inject_hyperparams(optax.adam)(
                learning_rate=1e-3))
            opt_state = ts.opt_state  # a fresh object on every read
            opt_state.hyperparams["learning_rate"] = 1e-4
            ts = ts.replace(opt_state=opt_state)  # without this, the change is lost
            ```

        **Arguments:**

        - `model`: a model shaped like `ts.model`.
        - `state`: an `eqx.nn.State` shaped like `ts.state`.
        - `opt_state`: an optimiser state shaped like `ts.opt_state` (Python
            scalars are converted to the held dtype when it holds them without
            loss, e.g. a new learning rate: a float for an int32 hyperparameter is
            refused, build the optimiser with `learning_rate=1.0` instead).
        - `step`: an integer in int32's range (not a bool).

        **Returns:**

        A new `TrainState`; this one is unchanged.

        **Raises:**

        - `ValueError`: a new part does not match the held one (the message names
            the leaves that differ), a Python float for an integer leaf, or a
            `step` that is not an int32 integer.
        - `TypeError`: for another keyword, with the one to use (Flax's `params`
            and `batch_stats` are `model` and `state` here).
        """
        if others:
            instead = {
                "params": "model=",
                "batch_stats": "state=",
                "tx": "TrainState.create(model, state, new_optimizer)",
                "apply_fn": "nothing (call the model)",
            }
            fields = "one of model=, state=, opt_state=, step="
            hints = "; ".join(
                f"{name}: use {instead.get(name, fields)}" for name in others
            )
            raise TypeError(
                "TrainState.replace takes model=, state=, opt_state= and step=, got "
                f"{', '.join(others)}. {hints}."
            )
        structure = self.structure
        changes: dict[str, Any] = {}
        fix = (
            "To train a different model or optimiser, build a new holder with "
            "`TrainState.create(model, state, optimizer)`."
        )
        if model is not _UNSET:
            params, static = eqx.partition(model, eqx.is_array)
            changes["param_leaves"] = _matching_leaves(
                params, structure.params, self.param_leaves, "model", fix
            )
            if not (
                static is structure.static or eqx.tree_equal(static, structure.static)
            ):
                changes["structure"] = Structure(
                    structure.params,
                    static,
                    structure.state,
                    structure.opt_state,
                    structure.tx,
                )
        if state is not _UNSET:
            changes["state_leaves"] = _matching_leaves(
                state, structure.state, self.state_leaves, "state", fix
            )
        if opt_state is not _UNSET:
            changes["opt_leaves"] = _matching_leaves(
                opt_state, structure.opt_state, self.opt_leaves, "opt_state", fix
            )
        if step is not _UNSET:
            changes["step"] = _step(step)
        return dataclasses.replace(self, **changes)

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
    def tx(self) -> Any:
        """The optimiser (Flax's `tx`): the `optimizer` given to `create`."""
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
    loss_fn: LossFn, *, donate: bool = False
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
        update happens in place. Off by default: every `TrainState`, model and
        State taken out before a step (`best = ts.model` for early stopping, an
        old `ts` to retry from) stays usable. With `donate=True` the step saves
        one copy of the parameters and optimiser state in memory (see
        `docs/training.md` for what that is worth), and everything read from the
        `TrainState` passed in dies with it: write `ts, loss, aux =
        train_step(ts, batch)`, and copy what you keep
        (`best = jax.tree.map(jnp.copy, ts.model)`). Passing a donated
        `TrainState` again raises a `ValueError` saying so.

    **Returns:**

    `train_step(train_state, batch) -> (train_state, loss, aux)`, jitted (its
    `lower` method compiles ahead of time).
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

    if not donate:
        return jax.jit(step)
    jitted = jax.jit(step, donate_argnums=(0,))

    def donating_step(ts: TrainState, batch: Any) -> tuple[TrainState, Array, Any]:
        _check_not_donated(ts, "train_step")
        return jitted(ts, batch)

    donating_step.lower = jitted.lower  # type: ignore[attr-defined]
    return donating_step


def _check_not_donated(ts: Any, where: str) -> None:
    """A clear error for a `TrainState` given to a donating step earlier."""
    # All the holder's buffers are donated together: `step` tells for all. XLA's
    # own error for a deleted buffer does not say where it came from.
    if (
        isinstance(ts, TrainState)
        and isinstance(ts.step, jax.Array)
        and not isinstance(ts.step, jax.core.Tracer)
        and ts.step.is_deleted()
    ):
        raise ValueError(
            f"{where}: this TrainState was donated to an earlier step (made "
            "with `make_train_step(..., donate=True)`), which reused its "
            "buffers. Pass the TrainState that step returned "
            "(`ts, loss, aux = train_step(ts, batch)`), or build the step "
            "without `donate=True` to keep old ones usable."
        )


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

    `eval_step(train_state, batch) -> out`, jitted (its `lower` method compiles
    ahead of time); the `TrainState` is not donated. Passing one that a donating
    train step consumed raises a `ValueError` saying so.
    """

    def step(ts: TrainState, batch: Any) -> Any:
        return fn(eqx.nn.inference_mode(ts.model), ts.state, batch)

    jitted = jax.jit(step)

    def eval_step(ts: TrainState, batch: Any) -> Any:
        _check_not_donated(ts, "eval_step")
        return jitted(ts, batch)

    eval_step.lower = jitted.lower  # type: ignore[attr-defined]
    return eval_step

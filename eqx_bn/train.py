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

The holder keeps each of its PyTrees (the model, its State, the optimiser state)
split as Equinox's `filter_jit` splits its arguments: a tuple of its arrays, and
in a static field its [`Skeleton`][] (tree structure and non-array leaves). Each
step is then a plain `jax.jit` (donating the holder's buffers if asked to), and
passing the holder costs what passing a Flax `TrainState` costs: JAX flattens
tuples of arrays in C++, but calls Python once per Equinox module of a tree (for
the seed MLP with Adam, flattening the model and its two moments as modules takes
7-9x as long as flattening Flax's dicts), and `eqx.filter_jit` would re-partition
the whole PyTree on every call.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Int, PyTree

from ._accumulation import (
    check_accumulation,
    exact_value_and_grad,
    pooled_value_and_grad,
)
from ._batch_norm import RenormClipping
from ._describe import describe, tree_differences
from ._fold import trainable
from ._typing import typecheck

__all__ = [
    "Averaged",
    "LossFn",
    "Skeleton",
    "TrainState",
    "WeightAveraging",
    "accumulated_value_and_grad",
    "apply_gradients",
    "ema",
    "make_eval_step",
    "make_train_step",
    "swa",
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


class Skeleton(NamedTuple):
    """A PyTree without its arrays: its tree structure (`jax.tree.structure`, with
    every node's static data, e.g. a layer's sizes) and its leaves that are not
    arrays (flags, functions), `None` where an array goes: with the arrays, the
    whole tree.

    It is what `eqx.filter_jit` keeps static of its arguments, and compares the
    same way: by value, so two `TrainState`s built the same way are the same
    PyTree structure and the same jit cache entry, whatever containers the model
    holds (lists and dicts of layers included).
    """

    treedef: jax.tree_util.PyTreeDef
    static_leaves: tuple[Any, ...]


def _split(tree: PyTree) -> tuple[tuple[Array, ...], Skeleton]:
    """`tree`'s arrays (`eqx.is_array`, in `jax.tree.leaves` order) and the rest."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = tuple(x for x in leaves if eqx.is_array(x))
    static = tuple(None if eqx.is_array(x) else x for x in leaves)
    return arrays, Skeleton(treedef, static)


def _join(arrays: tuple[Array, ...], skeleton: Skeleton) -> PyTree:
    """The tree that `_split` took apart, a new object each time (so that
    consuming one, e.g. with `eqx.nn.State.set`, spoils no other)."""
    it = iter(arrays)
    leaves = [next(it) if x is None else x for x in skeleton.static_leaves]
    return jax.tree.unflatten(skeleton.treedef, leaves)


@eqx.filter_jit
def _init_optimizer(optimizer: Any, trainable: PyTree) -> optax.OptState:
    # One compiled call instead of one eager op (and one compilation) per array.
    with jax.numpy_dtype_promotion("standard"):  # Optax's code, as in apply_gradients
        return optimizer.init(trainable)


_UNSET: Any = object()


def _strong(x: Any) -> Any:
    """`x` without a weak type. A weakly typed leaf (`jnp.asarray(1e-4)`, what
    Optax's `init` gives for a Python hyperparameter) is a different jit cache key
    than the same dtype held strongly, and would compile every step once more.
    (Typed PRNG keys have no weak type, nor a `weak_type` attribute.)"""
    if getattr(x, "weak_type", False):
        return jax.lax.convert_element_type(x, x.dtype)
    return x


@jax.jit
def _fresh(arrays: list) -> list:
    # One compiled call: fresh buffers (jit would hand an unchanged input straight
    # back), so that a donating step cannot delete what the caller still holds, nor
    # be given one buffer twice (tied weights, one array for two hyperparameters).
    return [jnp.array(_strong(x), copy=True) for x in arrays]


def _alive(arrays: tuple, where: str, part: str) -> None:
    """A clear error for arrays that a donating step deleted (read from a
    `TrainState` passed to it), instead of XLA's."""
    if any(
        isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and x.is_deleted()
        for x in arrays
    ):
        raise ValueError(
            f"{where}: the {part} given holds arrays deleted by a donating step: "
            "`make_train_step(..., donate=True)` reuses the buffers of the "
            "TrainState passed to it, and of everything read from it. Copy what you "
            "keep before the step, e.g. `best = jax.tree.map(jnp.copy, ts.model)`."
        )


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


def _scalars_converted(held: PyTree, new: PyTree, name: str) -> tuple[PyTree, list]:
    """`new` with each Python scalar where `held` has a scalar array converted to
    that array's dtype (a new learning rate), when that loses nothing; and the
    scalars that would be truncated (a float for an int32 learning rate)."""
    held_leaves, held_def = jax.tree_util.tree_flatten_with_path(held)
    leaves, treedef = jax.tree.flatten(new)
    if treedef != held_def:
        return new, []
    out, problems = [], []
    for (path, old), leaf in zip(held_leaves, leaves):
        if isinstance(leaf, (bool, int, float)) and eqx.is_array(old) and not old.shape:
            kind, held_kind = np.asarray(leaf).dtype.kind, np.dtype(old.dtype).kind
            # Only a lossless conversion: a float cast to an int32 slot (a
            # learning rate built as `learning_rate=1`) would be truncated.
            if kind == held_kind or (kind in "iu" and held_kind in "iuf"):
                leaf = jnp.asarray(leaf, old.dtype)
            else:
                problems.append(
                    f"{name}{jax.tree_util.keystr(path)}: the held value is "
                    f"{describe(old)}, which cannot hold the {type(leaf).__name__} "
                    f"{leaf!r} (it would be truncated); build the optimiser with a "
                    "value of that kind, e.g. `learning_rate=1.0` rather than "
                    "`learning_rate=1`"
                )
        out.append(leaf)
    return jax.tree.unflatten(treedef, out), problems


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
    return jnp.asarray(step, jnp.int32)


# Each tree a holder keeps, and its two fields: the arrays and the rest.
_FIELDS = {
    "model": ("model_arrays", "model_skeleton"),
    "state": ("state_arrays", "state_skeleton"),
    "opt_state": ("opt_arrays", "opt_skeleton"),
}


class TrainState(eqx.Module):
    """Everything that changes during training: the model, its `State`, the
    optimiser state and the step count, as Flax's `TrainState` holds them. It is a
    PyTree: it can be jitted, vmapped, saved with `eqx.tree_serialise_leaves` and
    restored into a `TrainState` made the same way (same model configuration and
    optimiser); two `TrainState`s made the same way have the same PyTree structure
    (`jax.tree.map` takes both, `eqx.tree_equal` compares them) and share the
    compiled steps.

    Build it with [`TrainState.create`][] (or [`TrainState.from_flax`][] to resume
    a Flax run); read the model back with `train_state.model` and its State with
    `train_state.state`; change any part with [`TrainState.replace`][]. Every read
    of `model`, `state`, `opt_state` or `params` rebuilds the object from the held
    arrays: every read of `state` gives a fresh `eqx.nn.State`, and changing what
    a read returned (`ts.opt_state.hyperparams["learning_rate"] = 0.01`) changes
    nothing in the holder; pass the changed object to `replace` instead.

    !!! Example

        ```python
        import equinox as eqx, jax, optax, eqx_bn
        from eqx_bn.train import TrainState

        model, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3)
        ts = TrainState.create(model, state, optax.sgd(0.1))
        ts.step, ts.model.input_size  # (Array(0, dtype=int32), 3)
        ts = ts.replace(step=10)  # a new TrainState; the old one is unchanged
        ```

    Flax's `TrainState` fields and these: `params` + `batch_stats` -> `model` +
    `state`; `opt_state` -> `opt_state`; `tx` -> `tx` (the `optimizer` given to
    `create`); `step` -> `step`, the number of optimiser updates applied, an int32
    scalar; `apply_fn` -> none (call the model).

    **Internals:** each of the model, its State and the optimiser state is held
    as a tuple of its arrays (`model_arrays`, `state_arrays`, `opt_arrays`, in
    `jax.tree.leaves` order) and, in a static field, a [`Skeleton`][] of the rest
    (`model_skeleton`, `state_skeleton`, `opt_skeleton`). Flattening a
    `TrainState` (which `jax.jit` does on every call) then costs about what
    flattening a Flax `TrainState` costs, where Equinox modules would be flattened
    one by one, three times over with Adam's two moments.
    """

    model_arrays: tuple[Array, ...]
    state_arrays: tuple[Array, ...]
    opt_arrays: tuple[Array, ...]
    step: Int[Array, ""]
    model_skeleton: Skeleton = eqx.field(static=True)
    state_skeleton: Skeleton = eqx.field(static=True)
    opt_skeleton: Skeleton = eqx.field(static=True)
    tx: Any = eqx.field(static=True)

    @classmethod
    def _hold(
        cls,
        parts: dict[str, PyTree],
        step: Any,
        where: str,
        *,
        tx: Any = None,
        like: "TrainState | None" = None,
    ) -> "TrainState":
        """A holder of `parts` (`model`, `state`, `opt_state`: those given replace
        `like`'s), with every array given copied, strongly typed, by one compiled
        call. A skeleton equal to `like`'s is kept as the very object."""
        fields: dict[str, Any] = (
            {"tx": tx}
            if like is None
            else {f.name: getattr(like, f.name) for f in dataclasses.fields(like)}
        )
        held: dict[str, tuple[tuple, Skeleton]] = {}
        for name, tree in parts.items():
            arrays, skeleton = _split(tree)
            _alive(arrays, where, name)
            old = None if like is None else getattr(like, _FIELDS[name][1])
            held[name] = (arrays, old if old == skeleton else skeleton)
        given = [x for arrays, _ in held.values() for x in arrays]
        copies = iter(_fresh(given + ([] if step is None else [step])))
        for name, (arrays, skeleton) in held.items():
            arrays_field, skeleton_field = _FIELDS[name]
            fields[arrays_field] = tuple(next(copies) for _ in arrays)
            fields[skeleton_field] = skeleton
        if step is not None:
            fields["step"] = next(copies)
        return cls(**fields)

    @classmethod
    @typecheck
    def create(
        cls,
        model: PyTree,
        state: eqx.nn.State,
        optimizer: Any,
    ) -> "TrainState":
        """Builds the holder for `model` and its `state`, and initialises `optimizer`
        on the arrays it trains: the model's floating-point arrays, except the
        scales and biases of frozen BatchNorms ([`eqx_bn.trainable`][]), which it
        neither updates nor decays.

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
            `eqx.nn.make_with_state`. Typed PRNG keys in it (`jax.random.key`) are
            held as arrays, as in an optimiser state (`optax.noisy_sgd`).
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
        opt_state = _init_optimizer(optimizer, eqx.filter(model, trainable(model)))
        parts = {"model": model, "state": state, "opt_state": opt_state}
        return cls._hold(
            parts, np.zeros((), np.int32), "TrainState.create", tx=optimizer
        )

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
        its other leaves (`count`, `inject_hyperparams`' hyperparameters, PRNG keys)
        are copied; `step` carries over. A scope that `mapping` leaves out keeps
        the model's values, and gets a fresh optimiser state, as `optimizer.init`
        gives it (Adam's moments at zero).

        Everything is copied: `model`, `state` and `checkpoint` stay usable
        whatever happens to the holder (even with `make_train_step(...,
        donate=True)`).

        !!! Example

            ```python
            checkpoint = eqx_bn.interop.read_checkpoint("ckpts/checkpoint_1000")
            model, state = eqx.nn.make_with_state(ResNet18)(num_classes=10, key=key)
            ts = TrainState.from_flax(model, state, checkpoint, optax.adam(1e-3))
            ```

        **Arguments:**

        - `model`, `state`: the Equinox model and its State (their values are not
            used, only their structure, shapes and dtypes, except in the scopes
            that `mapping` leaves out).
        - `checkpoint`: the Flax `TrainState` as
            [`eqx_bn.interop.read_checkpoint`][] (`read_msgpack`, `read_orbax`) or
            `flax.serialization.to_state_dict` give it: `{"step": ..., "params":
            ..., "batch_stats": ..., "opt_state": ...}`. A typed PRNG key in the
            optimiser state (`optax.noisy_sgd`) is read as `to_state_dict` holds
            it, or as its `jax.random.key_data` (as Orbax stores it).
        - `optimizer`: the optimiser Flax trained with (its `tx`), built the same
            way: the Flax optimiser state must have the structure this one's
            `init` gives. A mask (`adamw(mask=...)`, `optax.masked`) given as a
            pytree must be shaped like the Equinox model; a function of the
            parameters works for both.
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
            conversion rule; or `optimizer.init` failing on the Equinox model's
            parameters (a Flax-shaped mask). Nothing is built then.
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
        parts = {"model": model, "state": state, "opt_state": opt_state}
        return cls._hold(parts, step, "TrainState.from_flax", tx=optimizer)

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
        A typed PRNG key (`optax.noisy_sgd`'s) stays a `jax.Array` of key dtype,
        as in `to_state_dict`: msgpack cannot store one (neither Flax's
        `to_bytes` nor `write_msgpack`); write its `jax.random.key_data`, which
        `from_flax` reads back, or use Orbax.

        **Raises:**

        - `ConversionError`: the model has layers with no conversion rule, or the
            optimiser state has parts not shaped like the parameters (Adafactor's
            factored `v_row`/`v_col`, the masked moments of `optax.masked` and
            `multi_transform`), all named.
        - `ValueError`: this `TrainState` was donated to a step.
        """
        _check_not_donated(self, "TrainState.to_flax")
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
        not compile them again); the model's non-array leaves may change (e.g. a
        layer frozen with `eqx.nn.inference_mode`), which compiles them once more.

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
            every leaf and node that differs), a Python float for an integer leaf,
            a `step` that is not an int32 integer, or this `TrainState` (or a part
            given) was consumed by a donating step.
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
        _check_not_donated(self, "TrainState.replace")
        given = {"model": model, "state": state, "opt_state": opt_state}
        parts = {}
        for name, new in given.items():
            if new is _UNSET:
                continue
            held = getattr(self, name)
            new, problems = _scalars_converted(held, new, name)
            problems += tree_differences(held, new, where=name)
            if problems:
                raise ValueError(
                    f"TrainState.replace: the new {name} does not have the "
                    f"structure, shapes and dtypes of the held one: "
                    f"{'; '.join(problems)}. To train a different model or "
                    "optimiser, build a new holder with `TrainState.create(model, "
                    "state, optimizer)`."
                )
            parts[name] = new
        new_step = None if step is _UNSET else _step(step)
        return self._hold(parts, new_step, "TrainState.replace", like=self)

    @property
    def model(self) -> PyTree:
        """The model: its arrays and the rest recombined."""
        return _join(self.model_arrays, self.model_skeleton)

    @property
    def params(self) -> PyTree:
        """The model's arrays, shaped like the model (`None` for non-arrays)."""
        return eqx.filter(self.model, eqx.is_array)

    @property
    def state(self) -> eqx.nn.State:
        """The model's `eqx.nn.State`, a fresh object on every read."""
        return _join(self.state_arrays, self.state_skeleton)

    @property
    def opt_state(self) -> optax.OptState:
        """The optimiser state, over the arrays the model trains
        ([`eqx_bn.trainable`][])."""
        return _join(self.opt_arrays, self.opt_skeleton)


def _arrays(
    tree: PyTree, held: PyTree, skeleton: Skeleton, name: str, what: str, fix: str
) -> tuple[Array, ...]:
    """`tree`'s arrays, when it is still shaped like the `held` one."""
    arrays, new = _split(tree)
    if new != skeleton:
        raise ValueError(
            f"apply_gradients: {what} changed structure during the step: "
            + "; ".join(tree_differences(held, tree, where=name))
            + f".{fix}"
        )
    return arrays


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
    model, opt_state = train_state.model, train_state.opt_state
    # Frozen scales and biases are no optimiser leaves (see `eqx_bn.trainable`):
    # their zero gradient would still be decayed.
    spec = trainable(model)
    grads = eqx.filter(eqx.filter(grads, eqx.is_inexact_array), spec)
    params = eqx.filter(model, spec)
    # Optax relies on standard promotion (Adam's bias correction mixes float and
    # int32); run it as designed even when the caller's config is strict.
    with jax.numpy_dtype_promotion("standard"):
        updates, new_opt_state = train_state.tx.update(grads, opt_state, params)
    new_model = eqx.apply_updates(model, updates)
    return dataclasses.replace(
        train_state,
        model_arrays=_arrays(
            new_model, model, train_state.model_skeleton, "model", "the model", ""
        ),
        state_arrays=_arrays(
            state,
            train_state.state,
            train_state.state_skeleton,
            "state",
            "the State returned by the loss",
            " Return the State that the model gave back for the State it was given.",
        ),
        opt_arrays=_arrays(
            new_opt_state,
            opt_state,
            train_state.opt_skeleton,
            "opt_state",
            "the optimiser state",
            "",
        ),
        step=train_state.step + 1,
    )


@typecheck
def make_train_step(
    loss_fn: LossFn,
    *,
    donate: bool = False,
    accumulate: int = 1,
    full_batch_statistics: bool = False,
) -> Callable[[TrainState, Any], tuple[TrainState, Array, Any]]:
    """Builds a jitted training step from a loss function.

    `loss_fn(model, state, batch) -> (loss, (state, aux))` is called with the model
    as it is held (in training mode, unless some layers were put in inference mode
    on purpose); its gradient with respect to the model's floating-point arrays
    updates the model through the optimiser (all but the scales and biases of
    BatchNorms frozen by [`eqx_bn.freeze_batch_norms`][]: [`eqx_bn.trainable`][]),
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
        [Training](../training.md#donating-buffers) for what that is worth), and
        everything read from the `TrainState` passed in dies with it: write
        `ts, loss, aux = train_step(ts, batch)`, and copy what you keep
        (`best = jax.tree.map(jnp.copy, ts.model)`). Passing a donated
        `TrainState` again raises a `ValueError` saying so.
    - `accumulate`: split each batch into this many micro-batches (every leaf of
        `batch` along its first axis, which must divide; micro-batch `i` holds
        examples `i, i + accumulate, ...`), run them one after the
        other (the memory of one micro-batch's activations) and apply one
        optimiser update, from the mean of their gradients: the update of
        `optax.MultiSteps(optimizer, every_k_schedule=accumulate)` fed the
        micro-batches one by one. Each BatchNorm updates its running statistics
        once per step, from the statistics of everything it saw over the
        micro-batches (pooled counts, means and squared deviations): for one
        whose input does not go through another BatchNorm, the statistics of
        the whole batch. `loss` is the mean of the micro-batch losses, and `aux`
        is stacked, `(accumulate, ...)`, one per micro-batch. See
        [`accumulated_value_and_grad`][].
    - `full_batch_statistics`: with `accumulate`, normalise every micro-batch
        with the statistics of the whole batch, in every BatchNorm: outputs,
        gradients and running statistics are then the whole batch's (to float32
        rounding), at the cost of more passes over the micro-batches (one per
        level of BatchNorm depth, forward, and as many backward).

    **Returns:**

    `train_step(train_state, batch) -> (train_state, loss, aux)`, jitted (its
    `lower` method compiles ahead of time).

    **Raises:**

    - `TypeError`, `ValueError`: for an `accumulate` that is not a positive int,
        or `full_batch_statistics` without `accumulate`; when the step runs, a
        batch leaf that does not split into `accumulate` equal parts, or, with
        `accumulate`, a training BatchNorm with `renorm=True` or a
        `virtual_batch_size` (their per-batch normalisation has no pooled
        counterpart; frozen ones take part).
    """

    k = check_accumulation(accumulate, full_batch_statistics, "make_train_step")
    checked_loss = _checked(loss_fn, "make_train_step")
    if k == 1:
        grad_fn = eqx.filter_value_and_grad(checked_loss, has_aux=True)
    elif full_batch_statistics:
        grad_fn = exact_value_and_grad(checked_loss, k)
    else:
        grad_fn = pooled_value_and_grad(checked_loss, k)

    def step(ts: TrainState, batch: Any) -> tuple[TrainState, Array, Any]:
        (loss, (state, aux)), grads = grad_fn(ts.model, ts.state, batch)
        return apply_gradients(ts, grads, state), loss, aux

    if not donate:
        return jax.jit(step)
    jitted = jax.jit(step, donate_argnums=(0,))

    return _refusing_donated(jitted, "train_step")


@typecheck
def accumulated_value_and_grad(
    loss_fn: LossFn, *, accumulate: int, full_batch_statistics: bool = False
) -> Callable[
    [PyTree, eqx.nn.State, Any], tuple[tuple[Array, tuple[eqx.nn.State, Any]], PyTree]
]:
    """`eqx.filter_value_and_grad(loss_fn, has_aux=True)` over a batch split into
    micro-batches, with the BatchNorm statistics pooled over them: what
    `make_train_step(loss_fn, accumulate=k)` computes, for a step written by hand
    (with [`apply_gradients`][]).

    The batch is split along the first axis of every leaf into `accumulate` equal
    micro-batches, interleaved (micro-batch `i` holds the examples `i, i + k, i +
    2k, ...`, so that a batch sharded over devices gives micro-batches sharded
    alike), and run one after the other (a `jax.lax.scan`: the memory of one
    micro-batch). The gradient is the mean of the micro-batch gradients, as
    `optax.MultiSteps` accumulates it (in float32). Every `eqx_bn.BatchNorm`
    updates its running statistics once, from the moments of all it saw over the
    micro-batches (counts, means and squared deviations merged as Chan et al.:
    not one update per micro-batch, not an average of variances); for a
    `momentum=None` layer, that is one batch counted. For a BatchNorm whose input
    does not go through another BatchNorm, these are the statistics of the whole
    batch. Deeper ones see inputs normalised with each micro-batch's own
    statistics, as do the outputs and the gradients, unless
    `full_batch_statistics=True`: then every BatchNorm normalises every
    micro-batch with the statistics of the whole batch, and the loss, outputs,
    gradients (through those statistics) and running statistics equal the whole
    batch's, to float32 rounding. That takes one forward pass over the
    micro-batches per level of BatchNorm depth to find the statistics (plus one),
    and as many backward passes to carry their gradients back (the adjoint
    method); other stateful layers in the State see each micro-batch once, in the
    last pass. The function is not differentiable again.

    !!! Example

        ```python
        from eqx_bn.train import accumulated_value_and_grad, apply_gradients

        grad_fn = accumulated_value_and_grad(loss_fn, accumulate=4)

        @jax.jit
        def my_step(ts, batch):  # `loss_fn` as in `make_train_step`'s example
            (loss, (state, aux)), grads = grad_fn(ts.model, ts.state, batch)
            return apply_gradients(ts, grads, state), loss

        ts, loss = my_step(ts, (x, x + 1.0))  # 8 examples: 4 micro-batches of 2
        ```

    **Arguments:**

    - `loss_fn`: `loss_fn(model, state, batch) -> (loss, (state, aux))`, as for
        [`make_train_step`][], called on each micro-batch; its loss should be a
        mean over the micro-batch, for the result to be the whole batch's.
    - `accumulate`: the number of micro-batches.
    - `full_batch_statistics`: normalise with the whole batch's statistics.

    **Returns:**

    `value_and_grad(model, state, batch) -> ((loss, (state, aux)), grads)`:
    `loss` the mean of the micro-batch losses, `state` with the running
    statistics updated once, `aux` stacked over the micro-batches (leading axis
    `accumulate`; `jnp.swapaxes(aux, 0, 1).reshape(n, ...)` puts per-example
    outputs back in the batch's order), `grads` shaped like the model (`None`
    for non-float leaves).

    **Raises:**

    - `TypeError`, `ValueError`: as `make_train_step` for its `accumulate` and
        `full_batch_statistics`; when called, a `ValueError` for a training
        BatchNorm with `renorm=True` or a `virtual_batch_size`.
    """
    where = "accumulated_value_and_grad"
    k = check_accumulation(accumulate, full_batch_statistics, where)
    checked_loss = _checked(loss_fn, where)
    if full_batch_statistics:
        return exact_value_and_grad(checked_loss, k)
    return pooled_value_and_grad(checked_loss, k)


def _checked(loss_fn: LossFn, where: str) -> LossFn:
    """`loss_fn`, with a clear error when it does not return `(loss, (state,
    aux))`."""

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
                f"{where}: loss_fn(model, state, batch) must return "
                "(loss, (state, aux)) with state an eqx.nn.State, got "
                f"{_shape_of(out)}. Return the State that the model gave back, and "
                "None as aux when there is nothing else: "
                "`return loss, (state, None)`."
            )
        return out

    return checked_loss


def _check_not_donated(ts: Any, where: str) -> None:
    """A clear error for a `TrainState` given to a donating step earlier."""
    # XLA's own error for a deleted buffer does not say where it came from. A step
    # donates all the holder's buffers, and `replace` copies each part it is given
    # whole, sharing the others: the step and the first array of each part tell
    # for all (a holder made by `replace` from a donated one is refused there).
    # It runs before `replace` and `to_flax`, and after a jitted call failed
    # (`_refusing_donated`): the fields are read through `vars` (an Equinox
    # module's attribute access costs about a microsecond each).
    if not isinstance(ts, TrainState):
        return
    fields = vars(ts)
    firsts = [fields["step"]]
    for name in ("model_arrays", "state_arrays", "opt_arrays"):
        firsts += fields[name][:1]
    for x in firsts:
        try:
            deleted = x.is_deleted()
        except (AttributeError, jax.errors.ConcretizationTypeError):
            deleted = False  # a NumPy array; a tracer (a step called under jit)
        if deleted:
            raise ValueError(
                f"{where}: this TrainState was donated to an earlier step (made "
                "with `make_train_step(..., donate=True)`), which reused its "
                "buffers, or shares them with one that was (`replace` keeps the "
                "parts it is not given). Pass the TrainState that step returned "
                "(`ts, loss, aux = train_step(ts, batch)`), or build the step "
                "without `donate=True` to keep old ones usable."
            )


def _refusing_donated(jitted: Callable, where: str, argnum: int = 0) -> Callable:
    """`jitted`, with XLA's error for a `TrainState` (argument `argnum`) that a
    donating step consumed replaced by `_check_not_donated`'s.

    XLA refuses a deleted buffer before it runs, and donates nothing of a call it
    refuses: the holder is looked at only then, not before every call (about a
    microsecond, of the seed MLP's 30 per step). `.lower` is `jitted`'s.
    """

    def call(*args: Any) -> Any:
        try:
            return jitted(*args)
        except (RuntimeError, ValueError) as error:
            failure = error
        _check_not_donated(args[argnum], where)  # the clear error, where it applies
        raise failure

    call.lower = jitted.lower  # type: ignore[attr-defined]
    return call


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

    return _refusing_donated(jitted, "eval_step")


# ---------------------------------------------------------------- weight averaging


class Averaged(eqx.Module):
    """A running average of the models (and States) a training run went through,
    kept beside its [`TrainState`][]: what [`ema`][] and [`swa`][] make and update.

    It is a PyTree, held as a `TrainState` holds its trees: the arrays in tuples,
    the rest in static [`Skeleton`][]s; save it with `eqx.tree_serialise_leaves`.
    Read the averaged model and its State with `avg.model` and `avg.state`, and
    evaluate them as any other, e.g. `eval_step(ts.replace(model=avg.model,
    state=avg.state), batch)`.

    **Fields:**

    - `model_arrays`, `state_arrays`: the averaged arrays of the model and of its
        State, in `jax.tree.leaves` order.
    - `count`: how many models were averaged, an int32 scalar (PyTorch's
        `AveragedModel.n_averaged`).
    - `model_skeleton`, `state_skeleton` (static): the rest of the model and State.

    **Properties:** `model` and `state`, rebuilt from the arrays on every read.
    """

    model_arrays: tuple[Array, ...]
    state_arrays: tuple[Array, ...]
    count: Int[Array, ""]
    model_skeleton: Skeleton = eqx.field(static=True)
    state_skeleton: Skeleton = eqx.field(static=True)

    @property
    def model(self) -> PyTree:
        """The averaged model."""
        return _join(self.model_arrays, self.model_skeleton)

    @property
    def state(self) -> eqx.nn.State:
        """Its `eqx.nn.State`: the averaged running statistics, or the latest
        model's (`average_state=False`), a fresh object on every read."""
        return _join(self.state_arrays, self.state_skeleton)


class WeightAveraging(NamedTuple):
    """A weight average as a pair of functions, in the manner of Optax's
    `GradientTransformation`: made by [`ema`][] or [`swa`][].

    - `init(train_state) -> Averaged`: an average holding a copy of the model and
        State of `train_state`, `count` 0 (the first `update` replaces them).
    - `update(averaged, train_state) -> Averaged`: the average with the model (and
        State) that `train_state` holds now folded in. Jitted: it compiles once for
        a run, and every array it returns is its own, so a train step that
        donates the `TrainState` leaves the average intact. (To update in place,
        `jax.jit(averaging.update, donate_argnums=0)`.)
    """

    init: Callable[[TrainState], Averaged]
    update: Callable[[Averaged, TrainState], Averaged]


def _latest_only(state: eqx.nn.State) -> tuple[bool, ...]:
    """For each array of `state` (in `_split`'s order), whether an average keeps the
    latest model's value instead of averaging it: Batch Renormalization's clipping
    bounds ([`RenormClipping`][eqx_bn.RenormClipping]), which are settings (a
    schedule's current values), not statistics; averaged, an infinite bound (no
    bound) would turn into `inf - inf = NaN`."""
    is_clipping = lambda v: isinstance(v, RenormClipping)  # noqa: E731
    flags = [
        flag
        for node in jax.tree.leaves(state, is_leaf=is_clipping)
        for flag in [is_clipping(node)] * len(jax.tree.leaves(node))
    ]
    leaves = jax.tree.leaves(state)
    return tuple(flag for flag, leaf in zip(flags, leaves) if eqx.is_array(leaf))


def _averaging(
    fold: Callable[[Array, Array, Array], Array], average_state: bool, where: str
) -> WeightAveraging:
    """`init` and `update` for the rule `fold(average, new, count)` on each
    floating-point array."""

    @typecheck
    def init(train_state: TrainState) -> Averaged:
        ts = train_state
        _check_not_donated(ts, f"{where}.init")
        arrays = _fresh(list(ts.model_arrays) + list(ts.state_arrays))
        n = len(ts.model_arrays)
        return Averaged(
            model_arrays=tuple(arrays[:n]),
            state_arrays=tuple(arrays[n:]),
            count=jnp.zeros((), jnp.int32),
            model_skeleton=ts.model_skeleton,
            state_skeleton=ts.state_skeleton,
        )

    def folded(old: Array, new: Array, count: Array) -> Array:
        # Counts and keys are not averaged: PyTorch averages an integer buffer in
        # float and truncates it (with decay 0.99 its `num_batches_tracked` stays
        # 1 for ever), a count of nothing. The latest model's is kept instead.
        if not jnp.issubdtype(new.dtype, jnp.inexact):
            return jnp.array(new, copy=True)
        # The first model is copied, as `AveragedModel` does, whatever the rule.
        return jnp.where(count == 0, new, fold(old, new, count))

    def update(averaged: Averaged, train_state: TrainState) -> Averaged:
        avg, ts = averaged, train_state
        if not isinstance(avg, Averaged) or not isinstance(ts, TrainState):
            raise TypeError(
                f"{where}.update(averaged, train_state): expected an Averaged (from "
                f"`init`) and a TrainState, got {type(avg).__name__} and "
                f"{type(ts).__name__}."
            )
        for part in ("model", "state"):
            skeleton = getattr(ts, f"{part}_skeleton")
            if getattr(avg, f"{part}_skeleton") != skeleton:
                differences = tree_differences(
                    getattr(avg, part), getattr(ts, part), where=part
                )
                raise ValueError(
                    f"{where}.update: the TrainState's {part} is not shaped like the "
                    f"averaged one: {'; '.join(differences)}. Average the models of "
                    f"one run: make the average with `init` from the TrainState it "
                    "then follows."
                )
        models = tuple(
            folded(a, b, avg.count) for a, b in zip(avg.model_arrays, ts.model_arrays)
        )
        if average_state:
            states = tuple(
                jnp.array(b, copy=True) if latest else folded(a, b, avg.count)
                for a, b, latest in zip(
                    avg.state_arrays, ts.state_arrays, _latest_only(ts.state)
                )
            )
        else:
            states = tuple(jnp.array(b, copy=True) for b in ts.state_arrays)
        return dataclasses.replace(
            avg, model_arrays=models, state_arrays=states, count=avg.count + 1
        )

    jitted = jax.jit(update)

    return WeightAveraging(init, _refusing_donated(jitted, f"{where}.update", 1))


@typecheck
def ema(decay: float, *, average_state: bool = True) -> WeightAveraging:
    r"""An exponential moving average of the weights: PyTorch's
    `AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
    use_buffers=True)`.

    Each `update` moves every floating-point array of the average towards the
    model's, $a \leftarrow a + (1 - d)(w - a)$, with $1 - d$ rounded to the
    array's dtype first: PyTorch's `lerp`, so that in float32 the average is
    PyTorch's to the bit. The first `update` copies the model (the average starts
    at the weights after the first step, as in PyTorch, not at those `init` saw).
    Integer arrays (a `momentum=None` BatchNorm's batch count) and Batch
    Renormalization's clipping bounds (settings, not statistics) are the latest
    model's.

    !!! Example

        ```python
        from eqx_bn.train import ema

        averaging = ema(0.999)
        avg = averaging.init(ts)
        for batch in batches:
            ts, loss, _ = train_step(ts, batch)
            avg = averaging.update(avg, ts)
        eval_step(ts.replace(model=avg.model, state=avg.state), batch)
        ```

    **Arguments:**

    - `decay`: in $[0, 1]$, the weight of the average at each update (0.999 for
        an average over about the last 1000 steps).
    - `average_state`: average the model's State (the BatchNorm running
        statistics) like its weights, PyTorch's `use_buffers=True` (the default
        here); `False` to keep the latest model's, to recompute with
        [`eqx_bn.recalibrate`][] (`use_buffers=False`).

    **Returns:**

    A [`WeightAveraging`][]: `init(train_state)` and `update(averaged,
    train_state)`.

    **Raises:**

    - `ValueError`: for a `decay` outside $[0, 1]$.
    """
    if not 0.0 <= decay <= 1.0:  # NaN fails both comparisons
        raise ValueError(
            f"ema: decay must be in [0, 1], got {decay}: the weight of the average "
            "at each update, e.g. 0.999 for about the last 1000 steps."
        )
    weight = 1.0 - float(decay)

    def fold(average: Array, new: Array, count: Array) -> Array:
        w = jnp.asarray(weight, average.dtype)
        return average + w * (new - average)

    return _averaging(fold, average_state, "ema")


@typecheck
def swa(*, average_state: bool = False) -> WeightAveraging:
    r"""Stochastic weight averaging: the plain mean of the models passed to
    `update`, PyTorch's `AveragedModel(model)`.

    The `n`-th update folds in $a \leftarrow a + (w - a) / n$ (PyTorch's CPU
    formula), the first one copies. Update it after each step (or epoch) of the
    part of training to average, typically the last epochs at a constant or
    cyclic learning rate; then recompute the BatchNorm statistics of the
    averaged weights with [`eqx_bn.recalibrate`][] (PyTorch's `update_bn`).

    !!! Example

        ```python
        from eqx_bn.train import swa

        averaging = swa()
        avg = averaging.init(ts)
        for batch in batches:
            ts, loss, _ = train_step(ts, batch)
            avg = averaging.update(avg, ts)
        state = eqx_bn.recalibrate(avg.model, avg.state, [x for x, _ in batches])
        ```

    **Arguments:**

    - `average_state`: also average the State like the weights; by default (as
        PyTorch's `use_buffers=False`) the average holds the latest model's
        State, whose statistics belong to other weights: recalibrate it.

    **Returns:**

    A [`WeightAveraging`][]: `init(train_state)` and `update(averaged,
    train_state)`.
    """

    def fold(average: Array, new: Array, count: Array) -> Array:
        return average + (new - average) / (count + 1).astype(average.dtype)

    return _averaging(fold, average_state, "swa")

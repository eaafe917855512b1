"""A Flax `TrainState`'s optimiser state <-> the same optimiser's state over an
Equinox model: the mapping behind `TrainState.from_flax` and `TrainState.to_flax`.

A saved Flax `TrainState` holds `step`, `params`, `batch_stats` and `opt_state` as
nested dicts (`flax.serialization.to_state_dict`): NamedTuples become dicts of their
fields, tuples `{"0": ..., "1": ...}`. The Equinox optimiser state has the same
shape with Equinox containers, and its parameter-shaped subtrees (`trace`, `mu`,
`nu`, `acc_grads`, ...) are shaped like the model, not like Flax's `params`.

Both sides are walked in parallel, the Equinox side (`optimizer.init` of the model)
giving the structure. A parameter-shaped subtree is converted by the public
`load_flax`/`export_flax`, exactly as `params` is, so the pairing (and `mapping=`)
is the same; every other leaf (`count`, hyperparameters, PRNG keys) is copied with
its shape and dtype checked (`tree_differences`, as `TrainState.replace` checks).
A scope that `mapping` leaves out gets `optimizer.init`'s fresh state. All problems
end up in one `ConversionError`.
"""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._describe import describe, tree_differences
from .engine import ConversionError
from .flax import export_flax, load_flax

TRAIN_STATE_KEYS = ("step", "params", "batch_stats", "opt_state")
"""The entries of a saved Flax `TrainState` (with a `batch_stats` field)."""


def _is_named_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


class _Problems:
    """The problems found so far, in `ConversionError`'s sections."""

    def __init__(self):
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []
        self.extra: list[str] = []
        self.unsupported: list[str] = []
        self.dtypes = False  # some dtype differs: say what to do once, at the end

    def absorb(self, error: ConversionError, prefix: str | None = None) -> None:
        """The problems of a `load_flax` call, with its `params/` renamed `prefix/`."""

        def renamed(items: tuple[str, ...]) -> list[str]:
            if prefix is None:
                return list(items)
            # An optimiser subtree is loaded with the checkpoint's `batch_stats`
            # to complete the pairing; their problems are reported once, by the
            # load of `params` and `batch_stats` itself.
            return [
                prefix + item[len("params") :]
                for item in items
                if not item.startswith("batch_stats/")
            ]

        self.missing += renamed(error.missing)
        self.unexpected += renamed(error.unexpected)
        self.mismatched += renamed(error.mismatched)
        self.dtypes |= error.castable
        self.extra += error.extra
        # A layer with no rule is reported once, not once per optimiser subtree.
        self.unsupported += [u for u in error.unsupported if u not in self.unsupported]

    def __bool__(self) -> bool:
        return bool(
            self.missing
            or self.unexpected
            or self.mismatched
            or self.extra
            or self.unsupported
        )

    def error(self, name: str) -> ConversionError:
        sections = [
            (
                "Missing from the Flax TrainState (the model or optimiser needs them)",
                self.missing,
            ),
            (
                "Unexpected in the Flax TrainState (nothing here pairs with them)",
                self.unexpected,
            ),
            ("Mismatched shape, dtype or kind", self.mismatched),
            ("Layers and optimiser states with no conversion rule", self.unsupported),
        ]
        count = sum(len(items) for _, items in sections) + len(self.extra)
        lines = [
            f"Cannot load the Flax TrainState into {name} and its optimiser state:",
            f"{count} problem{'s' if count != 1 else ''}.",
        ]
        for title, items in sections:
            if items:
                lines.append(f"{title}:")
                lines += [f"  {item}" for item in items]
        if self.extra:
            lines.append(
                "Entries other than step/params/batch_stats/opt_state (fields of a "
                f"TrainState subclass?): {', '.join(self.extra)}; pass "
                "ignore_extra=True to skip them."
            )
        if self.dtypes:
            lines.append(
                "TrainState.from_flax does not convert dtypes (it has no `cast=`): "
                "build the model in the checkpoint's dtypes (its optimiser state "
                "follows), or convert the checkpoint's arrays of the wrong dtype to "
                "the model's before passing it (`a.astype(np.float32)`)."
            )
        lines.append(
            "Pass the optimiser the Flax TrainState was trained with (its `tx`), "
            "built the same way (same chain, same hyperparameters as arrays or not); "
            "see the parameter pairing with `eqx_bn.interop.flax_paths(model)` and "
            "change it with `mapping=`."
        )
        return ConversionError(
            "\n".join(lines),
            missing=tuple(self.missing),
            unexpected=tuple(self.unexpected),
            mismatched=tuple(self.mismatched),
            extra=tuple(self.extra),
            unsupported=tuple(self.unsupported),
        )


class _Loader:
    """Walks an Equinox optimiser state (the template) and a Flax one in parallel."""

    def __init__(self, model, state, mapping, batch_stats, problems):
        self.state = state
        self.mapping = mapping
        self.batch_stats = batch_stats
        self.problems = problems
        trainable, self.rest = eqx.partition(model, _is_trainable)
        self.param_def = jax.tree.structure(trainable)
        self.param_shapes = _shapes(trainable)

    def is_param_shaped(self, template: Any) -> bool:
        return _laid_out_like(template, self.param_def, self.param_shapes)

    def params(self, template: Any, node: Any, path: str) -> Any:
        """A model-shaped subtree (`mu`, `trace`...) from Flax's params layout."""
        if not isinstance(node, Mapping):
            self.problems.mismatched.append(
                f"{path}: expected parameters shaped like `params`, got "
                f"{describe(node)}"
            )
            return template
        # The model with the optimiser's arrays in place of its parameters: its
        # shapes and dtypes (which may differ from the parameters', e.g. Adam's
        # `mu_dtype`) are then what `load_flax` checks.
        like = eqx.combine(template, self.rest)
        variables = {"params": node}
        if self.batch_stats is not None:  # already checked; completes the pairing
            variables["batch_stats"] = self.batch_stats
        try:
            loaded, _ = load_flax(like, self.state, variables, mapping=self.mapping)
        except ConversionError as e:
            self.problems.absorb(e, prefix=path)
            return template
        # A scope that `mapping` leaves out keeps the template's placeholder, filled
        # by `_fill_left_out` with `optimizer.init`'s values.
        return eqx.filter(loaded, _is_value_or_placeholder)

    def walk(self, template: Any, node: Any, path: str) -> Any:
        if self.is_param_shaped(template):
            return self.params(template, node, path)
        if jax.tree.structure(template) == self.param_def and not isinstance(
            template, jax.ShapeDtypeStruct
        ):
            self.problems.unsupported.append(_factored(path))
            return template
        if template is None:
            if node is None or (isinstance(node, Mapping) and not node):
                return None
            self.problems.unexpected.append(f"{path}: {describe(node)}")
            return None
        if _is_named_tuple(template):
            keys = list(template._fields)
            children = [getattr(template, k) for k in keys]
            return type(template)(*self.children(children, keys, node, path))
        if isinstance(template, (tuple, list)):
            keys = [str(i) for i in range(len(template))]
            if isinstance(node, (tuple, list)):  # as Orbax may give them
                node = {str(i): v for i, v in enumerate(node)}
            return type(template)(self.children(list(template), keys, node, path))
        if isinstance(template, dict):
            keys = [str(k) for k in template]
            out = self.children(list(template.values()), keys, node, path)
            return dict(zip(template, out))
        if isinstance(template, jax.ShapeDtypeStruct):
            return self.leaf(template, node, path)
        self.problems.unsupported.append(_not_mapped(path, template))
        return template

    def children(self, templates, keys, node, path) -> list:
        if node is None and not keys:  # Orbax stores an `EmptyState()` as None
            return []
        if not isinstance(node, Mapping):
            fields = ", ".join(keys) if keys else "nothing"
            self.problems.mismatched.append(
                f"{path}: expected a dict of {fields}, got {describe(node)}"
            )
            return templates
        out = []
        for key, template in zip(keys, templates):
            where = f"{path}/{key}"
            if key not in node:
                kind = "parameters" if self.is_param_shaped(template) else None
                want = kind or _expected(template)
                self.problems.missing.append(f"{where}: expected {want}")
                out.append(template)
            else:
                out.append(self.walk(template, node[key], where))
        for key in node:
            if key not in keys:
                self.problems.unexpected.append(f"{path}/{key}: {describe(node[key])}")
        return out

    def leaf(self, template: jax.ShapeDtypeStruct, node: Any, path: str) -> Any:
        """A non-parameter leaf (a count, a hyperparameter, a PRNG key): same shape
        and dtype.

        Python scalars (as Orbax restores scalars saved as such) are accepted for a
        scalar of the same kind.
        """
        if jax.dtypes.issubdtype(template.dtype, jax.dtypes.prng_key):
            return self.key(template, node, path)
        dtype = np.dtype(template.dtype)
        if isinstance(node, (bool, int, float, np.generic)) and template.shape == ():
            # By dtype kind, not by `type(node)`: NumPy scalars (`np.float64` is
            # even a float subclass) come as they are saved.
            kind = np.asarray(node).dtype.kind
            if kind == dtype.kind or (kind in "iu" and dtype.kind in "iu"):
                return jnp.asarray(node, dtype)
        try:
            value = np.asarray(node)
        except Exception:
            value = None
        if value is None or value.dtype == object:
            self.problems.mismatched.append(
                f"{path}: expected {describe(template)}, got {describe(node)}"
            )
            return template
        differences = tree_differences(template, value, where=path)
        if differences:
            self.problems.mismatched += differences
            return template
        return jnp.asarray(value)

    def key(self, template: jax.ShapeDtypeStruct, node: Any, path: str) -> Any:
        """A typed PRNG key (`optax.noisy_sgd`'s): as Flax's `to_state_dict` holds
        it, a key array of the same implementation, or as its `key_data` (unsigned
        integers with a trailing axis, as Orbax stores it)."""
        if isinstance(node, jax.Array) and not tree_differences(template, node):
            return node
        data = jax.eval_shape(jax.random.key_data, template)
        try:
            value = np.asarray(node)
        except (TypeError, ValueError):  # e.g. a key of another implementation
            value = None
        if value is not None and not tree_differences(data, value):
            # The implementation, read off a key of the template's dtype.
            impl = jax.random.key_impl(jnp.zeros((), template.dtype))
            return jax.random.wrap_key_data(value, impl=impl)
        self.problems.mismatched.append(
            f"{path}: expected {describe(template)} (a PRNG key, or its key data "
            f"{describe(data)}), got {describe(node)}"
        )
        return template


def _is_trainable(x: Any) -> bool:
    """What the optimiser updates: floating-point arrays, or their shapes and
    dtypes in a model built abstractly (`eqx.filter_eval_shape`)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jnp.issubdtype(x.dtype, jnp.inexact)
    return eqx.is_inexact_array(x)


def _is_value_or_placeholder(x: Any) -> bool:
    return eqx.is_inexact_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _not_mapped(path: str, node: Any) -> str:
    return (
        f"{path}: an optimiser state node of type {type(node).__name__} (masked or "
        "custom optimiser states are not mapped)"
    )


def _shapes(tree: Any) -> list[tuple[int, ...]]:
    return [tuple(x.shape) for x in jax.tree.leaves(tree)]


def _laid_out_like(tree: Any, param_def: Any, param_shapes: list) -> bool:
    """Whether `tree` holds one array per parameter, each of the parameter's shape
    (SGD's `trace`, Adam's `mu`): then it converts to Flax's layout as the
    parameters do. The tree structure alone is not enough: Adafactor's `v_row` and
    `v_col` have it, but hold per-row and per-column statistics that a layout
    change (a transposed kernel) must not be applied to, and that, for a square
    kernel, have the very shapes a transposition would expect."""
    return jax.tree.structure(tree) == param_def and _shapes(tree) == param_shapes


def _factored(path: str) -> str:
    return (
        f"{path}: one array per parameter, but not of the parameters' shapes (e.g. "
        "Adafactor's factored v_row/v_col): there is no rule to convert it between "
        "the two layouts; resume with an optimiser whose state is shaped like the "
        "parameters (SGD, Adam...)"
    )


def _expected(template: Any) -> str:
    if isinstance(template, jax.ShapeDtypeStruct):
        return describe(template)
    return f"the optimiser's {type(template).__name__}"


def _step(value: Any, problems: _Problems) -> Any:
    # Any integer scalar: a Python int, a NumPy one, or the jax.Array that Flax's
    # `apply_gradients` leaves in `step` (as `to_state_dict` hands it over).
    # A bool is an int to Python but never a step count.
    if not isinstance(value, (bool, np.bool_)):
        try:
            arr = np.asarray(value)
        except Exception:
            arr = None
        if arr is not None and arr.shape == () and arr.dtype.kind in "iu":
            return jnp.asarray(arr, jnp.int32)
    problems.mismatched.append(f"step: expected an integer, got {describe(value)}")
    return jnp.zeros((), jnp.int32)


def _template(optimizer: Any, trainable: Any, model: eqx.Module) -> Any:
    """The shapes and dtypes of `optimizer.init` of the Equinox parameters."""
    try:
        return eqx.filter_eval_shape(optimizer.init, trainable)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            "TrainState.from_flax: `optimizer.init` fails on the parameters of the "
            f"Equinox model ({type(model).__name__}): {first}. An optimiser built "
            "with a pytree of the parameters (a mask: `optax.adamw(mask=...)`, "
            "`optax.masked`; labels: `optax.multi_transform`) needs it shaped like "
            "the Equinox model, not like Flax's `params` dict: build it from the "
            "model (e.g. `jax.tree.map(lambda x: x.ndim > 1, eqx.filter(model, "
            "eqx.is_inexact_array))`), or pass a function of the parameters "
            "(`mask=lambda params: jax.tree.map(lambda x: x.ndim > 1, params)`), "
            "which works with both."
        ) from e


def _fill_left_out(opt_state: Any, optimizer: Any, model: eqx.Module) -> Any:
    """`opt_state` with `optimizer.init`'s values where the walk left a placeholder:
    the scopes that `mapping` leaves out start afresh, as they would in `create`."""
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(opt_state)):
        return opt_state
    fresh = eqx.filter_jit(optimizer.init)(eqx.filter(model, eqx.is_inexact_array))
    return jax.tree.map(
        lambda got, new: new if isinstance(got, jax.ShapeDtypeStruct) else got,
        opt_state,
        fresh,
    )


def _abstract(tree: Any, name: str) -> list[str]:
    """The leaves of `tree` with no value (`eqx.filter_eval_shape`'s)."""
    return [
        f"{name}{jax.tree_util.keystr(path)}: expected {describe(x)}, left out by "
        "`mapping` and abstract in the model given (built by `eqx.filter_eval_shape`); "
        "pass a model built with values, or map the scope"
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if isinstance(x, jax.ShapeDtypeStruct)
    ]


def load(
    model: eqx.Module,
    state: eqx.nn.State,
    checkpoint: Mapping,
    optimizer: Any,
    *,
    mapping: Any,
    ignore_extra: bool,
) -> tuple[eqx.Module, eqx.nn.State, Any, Any]:
    """The model, State, optimiser state and step held by a saved Flax TrainState.

    Raises one `ConversionError` listing every problem; nothing is returned then.
    """
    if "opt_state" not in checkpoint or "params" not in checkpoint:
        raise ConversionError(
            "The checkpoint is not a saved Flax TrainState: it has "
            f"{sorted(map(str, checkpoint)) or 'no entries'}, not params, opt_state "
            "and step. For Flax variables alone use "
            "`model, state = eqx_bn.interop.load_flax(model, state, variables)` and "
            "`TrainState.create(model, state, optimizer)`.",
            missing=tuple(k for k in ("params", "opt_state") if k not in checkpoint),
        )
    template = _template(optimizer, eqx.filter(model, _is_trainable), model)
    problems = _Problems()
    if not ignore_extra:
        problems.extra += [str(k) for k in checkpoint if k not in TRAIN_STATE_KEYS]
    variables = {k: checkpoint[k] for k in ("params", "batch_stats") if k in checkpoint}
    loaded_model, loaded_state = model, state
    try:
        loaded_model, loaded_state = load_flax(model, state, variables, mapping=mapping)
    except ConversionError as e:
        problems.absorb(e)
    if problems.unsupported:  # every subtree would fail the same way
        raise problems.error(type(model).__name__)

    # The checkpoint's running statistics complete the pairing of each optimiser
    # subtree (`load_flax` pairs whole models); their problems are reported once.
    batch_stats = checkpoint.get("batch_stats")
    loader = _Loader(model, state, mapping, batch_stats, problems)
    opt_state = loader.walk(template, checkpoint["opt_state"], "opt_state")
    step = _step(checkpoint.get("step", 0), problems)
    if not problems:
        problems.missing += _abstract(loaded_model, "model")
        problems.missing += _abstract(loaded_state, "state")
    if problems:
        raise problems.error(type(model).__name__)
    opt_state = _fill_left_out(opt_state, optimizer, loaded_model)
    # What the walk built is what `init` builds: were it not, optax would fail
    # inside the first step, far from here.
    problems.mismatched += tree_differences(template, opt_state, where="opt_state")
    if problems:
        raise problems.error(type(model).__name__)
    return loaded_model, loaded_state, opt_state, step


def export(
    model: eqx.Module, state: eqx.nn.State, opt_state: Any, step: Any, *, mapping: Any
) -> dict[str, Any]:
    """A Flax TrainState's state dict: `step`, `params`, `batch_stats`, `opt_state`.

    Typed PRNG keys stay key arrays, as `flax.serialization.to_state_dict` keeps
    them (`from_state_dict` then restores them as they were).
    """
    variables = export_flax(model, state, mapping=mapping)
    trainable, rest = eqx.partition(model, eqx.is_inexact_array)
    param_def, param_shapes = jax.tree.structure(trainable), _shapes(trainable)
    unsupported: list[str] = []

    def walk(node: Any, path: str) -> Any:
        if _laid_out_like(node, param_def, param_shapes):
            return export_flax(eqx.combine(node, rest), state, mapping=mapping)[
                "params"
            ]
        if jax.tree.structure(node) == param_def and not eqx.is_array(node):
            unsupported.append(_factored(path))
            return None
        if node is None:
            return None
        if _is_named_tuple(node):
            return {k: walk(getattr(node, k), f"{path}/{k}") for k in node._fields}
        if isinstance(node, (tuple, list)):
            return {str(i): walk(v, f"{path}/{i}") for i, v in enumerate(node)}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}/{k}") for k, v in node.items()}
        if eqx.is_array(node):
            if jax.dtypes.issubdtype(node.dtype, jax.dtypes.prng_key):
                return node  # NumPy has no key dtype
            return np.asarray(node)
        unsupported.append(_not_mapped(path, node))
        return None

    flax_opt_state = walk(opt_state, "opt_state")
    if unsupported:
        raise ConversionError(
            "TrainState.to_flax: cannot write the optimiser state in Flax's layout:\n"
            + "\n".join(f"  {item}" for item in unsupported)
            + "\nResume with an optimiser whose state is shaped like the parameters "
            "(SGD, Adam...), or save in Equinox's format "
            "(`eqx.tree_serialise_leaves`).",
            unsupported=tuple(unsupported),
        )
    return {"step": np.asarray(step), **variables, "opt_state": flax_opt_state}

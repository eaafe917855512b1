"""PyTorch `state_dict` names <-> an Equinox model and its State.

PyTorch names a variable by the attribute path of its module, joined with dots:
`layer1.0.bn1.running_var`, `downsample.0.weight`, `fc.bias`. The `TORCH` scheme
pairs these with the model's fields by name (list and tuple items by index, an
`eqx.nn.Sequential`'s layers by index directly, as `nn.Sequential`'s), and its
rules say what each layer kind holds in PyTorch:

- `nn.Conv*d` <-> `eqx.nn.Conv*`: the weight is `(out, in / groups, *kernel)` on
  both sides; the bias `(out,)` is `(out, 1, ..., 1)` in Equinox;
- `nn.Conv*d` <-> `eqx_bn.models.ChannelsLastConv` (the convolutions of
  `eqx_bn.models`): the weight is transposed to the kernel `(*kernel, in / groups,
  out)`; the bias is `(out,)` on both sides;
- `nn.Linear` <-> `eqx.nn.Linear`: identical (`(out, in)`, `(out,)`);
- `nn.BatchNorm*d` <-> `eqx_bn.BatchNorm`: `weight`/`bias` <-> `scale`/`bias`,
  `running_mean`/`running_var` <-> the State; `num_batches_tracked` is accepted on
  load and written back on export;
- `nn.LayerNorm`, `nn.GroupNorm`, `nn.RMSNorm`, `nn.Embedding`: `weight`/`bias`;
- a plain array field of a custom module <-> an `nn.Parameter` of that name.

The scheme (`schemes.TORCH`) holds these rules; the engine (`engine.load_pairs` /
`export_pairs`), shared with Flax, pairs, checks and builds: the same strictness and
the one `ConversionError` listing every problem.
"""

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import ml_dtypes
import numpy as np
from jaxtyping import ArrayLike

from .._describe import describe
from .._typing import typecheck
from .engine import (
    ConversionError,
    NameMapping,
    Pairing,
    export_pairs,
    load_pairs,
    pair,
    paths_of,
)
from .schemes import NUM_BATCHES_TRACKED, TORCH


def _batch_norm_scopes(pairing: Pairing) -> list[tuple[str, ...]]:
    """The scopes of the model's BatchNorms (they hold `num_batches_tracked`)."""
    return [e.path[:-1] for e in pairing.entries if e.state_field == "var"]


def _counted_scopes(pairing: Pairing) -> set[tuple[str, ...]]:
    """The scopes of the `momentum=None` BatchNorms, whose State holds the count."""
    return {e.path[:-1] for e in pairing.entries if e.state_field == "num_batches"}


_INT32_MAX = int(np.iinfo(np.int32).max)


def _loaded_count(value: Any, name: str) -> Any:
    """A state_dict's `num_batches_tracked` (int64) as the int32 the State keeps;
    anything but an integer scalar is left for the engine to report."""
    array = np.asarray(value)
    if array.shape != () or not np.issubdtype(array.dtype, np.integer):
        return value
    if not 0 <= int(array) <= _INT32_MAX:
        raise ConversionError(
            f"{name} is {int(array)}, which the int32 batch count of a "
            f"BatchNorm(momentum=None) cannot hold (0 to {_INT32_MAX}). After that "
            "many batches each new one moves the averages by less than float32 "
            "resolves: load it into a layer with a momentum instead, or drop the "
            "entry (the count then stays the State's)."
        )
    return np.int32(array)


def _tensor_as_numpy(value: Any) -> Any:
    """A torch tensor as numpy, bfloat16 included, without importing torch."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        torch = sys.modules["torch"]
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    return value


# Where training scripts usually keep the model's state_dict in a checkpoint.
_STATE_DICT_NAMES = ("state_dict", "model_state_dict", "model", "net", "module")


def _state_dict_entry(checkpoint: Mapping) -> str | None:
    """The entry of a training checkpoint that holds the model's state_dict: the
    one flat dict under a usual name, else `None`."""
    usual = [
        str(name)
        for name, entry in checkpoint.items()
        if name in _STATE_DICT_NAMES
        and isinstance(entry, Mapping)
        and not any(isinstance(v, Mapping) for v in entry.values())
    ]
    return usual[0] if len(usual) == 1 else None


def _flat_state_dict(state_dict: Mapping, prefix: str) -> dict[tuple[str, ...], Any]:
    nested = sorted(str(k) for k, v in state_dict.items() if isinstance(v, Mapping))
    if nested:
        key = _state_dict_entry(state_dict)
        raise ConversionError(
            "The PyTorch state_dict holds nested dicts under "
            f"{', '.join(map(repr, nested))}: it looks like a whole training "
            "checkpoint. Pass the model's state_dict alone, e.g. "
            f"`checkpoint[{key or nested[0]!r}]`.",
            key=key,
        )
    flat = {}
    for key, value in state_dict.items():
        key = str(key)
        if prefix:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix) :]
        flat[tuple(key.split("."))] = _tensor_as_numpy(value)
    if prefix and not flat:
        raise ConversionError(
            f"No key of the PyTorch state_dict starts with prefix={prefix!r}."
        )
    return flat


def _common_prefix(flat: Mapping[tuple[str, ...], Any], pairing: Pairing) -> str | None:
    """`"module."` when every key starts with `module.` and the model has no
    `module` (a model saved inside a wrapper, e.g. nn.DataParallel), else `None`."""
    firsts = {path[0] for path in flat}
    if len(firsts) == 1 and not any(e.path[0] in firsts for e in pairing.entries):
        (first,) = firsts
        return first + "."
    return None


@typecheck
def load_torch(
    model: eqx.Module,
    state: eqx.nn.State,
    state_dict: Mapping,
    *,
    mapping: NameMapping | None = None,
    strict: bool = True,
    cast: bool = False,
    prefix: str = "",
) -> tuple[eqx.Module, eqx.nn.State]:
    """Loads a PyTorch `state_dict` into an Equinox model and its State.

    The model gives the structure, shapes and dtypes; the state_dict gives the
    values, paired by name: the field `model.layer1[0].bn1` is PyTorch's
    `layer1.0.bn1`, an `eqx.nn.Sequential`'s layers are `0`, `1`, ... as in
    `nn.Sequential`. A BatchNorm's `running_mean`/`running_var` go into the
    State; its `num_batches_tracked` is accepted (and may be absent, as PyTorch
    allows), and goes into the State of a `momentum=None` BatchNorm (as an int32
    count, [`eqx_bn.CumulativeStats`][]), whose cumulative average continues from
    it as PyTorch's does. torch is not needed: pass what
    [`eqx_bn.interop.read_torch`][] or [`eqx_bn.interop.read_safetensors`][]
    returns, or torch tensors.

    For PyTorch's numerics, the model's BatchNorms should be built with
    `momentum=0.9` (PyTorch's `momentum=0.1`), `eps=1e-5` and
    `unbiased_running_var=True`, as [`eqx_bn.models.TorchResNet`][]'s are.

    !!! Example

        ```python
        state_dict = eqx_bn.interop.read_torch("resnet18.pth")
        model, state = eqx.nn.make_with_state(eqx_bn.models.TorchResNet18)(key=key)
        model, state = eqx_bn.interop.load_torch(model, state, state_dict)
        ```

    **Arguments:**

    - `model`: the Equinox model; it is not modified.
    - `state`: its `eqx.nn.State` (from `eqx.nn.make_with_state`); not modified.
    - `state_dict`: `{"layer1.0.conv1.weight": array, ...}`, flat, as
        `module.state_dict()` gives it (numpy or JAX arrays, or torch tensors).
    - `mapping`: overrides of the pairing, `{dotted_scope: selector}`:
        `{"classifier": lambda m: m.fc}`; `None` as selector leaves the scope out
        on both sides (e.g. a new head): its entries are not read and the
        model's leaves there keep their values. See the pairing with
        [`eqx_bn.interop.torch_paths`][].
    - `strict`: require every paired model leaf to be in the state_dict and every
        entry of it to be used, as `load_state_dict(strict=True)`. With
        `strict=False`, leaves without a value keep theirs and unused entries are
        skipped; shapes and dtypes are still checked.
    - `cast`: convert values whose dtype differs from the model's (e.g. a
        bfloat16 or float16 checkpoint into a float32 model) instead of raising.
    - `prefix`: read only the keys starting with it, without it (`"module."` for
        a model saved inside `nn.DataParallel`, `"model."` for a Lightning one).

    **Returns:**

    `(model, state)`: new objects with exactly the original structure, shapes and
    dtypes, holding the PyTorch values.

    **Raises:**

    - `ConversionError`: listing every missing, unexpected, mis-shaped or
        mistyped entry (with its PyTorch name, the Equinox leaf, the expected and
        the actual shape/dtype), and layers with no conversion rule; also for a
        whole training checkpoint (`{"state_dict": ..., "epoch": ...}`) passed in
        place of the state_dict.
    - `ValueError`: for a `mapping` whose selectors do not pick part of the model.
    """
    pairing = pair(model, mapping, TORCH)
    flat = _flat_state_dict(state_dict, prefix)
    counted = _counted_scopes(pairing)
    for scope in _batch_norm_scopes(pairing):
        key = (*scope, NUM_BATCHES_TRACKED)
        if scope not in counted:
            flat.pop(key, None)
        elif key in flat:
            flat[key] = _loaded_count(flat[key], ".".join(key))
    # PyTorch loads a state_dict without the count (it keeps its own): so does a
    # momentum=None layer, keeping the State's.
    pairing = dataclasses.replace(
        pairing,
        entries=tuple(
            e
            for e in pairing.entries
            if e.state_field != "num_batches" or e.path in flat
        ),
    )
    try:
        return load_pairs(model, state, flat, pairing, TORCH, strict=strict, cast=cast)
    except ConversionError as e:
        common = _common_prefix(flat, pairing) if e.unexpected else None
        if common is None:
            raise
        raise ConversionError(
            f"{e} Every key starts with {common!r} (a model saved inside a "
            f"wrapper, e.g. nn.DataParallel): pass prefix={common!r}.",
            missing=e.missing,
            unexpected=e.unexpected,
            mismatched=e.mismatched,
            extra=e.extra,
            unsupported=e.unsupported,
            castable=e.castable,
            prefix=common,
        ) from None


def _batch_count(value: ArrayLike | None) -> int | None:
    """`num_batches_tracked` as a Python int (`None` kept)."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.shape != () or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            "export_torch: num_batches_tracked must be an integer (an int, or an "
            f"integer scalar such as a TrainState's `step`), got {describe(value)}."
        )
    if int(array) < 0:
        raise ValueError(
            f"export_torch: num_batches_tracked must be >= 0, got {int(array)}."
        )
    return int(array)


@typecheck
def export_torch(
    model: eqx.Module,
    state: eqx.nn.State,
    *,
    mapping: NameMapping | None = None,
    num_batches_tracked: ArrayLike | None = 0,
) -> dict[str, np.ndarray]:
    """Writes an Equinox model and its State as a PyTorch `state_dict`.

    The inverse of [`eqx_bn.interop.load_torch`][]. The result holds numpy arrays;
    in PyTorch load it with
    `module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`, or
    write it with [`eqx_bn.interop.write_safetensors`][] and read it with
    `safetensors.torch.load_file`.

    **Arguments:**

    - `model`, `state`: as for `load_torch`.
    - `mapping`: the same overrides as for `load_torch`.
    - `num_batches_tracked`: the value written as every BatchNorm's
        `num_batches_tracked` (an int64 scalar, as PyTorch keeps it): an int or
        an integer scalar of numpy or JAX (a `TrainState`'s `step`), the number
        of training steps taken, if PyTorch should know it (it only matters for
        a PyTorch BatchNorm with `momentum=None`). `None` leaves the entries out:
        `load_state_dict` (even with `strict=True`) then keeps each BatchNorm's
        own `num_batches_tracked`, `0` in a new module (PyTorch fills it in for a
        state_dict without `_metadata`, as this one is). A `momentum=None`
        BatchNorm always writes its own count, from the State.

    **Returns:**

    `{"conv1.weight": array, ..., "bn1.num_batches_tracked": array(0), ...}` in
    the model's order, PyTorch's shapes: writable numpy arrays of their own.

    **Raises:**

    - `ConversionError`: when the model has layers with no conversion rule.
    - `ValueError`: for a `mapping` whose selectors do not pick part of the model,
        or a negative `num_batches_tracked`.
    - `TypeError`: for a `num_batches_tracked` that is not an integer scalar (a
        float, a bool, an array with axes).
    """
    count = _batch_count(num_batches_tracked)
    pairing = pair(model, mapping, TORCH)
    exported = export_pairs(model, state, pairing, TORCH)
    # The BatchNorms without a count of their own get `num_batches_tracked`;
    # PyTorch lists it after the scope's last entry (running_var).
    counted = _counted_scopes(pairing)
    scopes = set(_batch_norm_scopes(pairing)) - counted
    last = {path[:-1]: path for path in exported if path[:-1] in scopes}
    out = {}
    for path, array in exported.items():
        if path[-1] == NUM_BATCHES_TRACKED and path[:-1] in counted:
            array = array.astype(np.int64)  # PyTorch's dtype for it
        # Writable, so that `torch.from_numpy` takes it without a warning.
        out[".".join(path)] = np.array(array)
        if last.get(path[:-1]) == path and count is not None:
            scope = ".".join(path[:-1])
            key = f"{scope}.{NUM_BATCHES_TRACKED}" if scope else NUM_BATCHES_TRACKED
            out[key] = np.array(count, dtype=np.int64)
    return out


@typecheck
def torch_paths(
    model: eqx.Module, *, mapping: NameMapping | None = None
) -> dict[str, str]:
    """The pairing `load_torch` and `export_torch` use, to read and debug it.

    !!! Example

        ```python
        >>> eqx_bn.interop.torch_paths(model)
        {'conv1.weight': 'model.conv1.weight', 'bn1.weight': 'model.bn1.scale', ...
         'bn1.running_mean': 'state[model.bn1.state_index].mean', ...}
        ```

    **Arguments:**

    - `model`: the Equinox model.
    - `mapping`: overrides, as for `load_torch`.

    **Returns:**

    A dict from each PyTorch state_dict key to the Equinox leaf it pairs with, in
    the model's order; `num_batches_tracked` only for `momentum=None` BatchNorms,
    whose State holds it.

    **Raises:**

    - `ConversionError`: when the model has layers with no conversion rule.
    - `ValueError`: for a `mapping` whose selectors do not pick part of the model.
    """
    return paths_of(pair(model, mapping, TORCH), TORCH, type(model).__name__)

"""The naming schemes of other frameworks, as data: Flax linen (`LINEN`), Flax NNX
(`NNX`) and PyTorch (`TORCH`).

A scheme (`Naming`) says how the framework names a model's variables (automatic
`Kind_n` names or attribute names, collections, separators) and, through its rule
table, what each known layer kind holds there: one `Slot` per variable, saying
where the value lives on the Equinox side (a field of the layer, or a field of its
`RunningStats`, `CumulativeStats` or `RenormStats` in the `State`) and how the
array is re-laid (`Layout`) between the two sides. The engine (`engine.py`) walks a
model with a scheme; nothing here walks anything, and the layouts work on numpy
arrays alone.
"""

import dataclasses
from collections.abc import Callable

import equinox as eqx
import numpy as np

from .._batch_norm import BatchNorm
from .._conv import ChannelsLastConv

Shape = tuple[int, ...]

PARAMS, BATCH_STATS = "params", "batch_stats"
"""Flax linen's collections: the model's parameters, and BatchNorm's statistics."""

# -- How an array is laid out on the other side --------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one array is laid out in the other framework compared with Equinox.

    - `name`: for messages (`"identity"` when the two sides agree).
    - `external_shape`: the other framework's shape for an Equinox shape.
    - `to_eqx`: `(external_array, eqx_shape) -> eqx_array`.
    - `to_external`: `eqx_array -> external_array`.
    """

    name: str
    external_shape: Callable[[Shape], Shape]
    to_eqx: Callable[[np.ndarray, Shape], np.ndarray]
    to_external: Callable[[np.ndarray], np.ndarray]


IDENTITY = Layout(
    "identity",
    external_shape=lambda shape: shape,
    to_eqx=lambda a, shape: a,
    to_external=lambda a: a,
)
"""Same array on both sides (norm scales and biases, embeddings, plain parameters)."""

DENSE_KERNEL = Layout(
    "Dense kernel (in, out) <-> Linear weight (out, in)",
    external_shape=lambda shape: shape[::-1],
    to_eqx=lambda a, shape: np.transpose(a),
    to_external=lambda a: np.transpose(a),
)
"""Flax's `Dense` kernel is the transpose of `eqx.nn.Linear`'s weight."""

VECTOR = Layout(
    "(n,) <-> Equinox (n, 1, ...) or ()",
    external_shape=lambda shape: (int(np.prod(shape)) if shape else 1,),
    to_eqx=lambda a, shape: np.reshape(a, shape),
    to_external=lambda a: np.reshape(a, (a.size,)),
)
"""Equinox keeps a conv bias as `(out, 1, ..., 1)`, a scalar Linear's bias as `()`."""


def _conv_to_flax_perm(ndim: int) -> tuple[int, ...]:
    # Equinox (out, in, *spatial) -> Flax (*spatial, in, out).
    return (*range(2, ndim), 1, 0)


def _conv_to_eqx_perm(ndim: int) -> tuple[int, ...]:
    # Flax (*spatial, in, out) -> Equinox (out, in, *spatial).
    return (ndim - 1, ndim - 2, *range(ndim - 2))


CONV_KERNEL = Layout(
    "Conv kernel (*spatial, in, out) <-> Conv weight (out, in, *spatial)",
    external_shape=lambda shape: tuple(
        shape[i] for i in _conv_to_flax_perm(len(shape))
    ),
    to_eqx=lambda a, shape: np.transpose(a, _conv_to_eqx_perm(a.ndim)),
    to_external=lambda a: np.transpose(a, _conv_to_flax_perm(a.ndim)),
)
"""Flax's convolution kernels are channels last, Equinox's channels first."""

TORCH_CONV_WEIGHT = Layout(
    "Conv weight (out, in, *spatial) <-> ChannelsLastConv kernel (*spatial, in, out)",
    external_shape=lambda shape: tuple(shape[i] for i in _conv_to_eqx_perm(len(shape))),
    to_eqx=lambda a, shape: np.transpose(a, _conv_to_flax_perm(a.ndim)),
    to_external=lambda a: np.transpose(a, _conv_to_eqx_perm(a.ndim)),
)
"""PyTorch's convolution weights are channels first, `ChannelsLastConv`'s kernels
channels last (Flax's layout)."""

LINEAR_WEIGHT = Layout(
    "Linear weight (out, in) <-> Equinox (out, in), or (in,) for a scalar output",
    external_shape=lambda shape: shape if len(shape) == 2 else (1, *shape),
    to_eqx=lambda a, shape: np.reshape(a, shape),
    to_external=lambda a: a if a.ndim == 2 else np.reshape(a, (1, *a.shape)),
)
"""PyTorch's `nn.Linear` weight; `eqx.nn.Linear(..., out_features="scalar")` keeps
its weight as `(in,)`."""


# -- What a layer holds ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slot:
    """One variable of a layer in the other framework.

    - `collection`: `"params"` or `"batch_stats"` in Flax linen; `None` where the
        framework has no collections (NNX, PyTorch).
    - `name`: the variable's name inside the layer's scope (`"kernel"`).
    - `field`: the attribute of the layer holding it (`"weight"`), or, when
        `in_state`, the field of the layer's State entry (`"mean"`, a
        `CumulativeStats`' `"num_batches"`, a `RenormStats`' `"stddev"`).
    - `layout`: how the array is re-laid between the two sides.
    - `in_state`: whether the value lives in the `State` under `layer.state_index`.
    """

    collection: str | None
    name: str
    field: str
    layout: Layout
    in_state: bool = False


@dataclasses.dataclass(frozen=True)
class Rule:
    """A layer kind: the Equinox class, the other framework's class name (which
    Flax linen's automatic names use), and its slots; `refuse`, if given, says why
    the framework cannot hold a layer of this kind as configured (None: it can)."""

    eqx_type: type
    kind: str
    slots: Callable[[eqx.Module], list[Slot]]
    refuse: Callable[[eqx.Module], str | None] | None = None


_RENORM_STATISTICS = (
    ("stddev", "stddev"),
    ("renorm_mean", "renorm_mean"),
    ("renorm_stddev", "renorm_stddev"),
)
"""What a `BatchNorm(renorm=True)` holds besides `mean` and `var` (Keras's
`moving_stddev`, `renorm_mean`, `renorm_stddev`), named as eqx_bn names them: Flax
has no Batch Renormalization, so these names are eqx_bn's own."""


def _with_renorm(
    slots: Callable[[eqx.Module], list[Slot]], collection: str | None
) -> Callable[[eqx.Module], list[Slot]]:
    """A BatchNorm rule's slots, and a renorm layer's three more statistics."""

    def with_renorm(layer: BatchNorm) -> list[Slot]:
        found = slots(layer)
        if layer.renorm:
            found += [
                Slot(collection, name, field, IDENTITY, in_state=True)
                for name, field in _RENORM_STATISTICS
            ]
        return found

    return with_renorm


def _torch_refuses(layer: BatchNorm) -> str | None:
    if not layer.renorm:
        return None
    return (
        "BatchNorm with renorm=True: PyTorch's BatchNorm has no Batch "
        "Renormalization, and no buffers for its statistics (stddev, renorm_mean, "
        "renorm_stddev). Save the model with the Flax formats or Orbax instead, or, "
        "for inference in PyTorch, map a renorm=False twin of the model with the "
        "same mean and var: inference uses only those"
    )


def _slots(
    collection: str | None,
    parameters: tuple[tuple[str, str, Layout], ...],
    statistics: tuple[tuple[str, str], ...] = (),
    statistics_collection: str | None = None,
) -> Callable[[eqx.Module], list[Slot]]:
    """A rule's slots function from a table: `parameters` as `(name in the other
    framework, field of the layer, layout)` (a disabled one, `None` on the layer,
    has no slot), then `statistics` as `(name, RunningStats field)` in the State."""

    def slots(layer: eqx.Module) -> list[Slot]:
        found = [
            Slot(collection, name, field, layout)
            for name, field, layout in parameters
            if getattr(layer, field) is not None
        ]
        return found + [
            Slot(statistics_collection, name, field, IDENTITY, in_state=True)
            for name, field in statistics
        ]

    return slots


def parameter_slots(
    layer: eqx.Module,
    pairs: tuple[tuple[str, str, Layout], ...],
    collection: str | None = PARAMS,
) -> list[Slot]:
    """Slots for the parameters the layer has (a disabled bias is `None`: no slot).

    `pairs` are `(name in the other framework, field of the layer, layout)`.
    """
    return _slots(collection, pairs)(layer)


# -- The schemes ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Naming:
    """How another framework names a model's variables.

    - `framework`: its name in messages (`"Flax"`, `"Flax NNX"`, `"PyTorch"`).
    - `source`: what the values come in, in messages (`"Flax variables"`).
    - `separator`: joins a path's parts in printed names (`"/"`, or `"."`).
    - `collections`: the top-level collections paths start with (linen's
        `("params", "batch_stats")`), or `()`.
    - `rules`: the layer kinds known to it and their variables, first match wins.
    - `numbered`: Flax linen's automatic `Kind_n` names; otherwise attribute names.
    - `sequential`: with attribute names, the scope an `eqx.nn.Sequential`'s layers
        sit under before their index (`("layers",)` in NNX, `()` in PyTorch).
    - `metadata_key`: the `eqx.field` metadata key declaring a field's name, e.g.
        `eqx.field(metadata={"flax_name": "conv_proj"})`.
    - `paths_function`: the public function that shows the pairing, for hints.
    """

    framework: str
    source: str
    separator: str
    collections: tuple[str, ...]
    rules: tuple[Rule, ...]
    numbered: bool
    sequential: tuple[str, ...]
    metadata_key: str
    paths_function: str


def rule_for(layer: object, rules: tuple[Rule, ...]) -> Rule | None:
    """The rule for `layer`, or `None` when it is not one of the known layer kinds."""
    for rule in rules:
        if isinstance(layer, rule.eqx_type):
            return rule
    return None


_SCALE_BIAS = (("scale", "weight", IDENTITY), ("bias", "bias", IDENTITY))

LINEN = Naming(
    framework="Flax",
    source="Flax variables",
    separator="/",
    collections=(PARAMS, BATCH_STATS),
    rules=(
        Rule(
            BatchNorm,
            "BatchNorm",
            _with_renorm(
                _slots(
                    PARAMS,
                    (("scale", "scale", IDENTITY), ("bias", "bias", IDENTITY)),
                    (("mean", "mean"), ("var", "var")),
                    BATCH_STATS,
                ),
                BATCH_STATS,
            ),
        ),
        Rule(
            eqx.nn.Linear,
            "Dense",
            _slots(
                PARAMS, (("kernel", "weight", DENSE_KERNEL), ("bias", "bias", VECTOR))
            ),
        ),
        # also Conv1d/2d/3d, which subclass it
        Rule(
            eqx.nn.Conv,
            "Conv",
            _slots(
                PARAMS, (("kernel", "weight", CONV_KERNEL), ("bias", "bias", VECTOR))
            ),
        ),
        # Flax's own layout: the kernel as it is, the bias (out,).
        Rule(
            ChannelsLastConv,
            "Conv",
            _slots(
                PARAMS, (("kernel", "weight", IDENTITY), ("bias", "bias", IDENTITY))
            ),
        ),
        Rule(eqx.nn.LayerNorm, "LayerNorm", _slots(PARAMS, _SCALE_BIAS)),
        Rule(eqx.nn.GroupNorm, "GroupNorm", _slots(PARAMS, _SCALE_BIAS)),
        # Flax's RMSNorm has no bias: build Equinox's with use_bias=False.
        Rule(eqx.nn.RMSNorm, "RMSNorm", _slots(PARAMS, _SCALE_BIAS)),
        Rule(
            eqx.nn.Embedding,
            "Embed",
            _slots(PARAMS, (("embedding", "weight", IDENTITY),)),
        ),
    ),
    numbered=True,
    sequential=(),
    metadata_key="flax_name",
    paths_function="eqx_bn.interop.flax_paths",
)
"""Flax linen: `params`/`batch_stats` collections and automatic `Kind_n` names."""


def _without_collection(
    slots: Callable[[eqx.Module], list[Slot]],
) -> Callable[[eqx.Module], list[Slot]]:
    """A linen rule's slots function, giving the same slots with no collection."""

    def nnx_slots(layer: eqx.Module) -> list[Slot]:
        return [dataclasses.replace(slot, collection=None) for slot in slots(layer)]

    return nnx_slots


# NNX's layers hold the same variables as linen's, under the same names and in the
# same layouts (nnx.Linear's kernel is linen Dense's); only there are no collections:
# nnx.BatchNorm keeps its running statistics beside its parameters. So the rules are
# linen's, with each slot's collection dropped, and only the class names differ.
_NNX_KINDS = {"Dense": "Linear"}

NNX = Naming(
    framework="Flax NNX",
    source="NNX state",
    separator="/",
    collections=(),
    rules=tuple(
        Rule(
            rule.eqx_type,
            _NNX_KINDS.get(rule.kind, rule.kind),
            _without_collection(rule.slots),
            rule.refuse,
        )
        for rule in LINEN.rules
    ),
    numbered=False,
    sequential=("layers",),
    metadata_key="nnx_name",
    paths_function="eqx_bn.interop.nnx_paths",
)
"""Flax NNX: attribute names, list items by index, `nnx.Sequential`'s `layers`."""

_WEIGHT_BIAS = (("weight", "weight", IDENTITY), ("bias", "bias", IDENTITY))

NUM_BATCHES_TRACKED = "num_batches_tracked"
"""The PyTorch BatchNorm buffer beside `running_var`: the number of batches trained
on. A `BatchNorm(momentum=None)` holds it (`CumulativeStats.num_batches`, paired
like the statistics); for any other BatchNorm it is accepted on load and written
on export (see `torch.py`)."""


def _torch_batch_norm_slots(layer: BatchNorm) -> list[Slot]:
    """`nn.BatchNorm2d`'s variables; the count too for a `momentum=None` layer,
    whose cumulative average continues from it."""
    slots = _slots(
        None,
        (("weight", "scale", IDENTITY), ("bias", "bias", IDENTITY)),
        (("running_mean", "mean"), ("running_var", "var")),
    )(layer)
    if layer.momentum is None:
        slots.append(
            Slot(None, NUM_BATCHES_TRACKED, "num_batches", IDENTITY, in_state=True)
        )
    return slots


TORCH = Naming(
    framework="PyTorch",
    source="PyTorch state_dict",
    separator=".",
    collections=(),
    rules=(
        Rule(BatchNorm, "BatchNorm2d", _torch_batch_norm_slots, _torch_refuses),
        Rule(
            eqx.nn.Linear,
            "Linear",
            _slots(
                None, (("weight", "weight", LINEAR_WEIGHT), ("bias", "bias", VECTOR))
            ),
        ),
        # also Conv1d/2d/3d, which subclass it; the weight is (out, in / groups,
        # *kernel) on both sides
        Rule(
            eqx.nn.Conv,
            "Conv2d",
            _slots(None, (("weight", "weight", IDENTITY), ("bias", "bias", VECTOR))),
        ),
        Rule(
            ChannelsLastConv,
            "Conv2d",
            _slots(
                None,
                (("weight", "weight", TORCH_CONV_WEIGHT), ("bias", "bias", IDENTITY)),
            ),
        ),
        Rule(eqx.nn.LayerNorm, "LayerNorm", _slots(None, _WEIGHT_BIAS)),
        Rule(eqx.nn.GroupNorm, "GroupNorm", _slots(None, _WEIGHT_BIAS)),
        Rule(eqx.nn.RMSNorm, "RMSNorm", _slots(None, _WEIGHT_BIAS)),
        Rule(eqx.nn.Embedding, "Embedding", _slots(None, _WEIGHT_BIAS)),
    ),
    numbered=False,
    sequential=(),
    metadata_key="torch_name",
    paths_function="eqx_bn.interop.torch_paths",
)
"""PyTorch: dotted attribute paths, `nn.Sequential` layers by index."""


UNSUPPORTED_HINTS: dict[type, str] = {
    eqx.nn.BatchNorm: (
        "use eqx_bn.BatchNorm, which has Flax's numerics and running statistics"
    ),
}
"""For Equinox layers with arrays and no rule: what to do instead (in messages)."""

"""Per-layer-kind layout rules: a layer's variables in another framework and how they
are laid out there.

A rule turns one Equinox layer into `Slot`s, one per variable of the other framework
(Flax linen here; NNX and PyTorch rules live beside their naming schemes). Each slot
says where the value lives on the Equinox side (a field of the layer, or a field of
its `RunningStats` in the `State`) and how an array moves between the two layouts.
The functions here work on numpy arrays and know nothing of paths or checkpoints.
"""

from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
import jax
import numpy as np

from .._batch_norm import BatchNorm

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """How one array is laid out in the other framework compared with Equinox.

    - `external_shape`: the other framework's shape for an Equinox shape.
    - `to_eqx`: `(external_array, eqx_shape) -> eqx_array`.
    - `to_external`: `eqx_array -> external_array`.
    """

    name: str
    external_shape: Callable[[Shape], Shape]
    to_eqx: Callable[[np.ndarray, Shape], np.ndarray]
    to_external: Callable[[np.ndarray], np.ndarray]


def _dense_kernel_shape(shape: Shape) -> Shape:
    return shape[::-1]


IDENTITY = Layout(
    "identity",
    external_shape=lambda shape: shape,
    to_eqx=lambda a, shape: a,
    to_external=lambda a: a,
)
"""Same array on both sides (norm scales and biases, embeddings, plain parameters)."""

DENSE_KERNEL = Layout(
    "Dense kernel (in, out) <-> Linear weight (out, in)",
    external_shape=_dense_kernel_shape,
    to_eqx=lambda a, shape: np.transpose(a),
    to_external=lambda a: np.transpose(a),
)

VECTOR = Layout(
    "Flax (n,) <-> Equinox (n, 1, ...) or ()",
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


@dataclass(frozen=True)
class Slot:
    """One variable of a layer in the other framework.

    - `collection`: `"params"` or `"batch_stats"` in Flax linen; `None` where the
        framework has no collections (NNX, PyTorch).
    - `name`: the variable's name inside the layer's scope (`"kernel"`).
    - `field`: the attribute of the layer holding it (`"weight"`), or, when
        `in_state`, the field of the layer's `RunningStats` (`"mean"`).
    - `in_state`: whether the value lives in the `State` under `layer.state_index`.
    - `layout`: how the array is re-laid between the two sides.
    """

    collection: str | None
    name: str
    field: str
    layout: Layout
    in_state: bool = False


def parameter_slots(
    layer: eqx.Module,
    pairs: tuple[tuple[str, str, Layout], ...],
    collection: str | None = "params",
) -> list[Slot]:
    """Slots for the parameters the layer has (a disabled bias is `None`: no slot).

    `pairs` are `(name in the other framework, field of the layer, layout)`.
    """
    return [
        Slot(collection, name, field, layout)
        for name, field, layout in pairs
        if getattr(layer, field) is not None
    ]


def _linear(layer: eqx.nn.Linear) -> list[Slot]:
    return parameter_slots(
        layer, (("kernel", "weight", DENSE_KERNEL), ("bias", "bias", VECTOR))
    )


def _conv(layer: eqx.nn.Conv) -> list[Slot]:
    return parameter_slots(
        layer, (("kernel", "weight", CONV_KERNEL), ("bias", "bias", VECTOR))
    )


def _norm(layer: eqx.Module) -> list[Slot]:
    return parameter_slots(
        layer, (("scale", "weight", IDENTITY), ("bias", "bias", IDENTITY))
    )


def _embedding(layer: eqx.nn.Embedding) -> list[Slot]:
    return parameter_slots(layer, (("embedding", "weight", IDENTITY),))


def _batch_norm(layer: BatchNorm) -> list[Slot]:
    slots = parameter_slots(
        layer, (("scale", "scale", IDENTITY), ("bias", "bias", IDENTITY))
    )
    slots += [
        Slot("batch_stats", "mean", "mean", IDENTITY, in_state=True),
        Slot("batch_stats", "var", "var", IDENTITY, in_state=True),
    ]
    return slots


@dataclass(frozen=True)
class Rule:
    """A layer kind: the Equinox class, the other framework's class name (which
    Flax linen's automatic names use), and its slots."""

    eqx_type: type
    kind: str
    slots: Callable[[eqx.Module], list[Slot]]


LINEN_RULES: tuple[Rule, ...] = (
    Rule(BatchNorm, "BatchNorm", _batch_norm),
    Rule(eqx.nn.Linear, "Dense", _linear),
    Rule(eqx.nn.Conv, "Conv", _conv),  # also Conv1d/2d/3d, which subclass it
    Rule(eqx.nn.LayerNorm, "LayerNorm", _norm),
    Rule(eqx.nn.GroupNorm, "GroupNorm", _norm),
    Rule(eqx.nn.RMSNorm, "RMSNorm", _norm),  # Flax's has no bias: use_bias=False
    Rule(eqx.nn.Embedding, "Embed", _embedding),
)
"""The layer kinds converted automatically to and from Flax linen, first match wins."""

UNSUPPORTED_HINTS: dict[type, str] = {
    eqx.nn.BatchNorm: (
        "use eqx_bn.BatchNorm, which has Flax's numerics and running statistics"
    ),
}


def rule_for(layer: object, rules: tuple[Rule, ...] = LINEN_RULES) -> Rule | None:
    """The rule for `layer`, or `None` when it is not one of the known layer kinds."""
    for rule in rules:
        if isinstance(layer, rule.eqx_type):
            return rule
    return None


def is_unsupported_layer(module: eqx.Module) -> bool:
    """An Equinox built-in layer with arrays and no rule (e.g. ConvTranspose).

    Treating it as a generic scope would pair its arrays by field name with no layout
    change, which is wrong for most of them; it has to be mapped by hand.
    """
    if not type(module).__module__.startswith("equinox."):
        return False
    if isinstance(module, (eqx.nn.Sequential, eqx.nn.MLP, eqx.nn.StateIndex)):
        return False
    return any(
        eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)
        for leaf in jax.tree_util.tree_leaves(module)
    )

"""Transforms of a finished model's BatchNorms: freezing them (`freeze_batch_norms`,
`unfreeze_batch_norms`, and `trainable`, the filter that leaves frozen scales and
biases out of training), and folding each inference BatchNorm into the Conv or
Linear layer that feeds it (`fold_batch_norms`).

**Freezing** sets each BatchNorm's `frozen` configuration: a frozen layer normalises
with its running statistics in training too and never updates them, as
`torchvision.ops.FrozenBatchNorm2d`. The layer keeps its class, fields and State
entry, so checkpoints, folding and the model's own code see a BatchNorm as before.

**Folding.**

In inference a BatchNorm is a per-channel affine map of its input,
`y = z * mul + (beta - mean * mul)` with `mul = gamma / sqrt(var + eps)`. When `z`
comes straight from a convolution or a linear layer, that map can be applied to the
layer's weights and bias once, ahead of time, instead of to every activation at
every call. Which BatchNorm follows which layer is structural: by position in an
`eqx.nn.Sequential`, and, in any other module, declared on the BatchNorm's field
with `eqx.field(metadata={"fold_into": "conv"})` naming the field of the layer it
follows. Only numbers live in the result: the modules keep their classes, and each
folded BatchNorm becomes a `FoldedBatchNorm` that hands `x` and the state through.
"""

import copy
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree, Shaped

from ._batch_norm import BatchNorm, check_running, get_running
from ._conv import ChannelsLastConv
from ._numerics import promote
from ._typing import typecheck

FOLD_INTO = "fold_into"
"""The `eqx.field` metadata key with which a BatchNorm field names the Conv or Linear
field whose output it normalises."""

_Affine = eqx.nn.Conv | ChannelsLastConv | eqx.nn.Linear


class FoldedBatchNorm(eqx.nn.StatefulLayer):
    """What `fold_batch_norms` leaves where a BatchNorm was: it returns `x` and the
    state unchanged, its normalisation now being part of the preceding layer.

    It keeps the BatchNorm's call signature, so the model that called the BatchNorm
    calls it the same way, and it is inference-only: asked to train (a call with
    `inference=False`, or after `eqx.nn.inference_mode(model, False)`) it raises,
    since the batch statistics it would need are gone.
    """

    inference: bool
    input_size: int = eqx.field(static=True)
    channel_axis: int = eqx.field(static=True)

    def __init__(self, input_size: int, channel_axis: int):
        """**Arguments:**

        - `input_size`: the channels of the BatchNorm it replaces.
        - `channel_axis`: where those channels are in `x` (negative: from the end).
        """
        self.inference = True
        self.input_size = input_size
        self.channel_axis = channel_axis

    @jax.named_scope("eqx_bn.FoldedBatchNorm")
    @typecheck
    def __call__(
        self,
        x: Shaped[Array, "*shape"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        mask: Shaped[Array, "*mask_shape"] | None = None,
    ) -> tuple[Shaped[Array, "*shape"], eqx.nn.State]:
        """**Arguments:** as `eqx_bn.BatchNorm`'s (`key` and `mask` are unused).

        **Returns:**

        `(x, state)`, both unchanged.

        **Raises:**

        - `ValueError`: in training mode, or if `x` has not `input_size` channels
            where the BatchNorm had them.
        """
        del key, mask
        if not (self.inference if inference is None else inference):
            raise ValueError(
                "FoldedBatchNorm: this BatchNorm was folded into the layer before it "
                "by eqx_bn.fold_batch_norms and can only run in inference. Train "
                "the unfolded model, and fold it again afterwards."
            )
        axis = self.channel_axis
        if x.ndim <= max(axis, -axis - 1) or x.shape[axis] != self.input_size:
            raise ValueError(
                f"FoldedBatchNorm: x of shape {x.shape} has no {self.input_size} "
                f"channels on axis {axis}, where the folded BatchNorm had them."
            )
        return x, state


def _bn_channel_axis(bn: BatchNorm) -> int:
    if bn.channels_last:
        return -1
    return 0 if bn.axis_name is not None else 1


def _out_features(layer: _Affine) -> int | None:
    if isinstance(layer, eqx.nn.Conv | ChannelsLastConv):
        return layer.out_channels
    return None if layer.out_features == "scalar" else int(layer.out_features)


def _fold_pair(
    layer: _Affine, bn: BatchNorm, state: eqx.nn.State, where: str
) -> tuple[_Affine, FoldedBatchNorm]:
    """`layer` with `bn` (in inference) applied to its weights and bias."""
    if not isinstance(layer, _Affine):
        raise TypeError(
            f"fold_batch_norms: {where}: the BatchNorm follows a "
            f"{type(layer).__name__}, but only eqx.nn.Conv (1-3d), "
            "eqx_bn.models.ChannelsLastConv and eqx.nn.Linear can take a BatchNorm "
            "in. Remove the declaration, or put the BatchNorm right after a Conv or "
            "Linear."
        )
    features = _out_features(layer)
    if features != bn.input_size:
        raise ValueError(
            f"fold_batch_norms: {where}: the {type(layer).__name__} gives "
            f"{features if features is not None else 'a scalar'} output channels, "
            f"but the BatchNorm normalises {bn.input_size}: they are not a "
            "layer and the BatchNorm of its output."
        )
    weight_dtype = layer.weight.dtype
    # What the BatchNorm would output for this layer's output dtype: its `dtype`,
    # or the promotion with its scale and bias.
    bn_out = bn.output_dtype(weight_dtype)
    if bn_out != weight_dtype:
        raise ValueError(
            f"fold_batch_norms: {where}: the BatchNorm outputs {bn_out}, but "
            f"the {type(layer).__name__}'s weights are {weight_dtype}, so the "
            "folded layer could not give the BatchNorm's dtype. Fold only layers "
            "whose BatchNorm keeps the layer's dtype (dtype=None with parameters "
            "of that dtype or narrower, or dtype= the layer's own)."
        )
    running = get_running(state, bn.state_index)
    check_running(running, bn.input_size, bn.running_dtype, bn.entry_kind)
    # Folded in float32 (or wider) whatever the parameters' dtype, rounded once.
    dtype = promote(weight_dtype, running.mean.dtype, jnp.float32)
    mul = jax.lax.rsqrt(running.var.astype(dtype) + jnp.asarray(bn.eps, dtype))
    if bn.scale is not None:
        mul = mul * bn.scale.astype(dtype)
    shift = -running.mean.astype(dtype) * mul
    if layer.bias is not None:
        shift = shift + jnp.reshape(layer.bias, (-1,)).astype(dtype) * mul
    if bn.bias is not None:
        shift = shift + bn.bias.astype(dtype)
    # Output channels: the first axis of an Equinox weight (and of a Conv's bias,
    # `(out, 1, ..., 1)`), the last of a ChannelsLastConv kernel.
    last = isinstance(layer, ChannelsLastConv)
    per_out = (
        (1,) * (layer.weight.ndim - 1) + (-1,)
        if last
        else (-1,) + (1,) * (layer.weight.ndim - 1)
    )
    weight = (layer.weight.astype(dtype) * jnp.reshape(mul, per_out)).astype(
        weight_dtype
    )
    bias_shape = (features,) + (
        (1,) * layer.num_spatial_dims if isinstance(layer, eqx.nn.Conv) else ()
    )
    bias = jnp.reshape(shift, bias_shape).astype(weight_dtype)
    # `use_bias` is a static field, which `eqx.tree_at` cannot change: the layer
    # is copied and its three fields set, as its own __init__ would.
    folded = copy.copy(layer)
    for name, value in (("weight", weight), ("bias", bias), ("use_bias", True)):
        object.__setattr__(folded, name, value)
    return folded, FoldedBatchNorm(bn.input_size, _bn_channel_axis(bn))


def _fold_sequential(seq: eqx.nn.Sequential, state, where: str) -> eqx.nn.Sequential:
    layers = [
        _fold_tree(layer, state, f"{where}.layers[{i}]")
        for i, layer in enumerate(seq.layers)
    ]
    for i in range(len(layers) - 1):
        layer, bn = layers[i], layers[i + 1]
        if not (isinstance(layer, _Affine) and isinstance(bn, BatchNorm)):
            continue
        here = f"{where}.layers[{i}:{i + 2}]"
        # Per example, a Conv gives (C, *spatial), a ChannelsLastConv (*spatial,
        # C) and a Linear (C,).
        per_example = bn.axis_name is not None
        last = isinstance(layer, ChannelsLastConv)
        fits = per_example and (
            isinstance(layer, eqx.nn.Linear) or bn.channels_last == last
        )
        if not fits:
            gives = "channels last" if last else "channels first"
            if not per_example:
                built = "whole batches (axis_name=None)"
            else:
                built = "channels last" if bn.channels_last else "channels first"
            raise ValueError(
                f"fold_batch_norms: {here}: a {type(layer).__name__} gives one "
                f"example, {gives}, but the BatchNorm after it is built for "
                f"{built}, so the two do not run one after the other as they stand."
            )
        layers[i], layers[i + 1] = _fold_pair(layer, bn, state, here)
    return eqx.tree_at(lambda s: s.layers, seq, tuple(layers))


def _fold_module(module: eqx.Module, state, where: str) -> eqx.Module:
    fields = {
        f.name: f for f in dataclasses.fields(module) if not f.metadata.get("static")
    }
    new = {
        name: _fold_tree(getattr(module, name), state, f"{where}.{name}")
        for name in fields
    }
    claimed: dict[str, str] = {}
    for name, field in fields.items():
        target = field.metadata.get(FOLD_INTO)
        if target is None:
            continue
        here = f"{where}.{name} (fold_into={target!r})"
        if target not in fields:
            raise ValueError(
                f"fold_batch_norms: {here}: {type(module).__name__} has no field "
                f"{target!r} to fold into; fields: {', '.join(fields)}."
            )
        if target in claimed:
            raise ValueError(
                f"fold_batch_norms: {here}: {target!r} is already the layer of "
                f"{claimed[target]!r}; one layer can take in only the BatchNorm "
                "that directly follows it."
            )
        claimed[target] = name
        layer, bn = new[target], new[name]
        if bn is None or isinstance(bn, FoldedBatchNorm):
            continue  # an absent optional BatchNorm, or one folded already
        if not isinstance(bn, BatchNorm):
            raise TypeError(
                f"fold_batch_norms: {here}: the field holds a {type(bn).__name__}, "
                "not an eqx_bn.BatchNorm (declared on the wrong field?)."
            )
        new[target], new[name] = _fold_pair(layer, bn, state, here)
    changed = [name for name in fields if new[name] is not getattr(module, name)]
    if not changed:
        return module
    return eqx.tree_at(
        lambda m: [getattr(m, name) for name in changed],
        module,
        [new[name] for name in changed],
        is_leaf=lambda v: v is None,
    )


def _fold_tree(tree, state, where: str):
    if isinstance(tree, eqx.nn.Sequential):
        return _fold_sequential(tree, state, where)
    if isinstance(tree, eqx.Module):
        return _fold_module(tree, state, where)
    is_module = lambda v: isinstance(v, eqx.Module)  # noqa: E731
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(tree, is_leaf=is_module)):
        return tree  # an array, a scalar, None: nothing to fold
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_module)
    return jax.tree.unflatten(
        treedef,
        [
            _fold_tree(v, state, where + jax.tree_util.keystr(path))
            if is_module(v)
            else v
            for path, v in path_leaves
        ],
    )


def _training_norms(model) -> list[str]:
    is_bn = lambda v: isinstance(v, BatchNorm)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(model, is_leaf=is_bn)[0]
    return [
        "model" + jax.tree_util.keystr(path)
        for path, v in leaves
        if is_bn(v) and not v.inference and v.frozen is None
    ]


def fold_batch_norms(model, state: eqx.nn.State):
    """An inference model in which every `eqx_bn.BatchNorm` that directly follows an
    `eqx.nn.Conv`, `eqx_bn.models.ChannelsLastConv` or `eqx.nn.Linear` is folded into
    that layer's weights and bias.

    With `mul = scale / sqrt(var + eps)` from the running statistics in `state`, the
    layer's weight rows are multiplied by `mul` and its bias becomes
    `(bias - mean) * mul + beta` (a layer built with `use_bias=False` gets one). The
    BatchNorm becomes a `FoldedBatchNorm`, which returns its input and the state
    unchanged, so the model is called exactly as before, with the same `state`,
    and gives the unfolded model's inference outputs up to float32 rounding with
    one pass over each activation fewer.

    Pairs are found

    - in an `eqx.nn.Sequential`, by position: a Conv or Linear, then a BatchNorm;
    - in `eqx_bn.models` (`ResNet`, `ResNetBlock`, `SeedMLP`, the torchvision-layout
        `TorchResNet`, `BasicBlock`, `Bottleneck`, `Downsample`), which declare
        theirs;
    - in your own modules, when the BatchNorm's field names the layer it follows:

        ```python
        class Block(eqx.Module):
            conv: eqx.nn.Conv2d
            norm: eqx_bn.BatchNorm = eqx.field(metadata={"fold_into": "conv"})
        ```

        The declaration promises that `norm` is applied to `conv`'s output and to
        nothing else, and that nothing else reads that output; it is not checked
        against `__call__`. A declared field that holds `None` (an optional
        BatchNorm, absent in this model) is left as it is.

    BatchNorms anywhere else stay as they are (in inference mode).

    **Arguments:**

    - `model`: any PyTree of Equinox modules, in inference mode
        (`eqx.nn.inference_mode(model)`); frozen BatchNorms
        ([`eqx_bn.freeze_batch_norms`][]) fold in either mode.
    - `state`: the `eqx.nn.State` with the running statistics.

    **Returns:**

    The folded model, of the same classes. Keep calling it with `state`; the folded
    BatchNorms leave it as it is.

    **Raises:**

    - `ValueError`: if a BatchNorm in `model` is in training mode; if a declared
        pair does not fit (no such field, a layer claimed twice, a channel count or
        layout that differs); if a BatchNorm would output another dtype than the
        layer's (a `dtype=`, or parameters wider than the layer's weights); if the
        State does not hold a BatchNorm's running statistics as the layer made them.
    - `TypeError`: if a declared pair is not a Conv/Linear and an `eqx_bn.BatchNorm`.
    """
    training = _training_norms(model)
    if training:
        raise ValueError(
            "fold_batch_norms: the model is in training mode (BatchNorm "
            f"{', '.join(training[:3])}{', ...' if len(training) > 3 else ''} has "
            "inference=False), and a training BatchNorm normalises with the batch's "
            "statistics, which cannot be folded into weights. Fold the inference "
            "model: `fold_batch_norms(eqx.nn.inference_mode(model), state)`."
        )
    return _fold_tree(model, state, "model")


# ------------------------------------------------------------------- freezing


def _is_bn(v) -> bool:
    return isinstance(v, BatchNorm)


def _set_frozen(bn: BatchNorm, frozen: str | None) -> BatchNorm:
    # `frozen` is a static field, which `eqx.tree_at` cannot change: the layer is
    # copied and the field set, as its own __init__ would.
    if bn.frozen == frozen:
        return bn
    new = copy.copy(bn)
    object.__setattr__(new, "frozen", frozen)
    return new


@typecheck
def freeze_batch_norms(model: PyTree, *, affine: bool = True) -> PyTree:
    """Freezes every BatchNorm of `model`: each normalises with its running
    statistics, in training as in inference, and never updates them; with
    `affine=True` its scale and bias are fixed too. PyTorch: every `nn.BatchNorm2d`
    replaced by a `torchvision.ops.FrozenBatchNorm2d` (timm's
    `freeze_batch_norm_2d`).

    Fine-tuning on small batches (detection, segmentation, a few examples) is the
    usual reason: their statistics are too noisy to train with, and the
    pretrained ones are kept.

    !!! Example

        ```python
        model = eqx_bn.freeze_batch_norms(model)  # every BatchNorm
        model = eqx.tree_at(lambda m: m.backbone, model,  # or those of one part
                            eqx_bn.freeze_batch_norms(model.backbone))
        ts = TrainState.create(model, state, optax.adamw(1e-4))  # trains the rest
        ```

    Each `eqx_bn.BatchNorm` gets `frozen="all"` (`"statistics"` with
    `affine=False`), and is otherwise the same layer: the same class and fields,
    its statistics in the same State entry (never changed), the same checkpoint
    names. The model is called as before, and `eqx.nn.inference_mode` does not
    undo the freeze; [`eqx_bn.unfreeze_batch_norms`][] does.

    With `affine=True` no gradient reaches the frozen scales and biases
    (`jax.lax.stop_gradient`), and [`eqx_bn.trainable`][] leaves them out of the
    arrays an optimiser trains: a zero gradient alone would still be decayed by
    AdamW. `TrainState.create` and `make_train_step` use it; in a loop of your own,
    build the optimiser on `eqx.filter(model, eqx_bn.trainable(model))`.

    **Arguments:**

    - `model`: any PyTree holding `eqx_bn.BatchNorm`s. Those frozen already are
        frozen again with the `affine` given.
    - `affine`: fix the scale and bias too; `False` keeps training them (the
        statistics still fixed: the gradients are those of inference mode).

    **Returns:**

    The model with every BatchNorm frozen.
    """
    frozen = "all" if affine else "statistics"
    return jax.tree.map(
        lambda v: _set_frozen(v, frozen) if _is_bn(v) else v, model, is_leaf=_is_bn
    )


@typecheck
def unfreeze_batch_norms(model: PyTree) -> PyTree:
    """Undoes [`eqx_bn.freeze_batch_norms`][]: every BatchNorm trains (batch
    statistics, running averages updated, scale and bias trained) again, in the
    model's current mode.

    **Arguments:**

    - `model`: any PyTree.

    **Returns:**

    The model with no frozen BatchNorm.
    """
    return jax.tree.map(
        lambda v: _set_frozen(v, None) if _is_bn(v) else v, model, is_leaf=_is_bn
    )


@typecheck
def trainable(model: PyTree) -> PyTree:
    """The filter spec of what an optimiser trains in `model`: every floating-point
    array (`eqx.is_inexact_array`) except the scales and biases of BatchNorms
    frozen with `affine=True` ([`eqx_bn.freeze_batch_norms`][]), which are
    PyTorch's buffers there (`FrozenBatchNorm2d`).

    `eqx_bn.train.TrainState.create` and `make_train_step` use it. In a loop of
    your own, initialise and update the optimiser with those arrays alone:

    ```python
    params = eqx.filter(model, eqx_bn.trainable(model))
    opt_state = optimizer.init(params)
    grads = eqx.filter(grads, eqx_bn.trainable(model))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    ```

    **Arguments:**

    - `model`: any PyTree (a model, or its gradients).

    **Returns:**

    A PyTree of bools shaped like `model`, for `eqx.filter` and `eqx.partition`.
    """

    def spec(v):
        if _is_bn(v) and v.frozen == "all":
            return jax.tree.map(lambda _: False, v)
        return jax.tree.map(eqx.is_inexact_array, v)

    return jax.tree.map(spec, model, is_leaf=_is_bn)

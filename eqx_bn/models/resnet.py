"""An Equinox ResNet (v1) that mirrors `examples/imagenet/models.py` of Flax.

One example at a time under `jax.vmap(..., axis_name="batch")`, images channels first
by default or channels last (Flax's layout) with `channels_last=True`. The module
tree pairs with the Flax example's variables by the automatic naming of
`eqx_bn.interop`: `conv_init`, `bn_init`, `ResNetBlock_0 ... ResNetBlock_N` (each
with `Conv_0`, `BatchNorm_0`, `Conv_1`, `BatchNorm_1` and, where the shape changes,
`conv_proj`, `norm_proj`), and the head `Dense_0`. The forward pass and the stage
layout are those of `_resnet.py`, shared with the torchvision-named `TorchResNet`.

The initial weights are Flax's: `lecun_normal` (a normal truncated at two standard
deviations, variance 1 / fan-in) for every convolution and for the head, a zero
head bias, BatchNorm scale 1 and bias 0, and scale 0 for the last norm of a block.
"""

import math
from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
from jaxtyping import PRNGKeyArray

from .._batch_norm import BatchNorm
from .._conv import ChannelsLastConv, ChannelsLastConv2d
from ._init import (
    Constant,
    Distribution,
    TruncatedNormal,
    batch_norm_init,
    fans,
    initialise,
)
from ._resnet import AbstractBlock, AbstractResNet, split_keys, stage_plan


def _flax_init(names: tuple[str, ...], owners: tuple) -> Distribution:
    """Flax's initialisers: `nn.Conv` and `nn.Dense` kernels `lecun_normal()`,
    `nn.Dense` bias zeros, `nn.BatchNorm` scale ones (zeros for `norm_1`, as the
    example's `scale_init=zeros_init()`) and bias zeros."""
    layer = owners[-1]
    if isinstance(layer, ChannelsLastConv | eqx.nn.Linear):
        if names[-1] == "bias":
            return Constant(0.0)
        return TruncatedNormal(1 / math.sqrt(fans(layer)[0]))
    return batch_norm_init(names, owners, zero=ResNetBlock._last_norm)


def _norm(features: int, axis_name: str | None, channels_last: bool) -> BatchNorm:
    # The Flax example's `norm`: momentum 0.9, epsilon 1e-5.
    return BatchNorm(
        features, axis_name, momentum=0.9, eps=1e-5, channels_last=channels_last
    )


def _conv(in_channels, out_channels, kernel, stride=1, *, key) -> ChannelsLastConv2d:
    """`nn.Conv(out, (kernel, kernel), stride, use_bias=False)`, "SAME" padded."""
    return ChannelsLastConv2d(
        in_channels,
        out_channels,
        kernel,
        stride,
        padding="SAME",
        use_bias=False,
        key=key,
    )


class ResNetBlock(AbstractBlock):
    """Two 3x3 convolutions with BatchNorm and a residual connection.

    When the stride or the number of channels changes, the residual goes through a
    1x1 convolution and a BatchNorm, named `conv_proj` and `norm_proj` as in Flax.
    """

    conv_0: ChannelsLastConv2d
    # `fold_into`: the convolution whose output each norm takes (fold_batch_norms).
    norm_0: BatchNorm = eqx.field(metadata={"fold_into": "conv_0"})
    conv_1: ChannelsLastConv2d
    norm_1: BatchNorm = eqx.field(metadata={"fold_into": "conv_1"})
    conv_proj: ChannelsLastConv2d | None = eqx.field(
        metadata={"flax_name": "conv_proj"}
    )
    norm_proj: BatchNorm | None = eqx.field(
        metadata={"flax_name": "norm_proj", "fold_into": "conv_proj"}
    )
    channels_last: bool = eqx.field(static=True)

    _last_norm: ClassVar[str] = "norm_1"

    def __init__(
        self,
        in_channels: int,
        filters: int,
        stride: int = 1,
        *,
        axis_name: str | None = "batch",
        channels_last: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`, `filters`: channels in and out.
        - `stride`: of the first convolution (and the projection).
        - `axis_name`: the vmap axis the BatchNorm statistics are taken over.
        - `channels_last`: the layout of the activations, `(h, w, c)` if True.
        - `key`: for the initial weights (Flax's initialisers, see the module).
        """

        def build(key):
            k0, k1, k2 = split_keys(key, 3)
            project = stride != 1 or in_channels != filters
            return dict(
                conv_0=_conv(in_channels, filters, 3, stride, key=k0),
                norm_0=_norm(filters, axis_name, channels_last),
                conv_1=_conv(filters, filters, 3, key=k1),
                norm_1=_norm(filters, axis_name, channels_last),
                conv_proj=_conv(in_channels, filters, 1, stride, key=k2)
                if project
                else None,
                norm_proj=_norm(filters, axis_name, channels_last) if project else None,
            )

        for name, value in initialise(build, key, _flax_init).items():
            setattr(self, name, value)
        self.channels_last = channels_last

    def _branch(self):
        return (self.conv_0, self.norm_0), (self.conv_1, self.norm_1)

    def _projection(self):
        if self.conv_proj is None or self.norm_proj is None:
            return None
        return self.conv_proj, self.norm_proj


class ResNet(AbstractResNet):
    """ResNet v1 with basic blocks, as Flax's ImageNet example (`ResNet18`, ...).

    `conv_init` (7x7, stride 2, padding 3) -> `bn_init` -> relu -> 3x3 max pool
    (stride 2, "SAME") -> blocks -> mean over space -> `Dense` head.

    !!! Example

        ```python
        model, state = eqx.nn.make_with_state(ResNet18)(num_classes=10,
                                                        num_filters=16, key=key)
        batched = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                           out_axes=(0, None))
        logits, state = batched(images, state)  # images: (batch, 3, H, W)
        ```
    """

    conv_init: ChannelsLastConv2d = eqx.field(metadata={"flax_name": "conv_init"})
    bn_init: BatchNorm = eqx.field(
        metadata={"flax_name": "bn_init", "fold_into": "conv_init"}
    )
    blocks: tuple[ResNetBlock, ...]
    head: eqx.nn.Linear
    stage_sizes: tuple[int, ...] = eqx.field(static=True)
    channels_last: bool = eqx.field(static=True)

    _pool_padding: ClassVar[str] = "SAME"

    def __init__(
        self,
        stage_sizes: Sequence[int],
        num_classes: int,
        *,
        num_filters: int = 64,
        in_channels: int = 3,
        axis_name: str | None = "batch",
        channels_last: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `stage_sizes`: blocks per stage, e.g. `(2, 2, 2, 2)` for ResNet-18. Stage
            `i` has `num_filters * 2**i` channels; its first block has stride 2
            (except in the first stage).
        - `num_classes`: outputs of the head.
        - `num_filters`: channels of the stem and the first stage (64 in the
            ImageNet model; e.g. 16 for a small CIFAR-sized model).
        - `in_channels`: channels of the images.
        - `axis_name`: the vmap axis the BatchNorm statistics are taken over.
        - `channels_last`: take images as `(height, width, channels)`, as Flax
            does, instead of `(channels, height, width)`. Either way the layers
            compute channels last (a channels-first image is moved once, at the
            input), so the parameters, the state and the logits are the same.
        - `key`: for the initial weights (Flax's initialisers, see the module),
            drawn without compiling anything: the model builds in about a second.
        """
        if not stage_sizes or any(n <= 0 for n in stage_sizes):
            raise ValueError(
                f"ResNet: stage_sizes must be positive block counts, got {stage_sizes}."
            )
        stages, channels = stage_plan(stage_sizes, num_filters, expansion=1)

        def build(key):
            keys = iter(split_keys(key, 2 + sum(stage_sizes)))
            conv = ChannelsLastConv2d(
                in_channels,
                num_filters,
                7,
                2,
                padding=3,
                use_bias=False,
                key=next(keys),
            )
            blocks = tuple(
                ResNetBlock(
                    cin,
                    filters,
                    stride,
                    axis_name=axis_name,
                    channels_last=True,
                    key=next(keys),
                )
                for stage in stages
                for cin, filters, stride in stage
            )
            head = eqx.nn.Linear(channels, num_classes, key=next(keys))
            return dict(
                conv_init=conv,
                bn_init=_norm(num_filters, axis_name, True),
                blocks=blocks,
                head=head,
            )

        for name, value in initialise(build, key, _flax_init).items():
            setattr(self, name, value)
        self.stage_sizes = tuple(stage_sizes)
        self.channels_last = channels_last

    def _stem(self):
        return self.conv_init, self.bn_init

    def _blocks(self):
        return self.blocks

    def _head(self):
        return self.head


def ResNet18(
    num_classes: int, *, num_filters: int = 64, key: PRNGKeyArray, **kwargs
) -> ResNet:
    """ResNet-18: `ResNet((2, 2, 2, 2), num_classes, ...)`, as Flax's `ResNet18`.

    `ResNet18(10, num_filters=16, key=key)` is a small CIFAR-sized variant.
    """
    return ResNet((2, 2, 2, 2), num_classes, num_filters=num_filters, key=key, **kwargs)


def ResNet34(
    num_classes: int, *, num_filters: int = 64, key: PRNGKeyArray, **kwargs
) -> ResNet:
    """ResNet-34: `ResNet((3, 4, 6, 3), num_classes, ...)`, as Flax's `ResNet34`."""
    return ResNet((3, 4, 6, 3), num_classes, num_filters=num_filters, key=key, **kwargs)

"""Equinox ResNets laid out as torchvision's (`torchvision.models.resnet18`, ...).

Every field is named as the submodule of torchvision's model, so that the model's
leaves pair with a torchvision `state_dict()` without a mapping: `conv1`, `bn1`,
`layer1` ... `layer4` (tuples of blocks: `layer1.0.conv1.weight`), each block's
`conv1`/`bn1`/`conv2`/`bn2` (and `conv3`/`bn3` in a bottleneck), `downsample`
(`downsample.0` the 1x1 convolution, `downsample.1` its BatchNorm), and the head
`fc`. Each BatchNorm declares the convolution it follows (`fold_into`), so
`eqx_bn.fold_batch_norms` folds all of them for inference. Layers without
parameters (`relu`, `maxpool`, `avgpool`) are functions. The forward pass and the
stage layout are those of `_resnet.py`, shared with the Flax-named `ResNet`.

The BatchNorms have PyTorch's semantics: `momentum=0.9` (PyTorch's 0.1), `eps=1e-5`
and the unbiased running variance (`unbiased_running_var=True`), so a training step
updates the running statistics exactly as `torch.nn.BatchNorm2d` does.

The initial weights follow torchvision's: `kaiming_normal_(mode="fan_out",
nonlinearity="relu")` for the convolutions (a normal of variance 2 / fan-out),
BatchNorm weight 1 and bias 0 (weight 0 for the last norm of each block with
`zero_init_residual=True`), and `nn.Linear`'s default for `fc` (weight and bias
uniform on +-1/sqrt(in_features)).

One example at a time under `jax.vmap(..., axis_name="batch")`, images channels
first `(3, H, W)` as PyTorch's, or channels last with `channels_last=True`.
"""

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

from .._batch_norm import BatchNorm
from .._conv import ChannelsLastConv, ChannelsLastConv2d
from ._init import (
    Distribution,
    Normal,
    Rule,
    Uniform,
    batch_norm_init,
    fans,
    initialise,
)
from ._resnet import AbstractBlock, AbstractResNet, split_keys, stage_plan


def _torchvision_init(zero: str | None) -> Rule:
    """torchvision's initialisers; the BatchNorms in fields named `zero` (the last
    of each block, with `zero_init_residual=True`) start with weight 0."""

    def rule(names: tuple[str, ...], owners: tuple) -> Distribution:
        layer = owners[-1]
        if isinstance(layer, ChannelsLastConv):
            return Normal(math.sqrt(2.0 / fans(layer)[1]))
        if isinstance(layer, eqx.nn.Linear):
            return Uniform(1 / math.sqrt(layer.in_features))
        return batch_norm_init(names, owners, zero=zero)

    return rule


def _conv(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    *,
    key: PRNGKeyArray,
) -> ChannelsLastConv2d:
    """`nn.Conv2d(in, out, kernel, stride, padding=kernel // 2, groups=groups,
    bias=False)`."""
    return ChannelsLastConv2d(
        in_channels,
        out_channels,
        kernel,
        stride,
        padding=kernel // 2,
        groups=groups,
        use_bias=False,
        key=key,
    )


def _bn(channels: int, axis_name: str | None) -> BatchNorm:
    """`nn.BatchNorm2d(channels)`: PyTorch's momentum 0.1, eps 1e-5, unbiased
    running variance; channels last, as the activations inside the network."""
    return BatchNorm(
        channels,
        axis_name,
        momentum=0.9,
        eps=1e-5,
        channels_last=True,
        unbiased_running_var=True,
    )


class Downsample(eqx.Module):
    """torchvision's `downsample`, `nn.Sequential(conv1x1, BatchNorm2d)`: the
    residual's projection where a block changes the shape. Its fields are named
    `0` and `1` in PyTorch."""

    conv: ChannelsLastConv2d = eqx.field(metadata={"torch_name": "0"})
    bn: BatchNorm = eqx.field(metadata={"torch_name": "1", "fold_into": "conv"})

    def __call__(
        self, x: Float[Array, "h w c"], state: eqx.nn.State, *, inference: bool | None
    ) -> tuple[Float[Array, "h2 w2 c2"], eqx.nn.State]:
        """The projected residual: the 1x1 convolution, then the BatchNorm.

        **Arguments:**

        - `x`: one example, channels last, `(height, width, in_channels)`.
        - `state`: holds the BatchNorm's running statistics.
        - `inference`: use the running statistics; `None` follows the layer's own
            flag.

        **Returns:**

        `(y, state)`: `y` of shape `(ceil(height / stride), ceil(width / stride),
        out_channels)`, with the convolution's stride and output channels; `state`
        with the new running statistics.
        """
        return self.bn(self.conv(x), state, inference=inference)


def _downsample(
    in_channels: int,
    out_channels: int,
    stride: int,
    axis_name: str | None,
    key: PRNGKeyArray,
) -> Downsample | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return Downsample(
        _conv(in_channels, out_channels, 1, stride, key=key),
        _bn(out_channels, axis_name),
    )


class _TorchBlock(AbstractBlock):
    """What torchvision's two blocks share: channels last inside the network, and
    the projection in `downsample`."""

    downsample: eqx.AbstractVar[Downsample | None]

    channels_last: ClassVar[bool] = True

    def _projection(self):
        if self.downsample is None:
            return None
        return self.downsample.conv, self.downsample.bn


class BasicBlock(_TorchBlock):
    """torchvision's `BasicBlock`: 3x3 conv (with the stride), BN, relu, 3x3 conv,
    BN, plus the residual (through `downsample` where the shape changes), relu.

    It works channels last, as inside [`eqx_bn.models.TorchResNet`][]: one example
    `(height, width, in_channels)` in, `(ceil(height / stride), ceil(width /
    stride), planes)` out.

    `BasicBlock.expansion = 1` (a class variable, as torchvision's): the block's
    output has `planes * expansion` channels.
    """

    conv1: ChannelsLastConv2d
    bn1: BatchNorm = eqx.field(metadata={"fold_into": "conv1"})
    conv2: ChannelsLastConv2d
    bn2: BatchNorm = eqx.field(metadata={"fold_into": "conv2"})
    downsample: Downsample | None

    expansion: ClassVar[int] = 1
    _last_norm: ClassVar[str] = "bn2"

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        axis_name: str | None = "batch",
        zero_init_residual: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`: channels in (torchvision's `inplanes`).
        - `planes`: channels out.
        - `stride`: of `conv1` and `downsample`.
        - `groups`, `base_width`: accepted as torchvision's block accepts them,
            and only at their defaults 1 and 64.
        - `axis_name`: the vmap axis the BatchNorm statistics are taken over.
        - `zero_init_residual`: start `bn2`'s scale at zero, as torchvision's
            option of the same name.
        - `key`: for the initial weights (torchvision's, see the module).

        **Raises:**

        - `ValueError`: for `groups` other than 1 or `base_width` other than 64,
            as torchvision.
        """
        if groups != 1 or base_width != 64:
            raise ValueError(
                "BasicBlock: only groups=1 and base_width=64 (width_per_group=64), "
                f"as in torchvision; got groups={groups}, base_width={base_width}. "
                "ResNeXt and wide ResNets use block='bottleneck'."
            )

        def build(key):
            k1, k2, k3 = split_keys(key, 3)
            return dict(
                conv1=_conv(in_channels, planes, 3, stride, key=k1),
                bn1=_bn(planes, axis_name),
                conv2=_conv(planes, planes, 3, key=k2),
                bn2=_bn(planes, axis_name),
                downsample=_downsample(in_channels, planes, stride, axis_name, k3),
            )

        rule = _torchvision_init(self._last_norm if zero_init_residual else None)
        for name, value in initialise(build, key, rule).items():
            setattr(self, name, value)

    def _branch(self):
        return (self.conv1, self.bn1), (self.conv2, self.bn2)


class Bottleneck(_TorchBlock):
    """torchvision's `Bottleneck` (ResNet v1.5): 1x1 conv, BN, relu, 3x3 conv (with
    the stride, in `groups` groups), BN, relu, 1x1 conv to `4 * planes`, BN, plus
    the residual, relu.

    It works channels last, as inside [`eqx_bn.models.TorchResNet`][]: one example
    `(height, width, in_channels)` in, `(ceil(height / stride), ceil(width /
    stride), 4 * planes)` out.

    `Bottleneck.expansion = 4` (a class variable, as torchvision's): the block's
    output has `planes * expansion` channels.
    """

    conv1: ChannelsLastConv2d
    bn1: BatchNorm = eqx.field(metadata={"fold_into": "conv1"})
    conv2: ChannelsLastConv2d
    bn2: BatchNorm = eqx.field(metadata={"fold_into": "conv2"})
    conv3: ChannelsLastConv2d
    bn3: BatchNorm = eqx.field(metadata={"fold_into": "conv3"})
    downsample: Downsample | None

    expansion: ClassVar[int] = 4
    _last_norm: ClassVar[str] = "bn3"

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        axis_name: str | None = "batch",
        zero_init_residual: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        As [`eqx_bn.models.BasicBlock`][]; the output has `4 * planes` channels
        and the stride is on `conv2`, as in torchvision. `conv1`, `conv2` and
        `bn1`, `bn2` have `int(planes * base_width / 64) * groups` channels and
        `conv2` runs in `groups` groups (torchvision's `groups` and `base_width`:
        ResNeXt-50 32x4d is `groups=32, base_width=4`, Wide ResNet-50-2
        `base_width=128`).

        **Raises:**

        - `ValueError`: if that width is not a positive multiple of `groups`.
        """
        width = int(planes * (base_width / 64.0)) * groups
        if width <= 0:
            raise ValueError(
                f"Bottleneck: int(planes * base_width / 64) * groups = {width} "
                f"channels inside the block (planes={planes}, base_width="
                f"{base_width}, groups={groups}); make planes * base_width at least 64."
            )
        out = planes * self.expansion

        def build(key):
            k1, k2, k3, k4 = split_keys(key, 4)
            return dict(
                conv1=_conv(in_channels, width, 1, key=k1),
                bn1=_bn(width, axis_name),
                conv2=_conv(width, width, 3, stride, groups, key=k2),
                bn2=_bn(width, axis_name),
                conv3=_conv(width, out, 1, key=k3),
                bn3=_bn(out, axis_name),
                downsample=_downsample(in_channels, out, stride, axis_name, k4),
            )

        rule = _torchvision_init(self._last_norm if zero_init_residual else None)
        for name, value in initialise(build, key, rule).items():
            setattr(self, name, value)

    def _branch(self):
        return (self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class TorchResNet(AbstractResNet):
    """torchvision's `ResNet`, with its module names and PyTorch's BatchNorm.

    `conv1` (7x7, stride 2, padding 3) -> `bn1` -> relu -> 3x3 max pool (stride 2,
    padding 1) -> `layer1` ... `layer4` -> mean over space -> `fc`.

    !!! Example

        ```python
        model, state = eqx.nn.make_with_state(eqx_bn.models.TorchResNet18)(
            num_classes=10, key=key)
        batched = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                           out_axes=(0, None))
        logits, state = batched(images, state)  # images: (batch, 3, H, W)
        ```
    """

    conv1: ChannelsLastConv2d
    bn1: BatchNorm = eqx.field(metadata={"fold_into": "conv1"})
    layer1: tuple[BasicBlock | Bottleneck, ...]
    layer2: tuple[BasicBlock | Bottleneck, ...]
    layer3: tuple[BasicBlock | Bottleneck, ...]
    layer4: tuple[BasicBlock | Bottleneck, ...]
    fc: eqx.nn.Linear
    block: str = eqx.field(static=True)
    layers: tuple[int, int, int, int] = eqx.field(static=True)
    channels_last: bool = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    width_per_group: int = eqx.field(static=True)

    _pool_padding: ClassVar[tuple[tuple[int, int], ...]] = ((1, 1), (1, 1), (0, 0))

    def __init__(
        self,
        block: Literal["basic", "bottleneck"],
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        width: int = 64,
        groups: int = 1,
        width_per_group: int = 64,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        axis_name: str | None = "batch",
        channels_last: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `block`: `"basic"` ([`eqx_bn.models.BasicBlock`][], ResNet-18/34) or
            `"bottleneck"` ([`eqx_bn.models.Bottleneck`][], ResNet-50/101/152).
        - `layers`: blocks in `layer1` ... `layer4`, e.g. `(2, 2, 2, 2)`.
        - `num_classes`: outputs of `fc`.
        - `width`: channels of the stem and `layer1`'s planes (64 in torchvision;
            `layerN` has `width * 2**(N-1)` planes). Smaller for tiny test nets.
        - `groups`, `width_per_group`: torchvision's, for ResNeXt and wide
            ResNets (bottleneck blocks only): the 3x3 convolution of a block runs
            in `groups` groups over `int(planes * width_per_group / 64) * groups`
            channels. See [`eqx_bn.models.TorchResNeXt50_32x4d`][] and
            [`eqx_bn.models.TorchWideResNet50_2`][].
        - `in_channels`: channels of the images.
        - `zero_init_residual`: start the last BatchNorm scale of every block at
            zero, as torchvision's option.
        - `axis_name`: the vmap axis the BatchNorm statistics are taken over.
        - `channels_last`: take images as `(height, width, channels)` instead of
            PyTorch's `(channels, height, width)`. The parameters, the state and
            the logits are the same either way.
        - `key`: for the initial weights (torchvision's initialisation, see the
            module), drawn without compiling anything: a ResNet-50 builds in
            about a second.

        **Raises:**

        - `ValueError`: for an unknown `block`, `layers` that are not four
            positive counts, or `groups`/`width_per_group` other than 1/64 with
            basic blocks.
        """
        if block not in _BLOCKS:
            raise ValueError(
                f"TorchResNet: block must be 'basic' or 'bottleneck', got {block!r}."
            )
        if len(layers) != 4 or any(n <= 0 for n in layers):
            raise ValueError(
                "TorchResNet: layers must be four positive block counts (layer1 .. "
                f"layer4), got {tuple(layers)}."
            )
        kind = _BLOCKS[block]
        stages, channels = stage_plan(layers, width, kind.expansion)

        def build(key):
            keys = iter(split_keys(key, 2 + sum(layers)))
            conv = _conv(in_channels, width, 7, 2, key=next(keys))
            blocks = tuple(
                tuple(
                    kind(
                        cin,
                        planes,
                        stride,
                        groups=groups,
                        base_width=width_per_group,
                        axis_name=axis_name,
                        zero_init_residual=zero_init_residual,
                        key=next(keys),
                    )
                    for cin, planes, stride in stage
                )
                for stage in stages
            )
            fc = eqx.nn.Linear(channels, num_classes, key=next(keys))
            layer1, layer2, layer3, layer4 = blocks
            return dict(
                conv1=conv,
                bn1=_bn(width, axis_name),
                layer1=layer1,
                layer2=layer2,
                layer3=layer3,
                layer4=layer4,
                fc=fc,
            )

        rule = _torchvision_init(kind._last_norm if zero_init_residual else None)
        for name, value in initialise(build, key, rule).items():
            setattr(self, name, value)
        self.block = block
        self.layers = tuple(int(n) for n in layers)
        self.channels_last = channels_last
        self.groups = groups
        self.width_per_group = width_per_group

    def _stem(self):
        return self.conv1, self.bn1

    def _blocks(self):
        return self.layer1 + self.layer2 + self.layer3 + self.layer4

    def _head(self):
        return self.fc


def TorchResNet18(
    num_classes: int = 1000, *, key: PRNGKeyArray, **kwargs
) -> TorchResNet:
    """`torchvision.models.resnet18`: `TorchResNet("basic", (2, 2, 2, 2), ...)`."""
    return TorchResNet("basic", (2, 2, 2, 2), num_classes, key=key, **kwargs)


def TorchResNet34(
    num_classes: int = 1000, *, key: PRNGKeyArray, **kwargs
) -> TorchResNet:
    """`torchvision.models.resnet34`: `TorchResNet("basic", (3, 4, 6, 3), ...)`."""
    return TorchResNet("basic", (3, 4, 6, 3), num_classes, key=key, **kwargs)


def TorchResNet50(
    num_classes: int = 1000, *, key: PRNGKeyArray, **kwargs
) -> TorchResNet:
    """`torchvision.models.resnet50`: `TorchResNet("bottleneck", (3, 4, 6, 3), ...)`."""
    return TorchResNet("bottleneck", (3, 4, 6, 3), num_classes, key=key, **kwargs)


def TorchResNeXt50_32x4d(
    num_classes: int = 1000, *, key: PRNGKeyArray, **kwargs
) -> TorchResNet:
    """`torchvision.models.resnext50_32x4d`: `TorchResNet("bottleneck",
    (3, 4, 6, 3), ..., groups=32, width_per_group=4)`."""
    return TorchResNet(
        "bottleneck",
        (3, 4, 6, 3),
        num_classes,
        groups=32,
        width_per_group=4,
        key=key,
        **kwargs,
    )


def TorchWideResNet50_2(
    num_classes: int = 1000, *, key: PRNGKeyArray, **kwargs
) -> TorchResNet:
    """`torchvision.models.wide_resnet50_2`: `TorchResNet("bottleneck",
    (3, 4, 6, 3), ..., width_per_group=128)`, twice the channels inside each
    block."""
    return TorchResNet(
        "bottleneck", (3, 4, 6, 3), num_classes, width_per_group=128, key=key, **kwargs
    )

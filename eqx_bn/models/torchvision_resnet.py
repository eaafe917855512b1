"""Equinox ResNets laid out as torchvision's (`torchvision.models.resnet18`, ...).

Every field is named as the submodule of torchvision's model, so that the model's
leaves pair with a torchvision `state_dict()` without a mapping: `conv1`, `bn1`,
`layer1` ... `layer4` (tuples of blocks: `layer1.0.conv1.weight`), each block's
`conv1`/`bn1`/`conv2`/`bn2` (and `conv3`/`bn3` in a bottleneck), `downsample`
(`downsample.0` the 1x1 convolution, `downsample.1` its BatchNorm), and the head
`fc`. Each BatchNorm declares the convolution it follows (`fold_into`), so
`eqx_bn.fold_batch_norms` folds all of them for inference. Layers without
parameters (`relu`, `maxpool`, `avgpool`) are functions.

The BatchNorms have PyTorch's semantics: `momentum=0.9` (PyTorch's 0.1), `eps=1e-5`
and the unbiased running variance (`unbiased_running_var=True`), so a training step
updates the running statistics exactly as `torch.nn.BatchNorm2d` does.

One example at a time under `jax.vmap(..., axis_name="batch")`, images channels
first `(3, H, W)` as PyTorch's, or channels last with `channels_last=True`. Inside,
the network runs channels last, the layout of XLA's convolutions, whatever the input.
"""

from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from .._batch_norm import BatchNorm
from .._typing import typecheck
from ._layout import channels_last_conv, check_image

# torchvision initialises its convolutions with `kaiming_normal_(mode="fan_out",
# nonlinearity="relu")`: an untruncated normal of variance 2 / fan_out.
_conv_init = jax.nn.initializers.variance_scaling(
    2.0, "fan_out", "normal", in_axis=1, out_axis=0
)


def _conv(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    *,
    key: PRNGKeyArray,
) -> eqx.nn.Conv2d:
    """`nn.Conv2d(in, out, kernel, stride, padding=kernel // 2, bias=False)`."""
    conv = eqx.nn.Conv2d(
        in_channels,
        out_channels,
        kernel,
        stride,
        padding=kernel // 2,
        use_bias=False,
        key=key,
    )
    weight = _conv_init(key, conv.weight.shape, conv.weight.dtype)
    return eqx.tree_at(lambda c: c.weight, conv, weight)


def _bn(channels: int, axis_name: str | None, zero: bool = False) -> BatchNorm:
    """`nn.BatchNorm2d(channels)`: PyTorch's momentum 0.1, eps 1e-5, unbiased
    running variance; channels last, as the activations inside the network."""
    return BatchNorm(
        channels,
        axis_name,
        momentum=0.9,
        eps=1e-5,
        channels_last=True,
        unbiased_running_var=True,
        scale_init=jax.nn.initializers.zeros if zero else jax.nn.initializers.ones,
    )


def _max_pool(x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 c"]:
    """`nn.MaxPool2d(kernel_size=3, stride=2, padding=1)` on one channels-last
    example: one row/column of padding on *each* side (not XLA's "SAME")."""
    # A Python scalar init: under jit an array init is a tracer, and reduce_window
    # then falls back to a form with no reverse-mode rule.
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (3, 3, 1), (2, 2, 1), ((1, 1), (1, 1), (0, 0))
    )


class Downsample(eqx.Module):
    """torchvision's `downsample`, `nn.Sequential(conv1x1, BatchNorm2d)`: the
    residual's projection where a block changes the shape. Its fields are named
    `0` and `1` in PyTorch."""

    conv: eqx.nn.Conv2d = eqx.field(metadata={"torch_name": "0"})
    bn: BatchNorm = eqx.field(metadata={"torch_name": "1", "fold_into": "conv"})

    def __call__(
        self, x: Float[Array, "h w c"], state: eqx.nn.State, *, inference: bool | None
    ) -> tuple[Float[Array, "h2 w2 c2"], eqx.nn.State]:
        return self.bn(channels_last_conv(self.conv, x), state, inference=inference)


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


def _residual(
    downsample: Downsample | None,
    x: Array,
    state: eqx.nn.State,
    inference: bool | None,
) -> tuple[Array, eqx.nn.State]:
    if downsample is None:
        return x, state
    return downsample(x, state, inference=inference)


class BasicBlock(eqx.Module):
    """torchvision's `BasicBlock`: 3x3 conv (with the stride), BN, relu, 3x3 conv,
    BN, plus the residual (through `downsample` where the shape changes), relu."""

    conv1: eqx.nn.Conv2d
    bn1: BatchNorm = eqx.field(metadata={"fold_into": "conv1"})
    conv2: eqx.nn.Conv2d
    bn2: BatchNorm = eqx.field(metadata={"fold_into": "conv2"})
    downsample: Downsample | None

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        axis_name: str | None = "batch",
        zero_init_residual: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`: channels in (torchvision's `inplanes`).
        - `planes`: channels out.
        - `stride`: of `conv1` and `downsample`.
        - `axis_name`: the vmap axis the BatchNorm statistics are taken over.
        - `zero_init_residual`: start `bn2`'s scale at zero, as torchvision's
            option of the same name.
        - `key`: for the initial weights.
        """
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = _conv(in_channels, planes, 3, stride, key=k1)
        self.bn1 = _bn(planes, axis_name)
        self.conv2 = _conv(planes, planes, 3, key=k2)
        self.bn2 = _bn(planes, axis_name, zero=zero_init_residual)
        self.downsample = _downsample(in_channels, planes, stride, axis_name, k3)

    def __call__(
        self, x: Float[Array, "h w c"], state: eqx.nn.State, *, inference: bool | None
    ) -> tuple[Float[Array, "h2 w2 c2"], eqx.nn.State]:
        y, state = self.bn1(
            channels_last_conv(self.conv1, x), state, inference=inference
        )
        y = channels_last_conv(self.conv2, jax.nn.relu(y))
        y, state = self.bn2(y, state, inference=inference)
        residual, state = _residual(self.downsample, x, state, inference)
        return jax.nn.relu(y + residual), state


class Bottleneck(eqx.Module):
    """torchvision's `Bottleneck` (ResNet v1.5): 1x1 conv, BN, relu, 3x3 conv (with
    the stride), BN, relu, 1x1 conv to `4 * planes`, BN, plus the residual, relu."""

    conv1: eqx.nn.Conv2d
    bn1: BatchNorm = eqx.field(metadata={"fold_into": "conv1"})
    conv2: eqx.nn.Conv2d
    bn2: BatchNorm = eqx.field(metadata={"fold_into": "conv2"})
    conv3: eqx.nn.Conv2d
    bn3: BatchNorm = eqx.field(metadata={"fold_into": "conv3"})
    downsample: Downsample | None

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        axis_name: str | None = "batch",
        zero_init_residual: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        As [`eqx_bn.models.BasicBlock`][]; the output has `4 * planes` channels
        and the stride is on `conv2`, as in torchvision.
        """
        k1, k2, k3, k4 = jax.random.split(key, 4)
        out = planes * self.expansion
        self.conv1 = _conv(in_channels, planes, 1, key=k1)
        self.bn1 = _bn(planes, axis_name)
        self.conv2 = _conv(planes, planes, 3, stride, key=k2)
        self.bn2 = _bn(planes, axis_name)
        self.conv3 = _conv(planes, out, 1, key=k3)
        self.bn3 = _bn(out, axis_name, zero=zero_init_residual)
        self.downsample = _downsample(in_channels, out, stride, axis_name, k4)

    def __call__(
        self, x: Float[Array, "h w c"], state: eqx.nn.State, *, inference: bool | None
    ) -> tuple[Float[Array, "h2 w2 c2"], eqx.nn.State]:
        y, state = self.bn1(
            channels_last_conv(self.conv1, x), state, inference=inference
        )
        y = channels_last_conv(self.conv2, jax.nn.relu(y))
        y, state = self.bn2(y, state, inference=inference)
        y = channels_last_conv(self.conv3, jax.nn.relu(y))
        y, state = self.bn3(y, state, inference=inference)
        residual, state = _residual(self.downsample, x, state, inference)
        return jax.nn.relu(y + residual), state


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class TorchResNet(eqx.Module):
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

    conv1: eqx.nn.Conv2d
    bn1: BatchNorm = eqx.field(metadata={"fold_into": "conv1"})
    layer1: tuple[BasicBlock | Bottleneck, ...]
    layer2: tuple[BasicBlock | Bottleneck, ...]
    layer3: tuple[BasicBlock | Bottleneck, ...]
    layer4: tuple[BasicBlock | Bottleneck, ...]
    fc: eqx.nn.Linear
    block: str = eqx.field(static=True)
    layers: tuple[int, int, int, int] = eqx.field(static=True)
    channels_last: bool = eqx.field(static=True)

    def __init__(
        self,
        block: Literal["basic", "bottleneck"],
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        width: int = 64,
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
        - `in_channels`: channels of the images.
        - `zero_init_residual`: start the last BatchNorm scale of every block at
            zero, as torchvision's option.
        - `axis_name`: the vmap axis the BatchNorm statistics are taken over.
        - `channels_last`: take images as `(height, width, channels)` instead of
            PyTorch's `(channels, height, width)`. The parameters, the state and
            the logits are the same either way.
        - `key`: for the initial weights (torchvision's initialisation: He normal
            with fan-out for the convolutions, PyTorch's default for `fc`).
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
        keys = iter(jax.random.split(key, 2 + sum(layers)))
        self.conv1 = _conv(in_channels, width, 7, 2, key=next(keys))
        self.bn1 = _bn(width, axis_name)
        channels = width
        stages = []
        for i, size in enumerate(layers):
            planes = width * 2**i
            stage = []
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(
                    kind(
                        channels,
                        planes,
                        stride,
                        axis_name=axis_name,
                        zero_init_residual=zero_init_residual,
                        key=next(keys),
                    )
                )
                channels = planes * kind.expansion
            stages.append(tuple(stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = eqx.nn.Linear(channels, num_classes, key=next(keys))
        self.block = block
        self.layers = tuple(int(n) for n in layers)
        self.channels_last = channels_last

    @typecheck
    def __call__(
        self,
        x: Float[Array, "channels height width"]
        | Float[Array, "height width channels"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, " num_classes"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, or
            `(height, width, channels)` for a `channels_last` model.
        - `state`: the running statistics of every BatchNorm.
        - `key`: unused.
        - `inference`: use the running statistics (PyTorch's `model.eval()`;
            default: the layers' flags, set with `eqx.nn.inference_mode`).

        **Returns:**

        `(logits, state)`.
        """
        del key
        check_image(type(self).__name__, x, self.conv1.in_channels, self.channels_last)
        if not self.channels_last:
            x = jnp.moveaxis(x, 0, -1)
        x = channels_last_conv(self.conv1, x)
        x, state = self.bn1(x, state, inference=inference)
        x = _max_pool(jax.nn.relu(x))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x, state = block(x, state, inference=inference)
        return self.fc(jnp.mean(x, axis=(0, 1))), state


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

"""An Equinox ResNet (v1) that mirrors `examples/imagenet/models.py` of Flax.

One example at a time under `jax.vmap(..., axis_name="batch")`, images channels first
by default or channels last (Flax's layout) with `channels_last=True`. Inside, the
network always runs channels last, the layout of XLA's convolutions, so neither input
layout pays transposes around the convolutions. The module tree pairs with the Flax
example's variables by the automatic naming of `eqx_bn.interop`: `conv_init`,
`bn_init`, `ResNetBlock_0 ... ResNetBlock_N` (each with `Conv_0`, `BatchNorm_0`,
`Conv_1`, `BatchNorm_1` and, where the shape changes, `conv_proj`, `norm_proj`), and
the head `Dense_0`.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from .._batch_norm import BatchNorm
from .._typing import typecheck
from ._layout import channels_last_conv, check_image


def _conv(module: eqx.nn.Conv, x: Array, channels_last: bool) -> Array:
    return channels_last_conv(module, x) if channels_last else module(x)


def _norm(
    features: int, axis_name: str | None, channels_last: bool, **kwargs
) -> BatchNorm:
    # The Flax example's `norm`: momentum 0.9, epsilon 1e-5.
    return BatchNorm(
        features,
        axis_name,
        momentum=0.9,
        eps=1e-5,
        channels_last=channels_last,
        **kwargs,
    )


def _max_pool(x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 c"]:
    """`nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")` on one example,
    channels last.

    XLA's "SAME" puts the odd padding element at the end, as Flax does; an explicit
    symmetric `padding=1` would shift the windows on even inputs.
    """
    # A Python scalar init, not a jnp array: under jit an array init is a tracer,
    # and reduce_window then falls back to a form with no reverse-mode rule.
    return lax.reduce_window(x, -jnp.inf, lax.max, (3, 3, 1), (2, 2, 1), "SAME")


class ResNetBlock(eqx.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection.

    When the stride or the number of channels changes, the residual goes through a
    1x1 convolution and a BatchNorm, named `conv_proj` and `norm_proj` as in Flax.
    """

    conv_0: eqx.nn.Conv2d
    # `fold_into`: the convolution whose output each norm takes (fold_batch_norms).
    norm_0: BatchNorm = eqx.field(metadata={"fold_into": "conv_0"})
    conv_1: eqx.nn.Conv2d
    norm_1: BatchNorm = eqx.field(metadata={"fold_into": "conv_1"})
    conv_proj: eqx.nn.Conv2d | None = eqx.field(metadata={"flax_name": "conv_proj"})
    norm_proj: BatchNorm | None = eqx.field(
        metadata={"flax_name": "norm_proj", "fold_into": "conv_proj"}
    )
    channels_last: bool = eqx.field(static=True)

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
        - `key`: for the initial weights.
        """
        self.channels_last = channels_last
        k0, k1, k2 = jax.random.split(key, 3)
        self.conv_0 = eqx.nn.Conv2d(
            in_channels, filters, 3, stride, padding="SAME", use_bias=False, key=k0
        )
        self.norm_0 = _norm(filters, axis_name, channels_last)
        self.conv_1 = eqx.nn.Conv2d(
            filters, filters, 3, padding="SAME", use_bias=False, key=k1
        )
        # Flax initialises the last scale of a block to zero.
        self.norm_1 = _norm(
            filters, axis_name, channels_last, scale_init=jax.nn.initializers.zeros
        )
        if stride != 1 or in_channels != filters:
            self.conv_proj = eqx.nn.Conv2d(
                in_channels, filters, 1, stride, padding="SAME", use_bias=False, key=k2
            )
            self.norm_proj = _norm(filters, axis_name, channels_last)
        else:
            self.conv_proj = None
            self.norm_proj = None

    @typecheck
    def __call__(
        self,
        x: Float[Array, "height width in_channels"]
        | Float[Array, "in_channels height width"],
        state: eqx.nn.State,
        *,
        inference: bool | None,
    ) -> tuple[
        Float[Array, "new_height new_width filters"]
        | Float[Array, "filters new_height new_width"],
        eqx.nn.State,
    ]:
        last = self.channels_last
        y, state = self.norm_0(_conv(self.conv_0, x, last), state, inference=inference)
        y = _conv(self.conv_1, jax.nn.relu(y), last)
        y, state = self.norm_1(y, state, inference=inference)
        residual = x
        if self.conv_proj is not None and self.norm_proj is not None:
            residual, state = self.norm_proj(
                _conv(self.conv_proj, x, last), state, inference=inference
            )
        return jax.nn.relu(residual + y), state


class ResNet(eqx.Module):
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

    conv_init: eqx.nn.Conv2d = eqx.field(metadata={"flax_name": "conv_init"})
    bn_init: BatchNorm = eqx.field(
        metadata={"flax_name": "bn_init", "fold_into": "conv_init"}
    )
    blocks: tuple[ResNetBlock, ...]
    head: eqx.nn.Linear
    stage_sizes: tuple[int, ...] = eqx.field(static=True)
    channels_last: bool = eqx.field(static=True)

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
        - `key`: for the initial weights.
        """
        if not stage_sizes or any(n <= 0 for n in stage_sizes):
            raise ValueError(
                f"ResNet: stage_sizes must be positive block counts, got {stage_sizes}."
            )
        keys = iter(jax.random.split(key, 2 + sum(stage_sizes)))
        self.conv_init = eqx.nn.Conv2d(
            in_channels, num_filters, 7, 2, padding=3, use_bias=False, key=next(keys)
        )
        # Channels last inside whatever the input layout: XLA's convolutions work
        # channels last, and a channels-first network pays a transpose of its
        # activations in and out of each of them (1.1x Flax's step time on CPU).
        self.bn_init = _norm(num_filters, axis_name, channels_last=True)
        blocks = []
        channels = num_filters
        for i, size in enumerate(stage_sizes):
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                filters = num_filters * 2**i
                blocks.append(
                    ResNetBlock(
                        channels,
                        filters,
                        stride,
                        axis_name=axis_name,
                        channels_last=True,
                        key=next(keys),
                    )
                )
                channels = filters
        self.blocks = tuple(blocks)
        self.head = eqx.nn.Linear(channels, num_classes, key=next(keys))
        self.stage_sizes = tuple(stage_sizes)
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
        - `inference`: use the running statistics (default: the layers' flags,
            set with `eqx.nn.inference_mode`).

        **Returns:**

        `(logits, state)`, the logits of shape `(num_classes,)`.

        **Raises:**

        - `ValueError`: if the image's channel axis is not `in_channels` long.
        """
        del key
        check_image(
            type(self).__name__, x, self.conv_init.in_channels, self.channels_last
        )
        if not self.channels_last:
            x = jnp.moveaxis(x, 0, -1)
        x = channels_last_conv(self.conv_init, x)
        x, state = self.bn_init(x, state, inference=inference)
        x = _max_pool(jax.nn.relu(x))
        for block in self.blocks:
            x, state = block(x, state, inference=inference)
        return self.head(jnp.mean(x, axis=(0, 1))), state


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

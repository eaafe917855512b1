"""The one ResNet code path behind both naming families.

`eqx_bn.models.ResNet` (Flax's names, `resnet.py`) and `eqx_bn.models.TorchResNet`
(torchvision's names, `torchvision_resnet.py`) are the same network under different
field names, so that each pairs with its framework's variables without a mapping.
Each family declares its fields, its layers' settings (padding, BatchNorm flavour)
and its initialisers; the rest is here, once: the forward pass of a residual block
and of the network, and the layout of the stages (channels and strides).

Inside, the network runs channels last, the layout of XLA's convolutions, whatever
the layout of the images: a channels-first network would pay a transpose of its
activations in and out of every convolution (1.1x Flax's step time on CPU). Its
convolutions (`ChannelsLastConv2d`) keep their kernels as XLA reads them too,
`(kh, kw, in, out)`, so no weight is transposed in a step either.
"""

import abc
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from .._batch_norm import BatchNorm
from .._conv import ChannelsLastConv2d
from .._typing import typecheck
from ._inputs import check_image

Padding = str | tuple[tuple[int, int], ...]


def conv_norm(
    conv: ChannelsLastConv2d,
    norm: BatchNorm,
    x: Array,
    state: eqx.nn.State,
    inference: bool | None,
    channels_last: bool,
) -> tuple[Array, eqx.nn.State]:
    """`norm(conv(x))` on one example in either layout (the convolution runs
    channels last)."""
    if channels_last:
        return norm(conv(x), state, inference=inference)
    y = jnp.moveaxis(conv(jnp.moveaxis(x, 0, -1)), -1, 0)
    return norm(y, state, inference=inference)


def max_pool(x: Float[Array, "h w c"], padding: Padding) -> Float[Array, "h2 w2 c"]:
    """The stem's 3x3 max pool of stride 2 on one channels-last example.

    `padding="SAME"` is Flax's `nn.max_pool(..., padding="SAME")`: XLA puts the odd
    element at the end, so an even input is padded (0, 1). torchvision's
    `nn.MaxPool2d(3, 2, padding=1)` pads one on each side: `((1, 1), (1, 1), (0, 0))`.
    """
    # A Python scalar init, not a jnp array: under jit an array init is a tracer,
    # and reduce_window then falls back to a form with no reverse-mode rule.
    return lax.reduce_window(x, -jnp.inf, lax.max, (3, 3, 1), (2, 2, 1), padding)


def stage_plan(
    stage_sizes: Sequence[int], width: int, expansion: int
) -> tuple[list[list[tuple[int, int, int]]], int]:
    """`(in_channels, planes, stride)` of each block, stage by stage, and the
    channels out of the last block. Stage `i` has `width * 2**i` planes; its first
    block has stride 2, except in the first stage; a block puts out
    `planes * expansion` channels (4 in a bottleneck)."""
    stages = []
    channels = width
    for i, size in enumerate(stage_sizes):
        planes = width * 2**i
        stage = []
        for j in range(size):
            stage.append((channels, planes, 2 if i > 0 and j == 0 else 1))
            channels = planes * expansion
        stages.append(stage)
    return stages, channels


def split_keys(key: PRNGKeyArray, n: int) -> list[PRNGKeyArray]:
    """`n` keys for the layers of an abstract build (traced, never compiled)."""
    return list(jax.random.split(key, n))


class AbstractBlock(eqx.Module):
    """A residual block: (convolution, BatchNorm) pairs with a relu between them,
    plus the residual (through a projection where the shape changes), then relu.

    The one forward pass of `ResNetBlock` (Flax), `BasicBlock` and `Bottleneck`
    (torchvision), which differ only in their fields.
    """

    channels_last: eqx.AbstractVar[bool]
    _last_norm: eqx.AbstractClassVar[str]
    """The field holding the last norm of the branch (zero-initialised when the
    family asks for it)."""

    @abc.abstractmethod
    def _branch(self) -> tuple[tuple[ChannelsLastConv2d, BatchNorm], ...]:
        """The (convolution, norm) pairs of the residual branch, in order."""

    @abc.abstractmethod
    def _projection(self) -> tuple[ChannelsLastConv2d, BatchNorm] | None:
        """The residual's (convolution, norm), or None where it is the input."""

    @typecheck
    def __call__(
        self,
        x: Float[Array, "height width in_channels"]
        | Float[Array, "in_channels height width"],
        state: eqx.nn.State,
        *,
        inference: bool | None,
    ) -> tuple[
        Float[Array, "new_height new_width out_channels"]
        | Float[Array, "out_channels new_height new_width"],
        eqx.nn.State,
    ]:
        """One example through the block, under `jax.vmap(..., axis_name="batch")`
        as in the whole network.

        **Arguments:**

        - `x`: one example, `(height, width, in_channels)` if the block is
            `channels_last` (torchvision's blocks always are), else
            `(in_channels, height, width)`.
        - `state`: holds the running statistics of the block's BatchNorms.
        - `inference`: use the running statistics; `None` follows the layers' own
            flags (set with `eqx.nn.inference_mode`).

        **Returns:**

        `(y, state)`: `y` in the layout of `x`, with the block's output channels
        (`filters`; `planes * expansion` in torchvision's blocks) and the height
        and width divided by the stride, rounded up; `state` with the new running
        statistics (unchanged in inference).
        """
        last = self.channels_last
        y = x
        for i, (conv, norm) in enumerate(self._branch()):
            y, state = conv_norm(
                conv, norm, y if i == 0 else jax.nn.relu(y), state, inference, last
            )
        residual = x
        projection = self._projection()
        if projection is not None:
            residual, state = conv_norm(*projection, x, state, inference, last)
        return jax.nn.relu(residual + y), state


class AbstractResNet(eqx.Module):
    """A ResNet v1: stem convolution -> BatchNorm -> relu -> 3x3 max pool of stride
    2 -> residual blocks -> mean over space -> linear head, on one image.

    The one forward pass of `ResNet` (Flax) and `TorchResNet` (torchvision).
    """

    channels_last: eqx.AbstractVar[bool]
    _pool_padding: eqx.AbstractClassVar[Padding]
    """The max pool's padding (see `max_pool`)."""

    @abc.abstractmethod
    def _stem(self) -> tuple[ChannelsLastConv2d, BatchNorm]:
        """The stem's (convolution, norm)."""

    @abc.abstractmethod
    def _blocks(self) -> Sequence[AbstractBlock]:
        """Every residual block, in order."""

    @abc.abstractmethod
    def _head(self) -> eqx.nn.Linear:
        """The classifier."""

    def __call__(
        self,
        x: Float[Array | np.ndarray, "channels height width"]
        | Float[Array | np.ndarray, "height width channels"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, " num_classes"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, or
            `(height, width, channels)` for a `channels_last` model; a JAX or
            NumPy array. A batch goes through `jax.vmap(model,
            axis_name="batch", in_axes=(0, None), out_axes=(0, None))`.
        - `state`: the running statistics of every BatchNorm.
        - `key`: unused.
        - `inference`: use the running statistics (PyTorch's `model.eval()`,
            Flax's `train=False`; default: the layers' flags, set with
            `eqx.nn.inference_mode`).

        **Returns:**

        `(logits, state)`, the logits of shape `(num_classes,)`.

        **Raises:**

        - `ValueError`: if `x` is not one image (a whole batch passed without
            `jax.vmap` is named as such) or its channel axis is not
            `in_channels` long.
        - `TypeError`: if `x` is not a floating JAX or NumPy array.
        """
        del key
        conv, norm = self._stem()
        # Before the type-checked body: these messages name the fix. (A folded
        # model's norms have no axis_name: it needs none.)
        x = check_image(
            type(self).__name__,
            x,
            conv.in_channels,
            self.channels_last,
            getattr(norm, "axis_name", None),
        )
        if not self.channels_last:
            x = jnp.moveaxis(x, 0, -1)
        return self._forward(x, state, inference)

    @typecheck
    def _forward(
        self,
        x: Float[Array, "height width channels"],
        state: eqx.nn.State,
        inference: bool | None,
    ) -> tuple[Float[Array, " num_classes"], eqx.nn.State]:
        x, state = conv_norm(*self._stem(), x, state, inference, channels_last=True)
        x = max_pool(jax.nn.relu(x), self._pool_padding)
        for block in self._blocks():
            x, state = block(x, state, inference=inference)
        return self._head()(jnp.mean(x, axis=(0, 1))), state

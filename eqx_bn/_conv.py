"""`ChannelsLastConv`: a convolution on one channels-last example whose kernel is
laid out as XLA's convolutions read it, `(*kernel, in, out)` (Flax's `nn.Conv`).

`eqx.nn.Conv` keeps its weight as `(out, in, *kernel)`. XLA's CPU and GPU
convolutions read the kernel channels last, so a network of `eqx.nn.Conv` layers pays
a transpose of every weight in every training step, and each transpose is one more
kernel for XLA to compile: on a ResNet-18 train step (8 x 224 x 224, 2 CPU cores)
that is 1.12x Flax's step time and 1.04x its compile time, against 1.03x and 0.96x
with the kernels laid out as here. `eqx_bn.models` builds its networks from this
layer; `eqx_bn.interop`, `fold_batch_norms` and the other transforms know it as they
know `eqx.nn.Conv`.
"""

from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from ._typing import typecheck


def _dimension_numbers(spatial: int, kernel_last: bool) -> lax.ConvDimensionNumbers:
    # One example with a batch axis of one in front: (1, *spatial, C); the kernel
    # (*kernel, in, out) with `kernel_last`, else Equinox's (out, in, *kernel).
    channels_last = (0, spatial + 1, *range(1, spatial + 1))
    if kernel_last:
        kernel = (spatial + 1, spatial, *range(spatial))
    else:
        kernel = tuple(range(spatial + 2))
    return lax.ConvDimensionNumbers(
        lhs_spec=channels_last, rhs_spec=kernel, out_spec=channels_last
    )


def convolve_example(
    who: str,
    layer: "ChannelsLastConv | eqx.nn.Conv",
    x: Array,
) -> Array:
    """`layer`'s convolution of one channels-last example `(*spatial, in_channels)`,
    whichever of the two kernel layouts it keeps (`ChannelsLastConv`'s, or
    `eqx.nn.Conv`'s read through the dimension numbers, without moving `x`).

    **Raises:**

    - `ValueError`: naming `who`, if `x` is not of rank `num_spatial_dims + 1`
        with `in_channels` last.
    """
    spatial = layer.num_spatial_dims
    if x.ndim != spatial + 1 or x.shape[-1] != layer.in_channels:
        raise ValueError(
            f"{who}: expected one example (*spatial, in_channels) with {spatial} "
            f"spatial axes and in_channels={layer.in_channels} last, got shape "
            f"{x.shape}. A batch goes through jax.vmap; a channels-first example "
            "through jnp.moveaxis(x, 0, -1)."
        )
    y = lax.conv_general_dilated(
        x[None],
        layer.weight,
        window_strides=layer.stride,
        padding=layer.padding,
        rhs_dilation=layer.dilation,
        feature_group_count=layer.groups,
        dimension_numbers=_dimension_numbers(
            spatial, isinstance(layer, ChannelsLastConv)
        ),
    )[0]
    if layer.bias is not None:
        y = y + jnp.reshape(layer.bias, (1,) * spatial + (-1,))
    return y


class ChannelsLastConv(eqx.Module):
    """A convolution of one example `(*spatial, in_channels)`, channels last, with
    the kernel `(*kernel_size, in_channels // groups, out_channels)` and the bias
    `(out_channels,)`: the layout of Flax's `nn.Conv`, which XLA's convolutions
    read without moving the kernel.

    It takes `eqx.nn.Conv`'s arguments and gives the same numbers as `eqx.nn.Conv`
    on the channels-first example, moved to channels last; only zero padding. Its
    initial weights are `eqx.nn.Conv`'s (uniform on `+-1/sqrt(fan_in)`), laid out
    as above. Under `jax.vmap` it sees one example, as Equinox's layers do.

    `eqx_bn.interop` pairs it with Flax's `Conv` (the kernel as it is) and with
    PyTorch's `Conv2d` (the weight transposed from `(out, in, *kernel)`), and
    `eqx_bn.fold_batch_norms` folds a BatchNorm into it.
    """

    weight: Float[Array, "*kernel in_per_group out_channels"]
    bias: Float[Array, " out_channels"] | None
    num_spatial_dims: int = eqx.field(static=True)
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    kernel_size: tuple[int, ...] = eqx.field(static=True)
    stride: tuple[int, ...] = eqx.field(static=True)
    padding: str | tuple[tuple[int, int], ...] = eqx.field(static=True)
    dilation: tuple[int, ...] = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(
        self,
        num_spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] | Sequence[tuple[int, int]] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        use_bias: bool = True,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:** those of `eqx.nn.Conv`, which checks them, without
        `padding_mode` (the padding is zeros):

        - `num_spatial_dims`: 1, 2 or 3.
        - `in_channels`, `out_channels`: channels in and out.
        - `kernel_size`, `stride`, `dilation`: an int, or one per spatial axis.
        - `padding`: an int, one per axis, `(low, high)` pairs, or `"SAME"`,
            `"SAME_LOWER"`, `"VALID"`.
        - `groups`: input and output channels split into this many groups.
        - `use_bias`: whether there is a bias.
        - `dtype`: of the weight and bias (default float32, or float64 with x64).
        - `key`: for the initial weights.
        """
        conv = eqx.nn.Conv(
            num_spatial_dims,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            use_bias,
            dtype=dtype,
            key=key,
        )
        self.weight = jnp.moveaxis(conv.weight, (0, 1), (-1, -2))
        self.bias = None if conv.bias is None else jnp.reshape(conv.bias, (-1,))
        self.num_spatial_dims = num_spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = groups
        self.use_bias = use_bias

    @typecheck
    def __call__(
        self,
        x: Float[Array, "*spatial channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*new_spatial out_channels"]:
        """**Arguments:**

        - `x`: one example, `(*spatial, in_channels)`.
        - `key`: unused (Equinox's layer signature).

        **Returns:**

        `(*new_spatial, out_channels)`.

        **Raises:**

        - `ValueError`: if `x` is not of rank `num_spatial_dims + 1` with
            `in_channels` last.
        """
        del key
        return convolve_example("ChannelsLastConv", self, x)


class ChannelsLastConv2d(ChannelsLastConv):
    """`ChannelsLastConv` with two spatial axes: one example `(height, width,
    in_channels)`, the kernel `(kh, kw, in_channels // groups, out_channels)`, as
    Flax's `nn.Conv` with a 2-d kernel."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] | Sequence[tuple[int, int]] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        use_bias: bool = True,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:** as `ChannelsLastConv`'s, without `num_spatial_dims`."""
        super().__init__(
            2,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            use_bias,
            dtype,
            key=key,
        )

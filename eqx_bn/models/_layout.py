"""Running Equinox convolutions on channels-last activations.

`eqx.nn.Conv` takes one example channels first, `(C, *spatial)`. XLA's CPU (and GPU)
convolutions work channels last, so a channels-first network pays a transpose of the
activations in and out of every convolution. `channels_last_conv` runs the same
module, with its weights as they are (`(out, in, *kernel)`), on `(*spatial, C)`: the
kernel layout is only a dimension-number choice, and the activations never move
(XLA still transposes the weight in every step: `eqx_bn.models.ChannelsLastConv`
keeps it in the layout XLA reads).
"""

import equinox as eqx
from jaxtyping import Array, Float

from .._conv import convolve_example
from .._typing import typecheck


@typecheck
def channels_last_conv(
    conv: eqx.nn.Conv, x: Float[Array, "*spatial in_channels"]
) -> Float[Array, "*new_spatial out_channels"]:
    """`conv` applied to one channels-last example: `conv(x.T)` with the result
    channels last again, without moving `x`.

    **Arguments:**

    - `conv`: an `eqx.nn.Conv` (`Conv1d`/`Conv2d`/`Conv3d`) with zero padding; its
        weights stay in Equinox's `(out, in, *kernel)` layout.
    - `x`: one example, `(*spatial, in_channels)`.

    **Returns:**

    `(*new_spatial, out_channels)`: the same numbers as `conv` on the channels-first
    example, moved to channels last.

    **Raises:**

    - `ValueError`: if `x` is not of rank `num_spatial_dims + 1` with `in_channels`
        last, or the module pads with anything but zeros.
    """
    if conv.padding_mode != "ZEROS":
        raise ValueError(
            "channels_last_conv: only zero padding is supported, got "
            f"padding_mode={conv.padding_mode!r}."
        )
    return convolve_example("channels_last_conv", conv, x)

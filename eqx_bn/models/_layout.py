"""Running Equinox convolutions on channels-last activations.

`eqx.nn.Conv` takes one example channels first, `(C, *spatial)`. XLA's CPU (and GPU)
convolutions work channels last, so a channels-first network pays a transpose of the
activations in and out of every convolution. `conv` runs the same module, with its
weights as they are (`(out, in, *kernel)`), on `(*spatial, C)` instead: the kernel
layout is only a dimension-number choice, and the activations never move.
"""

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float


def _dimension_numbers(spatial: int) -> lax.ConvDimensionNumbers:
    channels_last = (0, spatial + 1, *range(1, spatial + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=channels_last,
        rhs_spec=tuple(range(spatial + 2)),
        out_spec=channels_last,
    )


def conv(
    module: eqx.nn.Conv, x: Float[Array, "*spatial in_channels"], channels_last: bool
) -> Float[Array, "*new_spatial out_channels"]:
    """`module(x)`, with `x` and the result channels last when `channels_last`.

    **Arguments:**

    - `module`: an `eqx.nn.Conv` (zero padding).
    - `x`: one example, `(*spatial, in_channels)` (or `(in_channels, *spatial)`
        when `channels_last` is False, which simply calls `module(x)`).
    - `channels_last`: the layout of `x` and of the result.

    **Returns:**

    The convolution, in the layout of `x`.

    **Raises:**

    - `ValueError`: for a rank that does not match the module, or a padding mode
        other than zeros.
    """
    if not channels_last:
        return module(x)
    spatial = module.num_spatial_dims
    if x.ndim != spatial + 1:
        raise ValueError(
            f"conv: expected one channels-last example of rank {spatial + 1} "
            f"(*spatial, in_channels), got shape {x.shape}."
        )
    if module.padding_mode != "ZEROS":
        raise ValueError(
            f"conv: channels-last convolutions support zero padding only, got "
            f"padding_mode={module.padding_mode!r}."
        )
    y = lax.conv_general_dilated(
        x[None],
        module.weight,
        window_strides=module.stride,
        padding=module.padding,
        rhs_dilation=module.dilation,
        feature_group_count=module.groups,
        dimension_numbers=_dimension_numbers(spatial),
    )[0]
    if module.bias is not None:
        y = y + jnp.reshape(module.bias, (-1,))
    return y

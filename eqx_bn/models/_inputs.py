"""What the bundled models check of their input before anything else.

A model takes one example under `jax.vmap`; its `__call__` runs these checks
*before* its type-checked body, so that a whole batch passed without `vmap`, an
integer image or the wrong number of channels gets a message that names the fix,
not jaxtyping's print-out of every argument (the whole `State` among them). NumPy
arrays are taken, as `eqx.nn` layers and `eqx_bn.BatchNorm` take them.
"""

from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._describe import describe


def _vmap_hint(axis_name: Hashable | None) -> str:
    named = "" if axis_name is None else f"axis_name={axis_name!r}, "
    return f"jax.vmap(model, {named}in_axes=(0, None), out_axes=(0, None))"


def one_example(
    model: str,
    x: Array | np.ndarray,
    *,
    layout: str,
    rank: int,
    axis_name: Hashable | None,
) -> Array:
    """`x` as a JAX array, checked to be one floating example of `rank` axes,
    `layout` in messages (e.g. `"(channels, height, width)"`).

    **Raises:**

    - `TypeError`: if `x` is not a JAX or NumPy array of a floating dtype.
    - `ValueError`: if `x` has not the rank of one example; with one axis too many
        (a whole batch), the message shows the `jax.vmap` call to use.
    """
    if isinstance(x, np.ndarray | np.generic):
        x = jnp.asarray(x)
    if not isinstance(x, jax.Array):
        raise TypeError(
            f"{model}: x must be a JAX or NumPy array, got {describe(x)}; convert "
            "it with jnp.asarray(x, jnp.float32)."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{model}: x is {describe(x)}, expected a floating dtype; convert it "
            "with x.astype(jnp.float32)."
        )
    if x.ndim == rank + 1:
        raise ValueError(
            f"{model}: x has shape {x.shape}, one axis more than one example "
            f"{layout}: a whole batch? The model takes one example at a time; "
            f"call it on a batch under {_vmap_hint(axis_name)}."
        )
    if x.ndim != rank:
        raise ValueError(
            f"{model}: x has shape {x.shape}, expected one example {layout} "
            f"({rank} axes); a batch goes under {_vmap_hint(axis_name)}."
        )
    return x


def check_image(
    model: str,
    x: Array | np.ndarray,
    in_channels: int,
    channels_last: bool,
    axis_name: Hashable | None,
) -> Array:
    """`x` as one JAX image with `in_channels` channels where the layout puts them
    (`one_example` first). A type annotation can say only the rank: jaxtyping
    cannot name the number `in_channels` should be.

    **Raises:**

    As `one_example`, and `ValueError` naming the numbers if the channel axis is
    not `in_channels` long (and the flag to flip if the other end is).
    """
    layout = (
        "(height, width, channels)" if channels_last else "(channels, height, width)"
    )
    x = one_example(model, x, layout=layout, rank=3, axis_name=axis_name)
    axis = 2 if channels_last else 0
    if x.shape[axis] == in_channels:
        return x
    hint = ""
    other = 0 if channels_last else 2
    if x.shape[other] == in_channels:
        hint = (
            f" Axis {other} has {in_channels} entries: if those are the channels, "
            f"build the model with channels_last={not channels_last}."
        )
    raise ValueError(
        f"{model}: the image has {x.shape[axis]} channels on axis {axis} (shape "
        f"{x.shape}), expected in_channels={in_channels} as in {layout}.{hint}"
    )

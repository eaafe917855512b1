"""`set_renorm_clipping`: Batch Renormalization's clipping bounds, set in the State,
so that a schedule changes them inside a jitted step without a new trace."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, PyTree, Real

from ._batch_norm import BatchNorm, RenormClipping, check_bounds, get_running
from ._typing import typecheck


def _known(value) -> float | None:
    """`value` as a float when it is known now (not traced under `jit`)."""
    if value is None or isinstance(value, jax.core.Tracer):
        return None
    return float(value)


@typecheck
def set_renorm_clipping(
    model: PyTree,
    state: eqx.nn.State,
    *,
    rmin: Real[ArrayLike, ""] | None = None,
    rmax: Real[ArrayLike, ""] | None = None,
    dmax: Real[ArrayLike, ""] | None = None,
) -> eqx.nn.State:
    """Sets Batch Renormalization's clipping bounds of every `BatchNorm(renorm=True)`
    in `model`: `r` is clipped to `[rmin, rmax]` and `d` to `[-dmax, dmax]`.

    The bounds are arrays in the State ([`RenormClipping`][eqx_bn.RenormClipping],
    under each layer's `clipping_index`), so a schedule that computes them from the
    step inside a jitted training step reuses one compiled step. The paper's
    schedule, plain BatchNorm for the first steps and then looser bounds:

    ```python
    t = jnp.clip((step - 5_000) / 35_000, 0.0, 1.0)
    state = eqx_bn.set_renorm_clipping(
        model, state, rmin=1 / (1 + 2 * t), rmax=1 + 2 * t, dmax=5 * t
    )
    ```

    **Arguments:**

    - `model`: any PyTree holding `eqx_bn.BatchNorm`s (a single layer too).
    - `state`: the model's `eqx.nn.State`.
    - `rmin`, `rmax`, `dmax`: the new bounds, scalars (Python numbers or arrays,
        traced ones too). A bound left out (None) keeps its value; no bound on a
        side is `rmin=0`, `rmax=inf` or `dmax=inf`.

    **Returns:**

    The State with the new bounds, each in the dtype of the old one.

    **Raises:**

    - `ValueError`: if `model` holds no `BatchNorm` with `renorm=True`, or if
        bounds known outside `jit` have `rmax < rmin` or `dmax < 0` (traced ones
        are not checked).
    """
    check_bounds(_known(rmin), _known(rmax), _known(dmax), "eqx_bn.set_renorm_clipping")

    def is_bn(v) -> bool:
        return isinstance(v, BatchNorm)

    layers = [v for v in jax.tree_util.tree_leaves(model, is_leaf=is_bn) if is_bn(v)]
    renorms = [bn for bn in layers if bn.renorm]
    if not renorms:
        raise ValueError(
            "eqx_bn.set_renorm_clipping: the model holds no BatchNorm with "
            f"renorm=True (it holds {len(layers)} BatchNorm"
            f"{'' if len(layers) == 1 else 's'}), so there are no bounds to set. "
            "Build the layers with eqx_bn.BatchNorm(..., renorm=True)."
        )
    given = {"rmin": rmin, "rmax": rmax, "dmax": dmax}
    for bn in renorms:
        old = get_running(state, bn.clipping_index)
        new = RenormClipping(
            *(
                value if given[name] is None else jnp.asarray(given[name], value.dtype)
                for name, value in zip(RenormClipping._fields, old)
            )
        )
        state = state.set(bn.clipping_index, new)
    return state

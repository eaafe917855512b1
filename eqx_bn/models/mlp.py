"""The seed MLP, `Dense(4) -> BatchNorm -> relu -> Dense(1)`, as an Equinox module."""

import math

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._batch_norm import BatchNorm
from .._typing import typecheck
from ._init import Distribution, Uniform, batch_norm_init, initialise
from ._inputs import one_example


def _equinox_init(names: tuple[str, ...], owners: tuple) -> Distribution:
    """`eqx.nn.Linear`'s initialisation, and `BatchNorm`'s."""
    layer = owners[-1]
    if isinstance(layer, eqx.nn.Linear):
        return Uniform(1 / math.sqrt(layer.in_features))
    return batch_norm_init(names, owners)


class SeedMLP(eqx.Module):
    """`Dense(4) -> BatchNorm -> relu -> Dense(1)` on one example, under `jax.vmap`.

    It pairs with the Flax module

    ```python
    class SeedMLP(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(4)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.99)(x)
            return nn.Dense(1)(nn.relu(x))
    ```

    as `Dense_0`, `BatchNorm_0`, `Dense_1`.

    !!! Example

        ```python
        model, state = eqx.nn.make_with_state(SeedMLP)(2, key=key)
        batched = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                           out_axes=(0, None))
        y, state = batched(x, state)  # x: (batch, 2), y: (batch, 1)
        ```
    """

    dense_0: eqx.nn.Linear
    norm: BatchNorm = eqx.field(metadata={"fold_into": "dense_0"})
    dense_1: eqx.nn.Linear

    def __init__(
        self,
        in_features: int,
        *,
        hidden: int = 4,
        momentum: float = 0.99,
        eps: float = 1e-5,
        axis_name: str | None = "batch",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`: the size of one example.
        - `hidden`: the width of the hidden layer (4 in the seed model).
        - `momentum`, `eps`: of the `BatchNorm`, with Flax's meaning.
        - `axis_name`: the vmap axis the batch statistics are taken over.
        - `key`: for the initial weights: as `eqx.nn.Linear`'s (weight and bias
            uniform on +-1/sqrt(fan-in)), drawn without compiling anything.
        """

        def build(key):
            k0, k1 = jax.random.split(key)
            return dict(
                dense_0=eqx.nn.Linear(in_features, hidden, key=k0),
                norm=BatchNorm(hidden, axis_name, momentum=momentum, eps=eps),
                dense_1=eqx.nn.Linear(hidden, 1, key=k1),
            )

        for name, value in initialise(build, key, _equinox_init).items():
            setattr(self, name, value)

    def __call__(
        self,
        x: Float[Array | np.ndarray, " in_features"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, " 1"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one example of `in_features` values, a JAX or NumPy array. A batch
            goes through `jax.vmap(model, axis_name="batch", in_axes=(0, None),
            out_axes=(0, None))`.
        - `state`: holds the BatchNorm's running statistics.
        - `key`: unused.
        - `inference`: use the running statistics (default: the layer's flag).

        **Returns:**

        `(y, state)` with `y` of shape `(1,)` and the updated state.

        **Raises:**

        - `ValueError`: if `x` is not one example of `in_features` values (a whole
            batch passed without `jax.vmap` is named as such).
        - `TypeError`: if `x` is not a floating JAX or NumPy array.
        """
        del key
        # Before the type-checked body: these messages name the fix. (A folded
        # model's norm has no axis_name: it needs none.)
        axis_name = getattr(self.norm, "axis_name", None)
        x = one_example(
            "SeedMLP", x, layout="(in_features,)", rank=1, axis_name=axis_name
        )
        expected = self.dense_0.in_features
        if x.shape != (expected,):
            raise ValueError(
                f"SeedMLP: x has {x.shape[0]} features (shape {x.shape}), expected "
                f"in_features={expected}: one example, as (in_features,)."
            )
        return self._forward(x, state, inference)

    @typecheck
    def _forward(
        self,
        x: Float[Array, " in_features"],
        state: eqx.nn.State,
        inference: bool | None,
    ) -> tuple[Float[Array, " 1"], eqx.nn.State]:
        h = self.dense_0(x)
        h, state = self.norm(h, state, inference=inference)
        return self.dense_1(jax.nn.relu(h)), state

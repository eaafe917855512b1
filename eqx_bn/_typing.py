"""Type aliases and the runtime type-check decorator every public callable uses."""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from beartype import beartype
from jaxtyping import jaxtyped

_F = TypeVar("_F", bound=Callable[..., Any])

AxisName = Hashable | tuple[Hashable, ...]
"""One named axis (`"batch"`) or several reduced together (`("batch", "data")`)."""

AxisIndexGroups = Sequence[Sequence[int]]
"""Groups of indices along a named axis, as `jax.lax.psum(..., axis_index_groups=)`."""

Initializer = Callable[..., Any]
"""A `jax.nn.initializers`-style callable `(key, shape, dtype) -> array`."""


def typecheck(fn: _F) -> _F:
    """Checks `fn`'s jaxtyping annotations with beartype on every call.

    Under `jax.jit` the check runs once, at trace time, so it costs nothing per step.
    """
    return jaxtyped(typechecker=beartype)(fn)

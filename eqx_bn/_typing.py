"""Type aliases, and the runtime type-check decorator that every public callable
uses and that users can put on their own models (`eqx_bn.typecheck`)."""

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
    """Checks the jaxtyping annotations of `fn` with beartype, on every call.

    The same check eqx_bn runs on its own public functions, for yours: array dtypes,
    ranks and named dimensions, which must agree across the arguments and the
    return value of one call (`"channels height width"` binds `channels` for that
    call). Under `jax.jit` / `eqx.filter_jit` the arguments are tracers with the
    same shapes and dtypes, so the check runs once, when the function is traced,
    and the compiled step is the same as without it. Under `jax.vmap` it sees one
    example, as the function body does.

    It is `jaxtyping.jaxtyped(typechecker=beartype.beartype)`. Decorate functions
    and methods (a model's `__call__`); on an `eqx.Module` class it checks the
    fields when the module is built, not its methods. To check a whole package
    without decorating anything, use jaxtyping's import hook instead (see
    [Runtime shape checking](../shape-checking.md)).

    !!! Example

        ```python
        class Net(eqx.Module):
            ...
            @eqx_bn.typecheck
            def __call__(
                self, x: Float[Array, "channels height width"], state: eqx.nn.State
            ) -> tuple[Float[Array, " classes"], eqx.nn.State]:
                ...
        ```

    **Arguments:**

    - `fn`: a function, method or dataclass with jaxtyping annotations.

    **Returns:**

    `fn`, checked: a mismatch raises `jaxtyping.TypeCheckError` (a `TypeError`)
    naming the parameter, its value (e.g. `f32[3,8,8]`), the expected type and the
    sizes each named dimension has been bound to so far.
    """
    return jaxtyped(typechecker=beartype)(fn)

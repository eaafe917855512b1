"""Initial weights without one XLA compile per shape.

An Equinox layer draws its weights with `jax.random` when it is built, and eagerly
each draw is its own XLA computation, compiled once per shape: a torchvision-sized
ResNet-50 took 30-95 s to build on two CPU cores, nearly all of it compiling. Here a
model is built once abstractly (`eqx.filter_eval_shape`: shapes and dtypes, no
numbers), and then every array is drawn by NumPy's generator, seeded from the JAX
key, from the distribution that a rule names for it. Nothing is compiled.

Under a JAX transformation the key is a tracer (`jax.jit`, `jax.vmap` over keys for
an ensemble, `eqx.filter_eval_shape`): the same NumPy draw then runs as one
`jax.pure_callback`, so a key gives the same weights eagerly and under `jit`.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import numpy as np
from jax.tree_util import DictKey, GetAttrKey, SequenceKey
from jaxtyping import PRNGKeyArray

from .._batch_norm import BatchNorm
from .._conv import ChannelsLastConv

_T = TypeVar("_T")

# The standard deviation of a standard normal truncated to [-2, 2]: what
# `jax.nn.initializers.variance_scaling(..., "truncated_normal")` divides by.
_TRUNCATED_STD = 0.87962566103423978


@dataclasses.dataclass(frozen=True)
class Constant:
    """Every element `value`."""

    value: float


@dataclasses.dataclass(frozen=True)
class Normal:
    """A normal of mean 0 and standard deviation `std` (PyTorch's `normal_`)."""

    std: float


@dataclasses.dataclass(frozen=True)
class TruncatedNormal:
    """A standard normal cut at +-2 and scaled to standard deviation `std`, as the
    `"truncated_normal"` of `jax.nn.initializers.variance_scaling` (Flax's
    `lecun_normal` is `std = 1 / sqrt(fan_in)`)."""

    std: float


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Uniform on `[-bound, bound)`."""

    bound: float


Distribution = Constant | Normal | TruncatedNormal | Uniform

Rule = Callable[[tuple[str, ...], tuple[Any, ...]], Distribution]
"""`(names, owners) -> Distribution` for one array of a model: `names` is its path
(`("layer1", "0", "conv1", "weight")`), `owners[i]` the node at `names[:i]`, so
`owners[-1]` is the layer holding the array (`model.layer1[0].conv1`)."""


def _standard(rng: np.random.Generator, n: int, dtype: np.dtype) -> np.ndarray:
    return rng.standard_normal(n, dtype=dtype)


def _draw(
    distribution: Distribution, rng: np.random.Generator, shape, dtype
) -> np.ndarray:
    n = math.prod(shape)
    # NumPy draws float32 and float64 only; half precision is rounded from float32.
    work = np.float64 if np.dtype(dtype).itemsize > 4 else np.float32
    if isinstance(distribution, Constant):
        values = np.full(n, distribution.value, work)
    elif isinstance(distribution, Normal):
        values = _standard(rng, n, work)
        values *= work(distribution.std)
    elif isinstance(distribution, TruncatedNormal):
        values = _standard(rng, n, work)
        # Redraw what falls outside +-2 (4.6% each round), looking at those only.
        outside = np.flatnonzero(np.abs(values) > 2)
        while outside.size:
            values[outside] = _standard(rng, outside.size, work)
            outside = outside[np.abs(values[outside]) > 2]
        values *= work(distribution.std / _TRUNCATED_STD)
    elif isinstance(distribution, Uniform):
        values = rng.random(n, dtype=work) * work(2 * distribution.bound)
        values -= work(distribution.bound)
    else:
        raise TypeError(f"not a distribution: {distribution!r}")
    return values.astype(dtype, copy=False).reshape(shape)


def fans(layer: Any) -> tuple[int, int]:
    """`(fan_in, fan_out)` of a layer's weight as PyTorch and Flax count them:
    inputs per output (per group for a grouped convolution), and outputs per
    input (PyTorch's `fan_out`, which does not divide by the groups).

    The layouts: `eqx.nn.Linear` `(out, in)`, `eqx.nn.Conv` `(out, in, *kernel)`,
    `ChannelsLastConv` `(*kernel, in, out)`.
    """
    shape = layer.weight.shape
    if isinstance(layer, ChannelsLastConv):
        receptive = math.prod(shape[:-2])
        return receptive * shape[-2], receptive * shape[-1]
    return math.prod(shape[1:]), shape[0] * math.prod(shape[2:])


def batch_norm_init(
    names: tuple[str, ...], owners: tuple[Any, ...], zero: str | None = None
) -> Distribution:
    """The initial values of a `BatchNorm`'s arrays, as `BatchNorm.__init__` makes
    them (a test compares the two): scale 1, bias 0, running mean 0 and variance 1.
    A BatchNorm in a field named `zero` starts with scale 0 (the last norm of a
    residual branch, so that the block starts as the identity).

    **Raises:**

    - `TypeError`: if the array is not one of a `BatchNorm`, so that a layer that
        no rule knows is not filled with something arbitrary.
    """
    where = [i for i, o in enumerate(owners) if isinstance(o, BatchNorm)]
    values = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0}
    if not where or names[-1] not in values:
        raise TypeError(
            f"no initialiser for {'.'.join(names)} ({type(owners[-1]).__name__}): "
            "the rule knows convolutions, linear layers and BatchNorms."
        )
    norm = where[-1]
    if names[-1] == "scale" and norm > 0 and names[norm - 1] == zero:
        return Constant(0.0)
    return Constant(values[names[-1]])


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, GetAttrKey):
        return getattr(node, key.name)
    if isinstance(key, SequenceKey):
        return node[key.idx]
    if isinstance(key, DictKey):
        return node[key.key]
    raise TypeError(f"cannot follow {key!r}")


def _name(key: Any) -> str:
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, SequenceKey):
        return str(key.idx)
    return str(key.key)


def _distributions(skeleton: Any, rule: Rule) -> list[Distribution]:
    found = []
    for path, _ in jax.tree_util.tree_flatten_with_path(skeleton)[0]:
        owners = [skeleton]
        for key in path[:-1]:
            owners.append(_child(owners[-1], key))
        found.append(rule(tuple(_name(k) for k in path), tuple(owners)))
    return found


def _key_data(key: PRNGKeyArray) -> jax.Array:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key  # a raw uint32 key, `jax.random.PRNGKey(0)`


def _host_draw(
    data: np.ndarray, *, specs: list[tuple[Distribution, jax.ShapeDtypeStruct]]
) -> list[np.ndarray]:
    rng = np.random.default_rng([int(v) for v in np.ravel(data)])
    return [_draw(d, rng, s.shape, s.dtype) for d, s in specs]


def initialise(
    build: Callable[[PRNGKeyArray], _T], key: PRNGKeyArray, rule: Rule
) -> _T:
    """`build(key)` with every array drawn from the distribution `rule` names.

    With a concrete key, `build` runs once abstractly, under
    `eqx.filter_eval_shape` (its own random draws are only traced), and the
    arrays come from NumPy's generator seeded with the key's data, in the order
    of the leaves: no XLA compile. With a traced key (under `jit`, `vmap`,
    `eval_shape`, or inside the abstract build of an enclosing model) `build`
    runs in that trace and the draw is one `jax.pure_callback`: the values are
    the same as eagerly, and XLA drops `build`'s own draws as unused.

    **Arguments:**

    - `build`: builds the module (or tree of modules) from a key.
    - `key`: a JAX key, typed or raw.
    - `rule`: `(names, owners) -> Distribution` for each array (see `Rule`).

    **Returns:**

    What `build` returns, its arrays filled.
    """
    data = _key_data(key)
    traced = isinstance(data, jax.core.Tracer)
    skeleton = build(key) if traced else eqx.filter_eval_shape(build, key)
    arrays, rest = eqx.partition(
        skeleton, lambda x: isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array(x)
    )
    leaves, treedef = jax.tree_util.tree_flatten(arrays)
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    specs = list(zip(_distributions(arrays, rule), shapes))
    if traced:
        values = jax.pure_callback(
            functools.partial(_host_draw, specs=specs),
            shapes,
            data,
            vmap_method="sequential",
        )
    else:
        # device_put is a copy; jnp.asarray would compile a conversion per shape.
        values = jax.device_put(_host_draw(np.asarray(data), specs=specs))
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, values), rest)

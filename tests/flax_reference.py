"""Flax linen reference models for the conversion tests (not a test module).

`SeedMLP` is the seed model; `ResNet`/`ResNetBlock` follow `examples/imagenet/models.py`
of google/flax (written anew here): same module tree, names and hyper-parameters.
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def numpy_init(shapes, seed=0):
    """Flax-shaped variables (from `jax.eval_shape(module.init, ...)`) filled by numpy.

    No JAX RNG to compile, which on a CPU costs more than the rest of a small test.
    Kernels are scaled by fan-in so that activations stay O(1) through a deep network;
    scales and variances are in [0.5, 1.5], the rest small normals.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
            value = rng.normal(0.0, std, leaf.shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = rng.normal(0.0, 0.1, leaf.shape)
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def init(module, *args, seed=0, **kwargs):
    """`module.init(key, *args, **kwargs)`'s variables, filled by `numpy_init`."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    return numpy_init(shapes, seed)


class SeedMLP(nn.Module):
    """`Dense(4) -> BatchNorm -> relu -> Dense(1)` on a whole batch."""

    momentum: float = 0.99

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
        return nn.Dense(1)(nn.relu(x))


class Block(nn.Module):
    """One Dense layer in its own scope, `Block_<n>`."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1])(x)


class Blocks(nn.Module):
    """`n` Blocks in a row: scopes `Block_0 ... Block_<n-1>`."""

    n: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.n):
            x = Block()(x)
        return x


class SetupList(nn.Module):
    """Layers kept in a list in `setup`: Flax names them `layers_0`, `layers_1`."""

    def setup(self):
        self.layers = [nn.Dense(2), nn.Dense(2)]
        self.head = nn.Dense(1)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class ResNetBlock(nn.Module):
    filters: int
    conv: Any
    norm: Any
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.act(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(
                residual
            )
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 64

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(nn.Conv, use_bias=False)
        norm = partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
        )
        x = conv(
            self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init"
        )(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(
                    self.num_filters * 2**i,
                    conv=conv,
                    norm=norm,
                    act=nn.relu,
                    strides=strides,
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


ResNet18 = partial(ResNet, stage_sizes=[2, 2, 2, 2])

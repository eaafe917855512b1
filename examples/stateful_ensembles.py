"""Ensembles and scans of BatchNorm models: the two stateful patterns that trip people.

1. An ensemble of seed MLPs built with `eqx.filter_vmap(eqx.nn.make_with_state(...))`:
   one stacked model, one stacked State, every member trained at once. Each member's
   BatchNorm takes statistics over *its own* batch (the ensemble vmap has no name;
   only the inner batch vmap is called "batch").
2. A deep stack of identical `Linear -> BatchNorm -> relu` blocks run with
   `jax.lax.scan` over stacked parameters and stacked States, which compiles one block
   instead of N.

Run: `python examples/stateful_ensembles.py` (add `--smoke` for a quick check).
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_bn
from eqx_bn.models import SeedMLP


def make_ensemble(size: int, in_features: int, key):
    """`size` seed MLPs and their States, stacked along a leading axis."""

    @eqx.filter_vmap
    def make(key):
        return eqx.nn.make_with_state(SeedMLP)(in_features, key=key)

    return make(jax.random.split(key, size))


def ensemble_forward(models, states, x):
    """Every member on the same batch `x`; returns `(members, batch, 1)` outputs."""

    def one(model, state):
        return jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)

    return eqx.filter_vmap(one)(models, states)


class Block(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx_bn.BatchNorm

    def __init__(self, width: int, *, key):
        self.linear = eqx.nn.Linear(width, width, key=key)
        self.norm = eqx_bn.BatchNorm(width, momentum=0.9)

    def __call__(self, x, state):
        x, state = self.norm(self.linear(x), state)
        return jax.nn.relu(x), state


def make_stack(depth: int, width: int, key):
    """`depth` blocks, stacked: one Block whose arrays have a leading `depth` axis."""

    @eqx.filter_vmap
    def make(key):
        return eqx.nn.make_with_state(Block)(width, key=key)

    return make(jax.random.split(key, depth))


def stack_forward(blocks, states, x):
    """Runs the blocks in order over a batch with `lax.scan`; returns new States."""
    params, static = eqx.partition(blocks, eqx.is_array)

    def body(h, layer):
        block_params, state = layer
        block = eqx.combine(block_params, static)
        h, state = jax.vmap(
            block, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(h, state)
        return h, state

    return jax.lax.scan(body, x, (params, states))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps only")
    args = parser.parse_args(argv)
    steps = 5 if args.smoke else 200
    key = jax.random.key(0)
    k_data, k_ens, k_stack = jax.random.split(key, 3)
    x = jax.random.normal(k_data, (32, 2))
    target = jnp.sin(3 * x[:, :1]) + x[:, 1:] ** 2

    # 1. An ensemble trained at once.
    models, states = make_ensemble(4, 2, k_ens)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(models, eqx.is_array))

    @eqx.filter_jit
    def train_step(models, states, opt_state):
        def loss(models, states):
            y, states = ensemble_forward(models, states, x)
            return jnp.mean((y - target[None]) ** 2), states

        (value, states), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
            models, states
        )
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(models, updates), states, opt_state, value

    for step in range(steps):
        models, states, opt_state, value = train_step(models, states, opt_state)
    print(f"ensemble of 4: mean loss after {steps} steps {float(value):.4f}")

    # 2. A scanned stack of blocks.
    blocks, block_states = make_stack(8, 16, k_stack)
    h0 = jax.random.normal(k_data, (32, 16))
    h, block_states = eqx.filter_jit(stack_forward)(blocks, block_states, h0)
    print(
        f"scan over 8 blocks: output {h.shape}, running mean per block "
        f"{jax.tree.leaves(block_states)[0].shape}"
    )
    return {"loss": float(value), "models": models, "states": states}


if __name__ == "__main__":
    main()

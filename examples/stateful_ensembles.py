"""Ensembles and scans of BatchNorm models: the two stateful patterns that trip people.

1. An ensemble of seed MLPs built with `eqx.filter_vmap(eqx.nn.make_with_state(...))`:
   one stacked model, one stacked State, every member trained at once. Each member's
   BatchNorm takes statistics over *its own* batch (the ensemble vmap has no name;
   only the inner batch vmap is called "batch").
2. A deep stack of identical `Linear -> BatchNorm -> relu` blocks run with
   `jax.lax.scan` over stacked parameters and stacked States, which compiles one block
   instead of N.

Run: `python examples/stateful_ensembles.py` (add `--smoke` for a quick check,
`--out DIR` for where the losses go, default `./outputs`).
"""

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _common import Progress, parser, runtime

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


EPOCH = 25  # steps between two progress lines


def main(argv=None) -> dict:
    args = parser(__doc__, out_help="the ensemble's losses").parse_args(argv)
    with runtime("stateful_ensembles") as timing:
        out = run(args)
    return out | {"wall_s": timing["seconds"]}


def run(args) -> dict:
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
            per_member = jnp.mean((y - target[None]) ** 2, axis=(1, 2))
            return jnp.sum(per_member), (states, per_member)

        (_, (states, per_member)), grads = eqx.filter_value_and_grad(
            loss, has_aux=True
        )(models, states)
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(models, updates), states, opt_state, per_member

    epochs = -(-steps // EPOCH)
    history = []
    with Progress(steps, "ensemble") as progress:
        for step in range(steps):
            models, states, opt_state, per_member = train_step(
                models, states, opt_state
            )
            history.append([float(v) for v in per_member])
            progress.step()
            if (step + 1) % EPOCH == 0 or step + 1 == steps:
                progress.epoch(
                    -(-(step + 1) // EPOCH), epochs, mean_loss=sum(history[-1]) / 4
                )
    value = sum(history[-1]) / len(history[-1])
    print(f"ensemble of 4: mean loss after {steps} steps {value:.4f}")

    # 2. A scanned stack of blocks.
    blocks, block_states = make_stack(8, 16, k_stack)
    h0 = jax.random.normal(k_data, (32, 16))
    h, block_states = eqx.filter_jit(stack_forward)(blocks, block_states, h0)
    print(
        f"scan over 8 blocks: output {h.shape}, running mean per block "
        f"{jax.tree.leaves(block_states)[0].shape}"
    )
    path = pathlib.Path(args.out) / "stateful_ensembles.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"member_losses_per_step": history}))
    print(f"losses of each member at each step: {path}")
    return {"loss": value, "models": models, "states": states, "history": history}


if __name__ == "__main__":
    main()

"""Ensembles (filter_vmap) and scans of stacked BatchNorm blocks."""

# Equinox issues #450 and #934 ask how to do these with stateful layers.

import importlib.util
import pathlib

import equinox as eqx
import jax
import numpy as np

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "stateful_ensembles.py"
spec = importlib.util.spec_from_file_location("stateful_ensembles", EXAMPLE)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


def member(tree, i):
    return jax.tree.map(lambda a: a[i] if eqx.is_array(a) else a, tree)


def test_ensemble_members_normalise_over_their_own_batch():
    models, states = example.make_ensemble(3, 2, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 2))
    y, new_states = example.ensemble_forward(models, states, x)
    for i in range(3):
        model_i, state_i = member(models, i), member(states, i)
        yi, si = jax.vmap(
            model_i, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state_i)
        np.testing.assert_allclose(y[i], yi, rtol=1e-6, atol=1e-6)
        bn = model_i.norm
        np.testing.assert_allclose(
            member(new_states, i).get(bn.state_index).var,
            si.get(bn.state_index).var,
            rtol=1e-6,
        )


def test_scan_over_stacked_blocks_equals_a_python_loop():
    blocks, states = example.make_stack(4, 5, jax.random.key(2))
    h0 = jax.random.normal(jax.random.key(3), (8, 5))
    h_scan, states_scan = example.stack_forward(blocks, states, h0)
    h = h0
    for i in range(4):
        block, state = member(blocks, i), member(states, i)
        h, state = jax.vmap(
            block, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(h, state)
        np.testing.assert_allclose(
            member(states_scan, i).get(block.norm.state_index).mean,
            state.get(block.norm.state_index).mean,
            rtol=1e-5,
            atol=1e-6,
        )
    np.testing.assert_allclose(h_scan, h, rtol=1e-5, atol=1e-6)

"""The pairing engine with attribute names (the scheme NNX and PyTorch use), through
a small naming scheme written here: field names, list indices, `Sequential` layers,
overrides, and the checks and messages `load_pairs` gives every scheme."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_bn
from eqx_bn.interop import ConversionError
from eqx_bn.interop.engine import export_pairs, load_pairs, pair, paths_of
from eqx_bn.interop.schemes import (
    IDENTITY,
    VECTOR,
    Naming,
    Rule,
    Slot,
    parameter_slots,
)


def _linear(layer):
    return parameter_slots(
        layer, (("w", "weight", IDENTITY), ("b", "bias", VECTOR)), collection=None
    )


def _norm(layer):
    return parameter_slots(layer, (("g", "scale", IDENTITY),), collection=None) + [
        Slot(None, "avg", "mean", IDENTITY, in_state=True),
        Slot(None, "sq", "var", IDENTITY, in_state=True),
    ]


DOTTED = Naming(
    framework="Dotted",
    source="dotted state",
    separator=".",
    collections=(),
    rules=(Rule(eqx_bn.BatchNorm, "Norm", _norm), Rule(eqx.nn.Linear, "Lin", _linear)),
    numbered=False,
    sequential=(),
    metadata_key="dotted_name",
    paths_function="dotted_paths",
)
UNDER_LAYERS = Naming(**{**DOTTED.__dict__, "sequential": ("layers",)})


class Block(eqx.Module):
    lin: eqx.nn.Linear
    norm: eqx_bn.BatchNorm

    def __init__(self, key):
        self.lin = eqx.nn.Linear(3, 3, key=key)
        self.norm = eqx_bn.BatchNorm(3, use_bias=False)


class Net(eqx.Module):
    blocks: list[Block]
    head: eqx.nn.Sequential
    gain: jax.Array
    renamed: eqx.nn.Linear = eqx.field(metadata={"dotted_name": "fc"})

    def __init__(self, key):
        keys = jax.random.split(key, 4)
        self.blocks = [Block(keys[0]), Block(keys[1])]
        self.head = eqx.nn.Sequential(
            [eqx.nn.Lambda(jax.nn.relu), eqx.nn.Linear(3, 2, key=keys[2])]
        )
        self.gain = jnp.ones(())
        self.renamed = eqx.nn.Linear(2, "scalar", key=keys[3])


@pytest.fixture(scope="module")
def net():
    return eqx.nn.make_with_state(Net)(jax.random.key(0))


def test_attribute_names_follow_fields_indices_and_sequential(net):
    model, _ = net
    paths = paths_of(pair(model, None, DOTTED), DOTTED, "Net")
    assert paths == {
        "blocks.0.lin.w": "model.blocks[0].lin.weight",
        "blocks.0.lin.b": "model.blocks[0].lin.bias",
        "blocks.0.norm.g": "model.blocks[0].norm.scale",
        "blocks.0.norm.avg": "state[model.blocks[0].norm.state_index].mean",
        "blocks.0.norm.sq": "state[model.blocks[0].norm.state_index].var",
        "blocks.1.lin.w": "model.blocks[1].lin.weight",
        "blocks.1.lin.b": "model.blocks[1].lin.bias",
        "blocks.1.norm.g": "model.blocks[1].norm.scale",
        "blocks.1.norm.avg": "state[model.blocks[1].norm.state_index].mean",
        "blocks.1.norm.sq": "state[model.blocks[1].norm.state_index].var",
        "head.1.w": "model.head.layers[1].weight",
        "head.1.b": "model.head.layers[1].bias",
        "gain": "model.gain",
        "fc.w": "model.renamed.weight",
        "fc.b": "model.renamed.bias",
    }
    under_layers = paths_of(pair(model, None, UNDER_LAYERS), UNDER_LAYERS, "Net")
    assert under_layers["head.layers.1.w"] == "model.head.layers[1].weight"


def test_a_bare_layer_and_a_top_level_sequential_are_the_root(key):
    assert set(
        paths_of(pair(eqx.nn.Linear(2, 2, key=key), None, DOTTED), DOTTED, "")
    ) == {
        "w",
        "b",
    }
    seq = eqx.nn.Sequential([eqx.nn.Linear(2, 2, key=key)])
    assert set(paths_of(pair(seq, None, UNDER_LAYERS), UNDER_LAYERS, "")) == {
        "layers.0.w",
        "layers.0.b",
    }


def test_export_then_load_is_the_identity_and_relays(net):
    model, state = net
    pairing = pair(model, None, DOTTED)
    flat = export_pairs(model, state, pairing, DOTTED)
    assert flat[("gain",)].shape == ()  # a 0-d parameter stays 0-d
    doubled = {k: v * 2 for k, v in flat.items()}
    new_model, new_state = load_pairs(
        model, state, doubled, pairing, DOTTED, strict=True, cast=False
    )
    assert new_model.gain.shape == ()
    np.testing.assert_array_equal(new_model.renamed.bias, 2 * model.renamed.bias)
    index = model.blocks[1].norm.state_index
    np.testing.assert_array_equal(new_state.get(index).var, 2 * state.get(index).var)
    again = export_pairs(new_model, new_state, pairing, DOTTED)
    assert all(np.array_equal(again[k], doubled[k]) for k in flat)


def test_overrides_use_the_scheme_separator(net):
    model, state = net
    mapping = {"top.dense": lambda m: m.blocks[0].lin, "head": None}
    paths = paths_of(pair(model, mapping, DOTTED), DOTTED, "Net")
    assert paths["top.dense.w"] == "model.blocks[0].lin.weight"
    assert not any(name.startswith("head.") for name in paths)


def test_every_problem_is_listed_once_in_the_scheme_words(net):
    model, state = net
    pairing = pair(model, None, DOTTED)
    flat = export_pairs(model, state, pairing, DOTTED)
    del flat[("gain",)]
    flat[("blocks", "0", "lin", "w")] = np.zeros((4, 3), np.float32)
    flat[("stray",)] = np.zeros(2, np.float32)
    with pytest.raises(ConversionError) as info:
        load_pairs(model, state, flat, pairing, DOTTED, strict=True, cast=False)
    error = info.value
    message = str(error)
    assert message.startswith("Cannot load the dotted state into Net:\n3 problems.")
    assert error.missing == ("gain -> model.gain: expected float32[]",)
    assert error.mismatched == (
        "blocks.0.lin.w -> model.blocks[0].lin.weight: expected float32[3, 3], "
        "got float32[4, 3]",
    )
    assert error.unexpected == ("stray: float32[2]",)
    assert "`dotted_paths(model)`" in message

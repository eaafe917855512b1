"""The package's public face, and that Flax is never needed to use it."""

import importlib
import pydoc
import re
import subprocess
import sys
import textwrap

import equinox as eqx
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import pytest

import eqx_bn


def test_reexports_are_equinox_objects_not_copies():
    assert eqx_bn.State is eqx.nn.State
    assert eqx_bn.StateIndex is eqx.nn.StateIndex
    assert eqx_bn.make_with_state is eqx.nn.make_with_state
    assert eqx_bn.inference_mode is eqx.nn.inference_mode
    assert issubclass(eqx_bn.BatchNorm, eqx.nn.StatefulLayer)
    assert isinstance(eqx_bn.__version__, str) and eqx_bn.__version__


@pytest.mark.parametrize(
    "module", ["eqx_bn", "eqx_bn.interop", "eqx_bn.models", "eqx_bn.train"]
)
def test_help_lists_every_public_name(module):
    """Issue 21 item 3: `help(eqx_bn)` listed no public names, as pydoc shows only
    the objects a module defines itself unless `__all__` says otherwise."""
    mod = importlib.import_module(module)
    assert mod.__all__ and len(set(mod.__all__)) == len(mod.__all__)
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ names what it lacks: {missing}"
    text = pydoc.render_doc(mod, renderer=pydoc.plaintext)
    unlisted = [
        name
        for name in mod.__all__
        if not re.search(rf"^ +(class )?{name}\b", text, flags=re.M)
    ]
    assert not unlisted, f"help({module}) does not list {unlisted}"


def test_reading_and_converting_a_flax_checkpoint_without_flax(tmp_path):
    """Flax is a test extra only: with `import flax` made to fail, eqx_bn imports,
    reads a Flax msgpack checkpoint and loads it into an Equinox model."""

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))
            return nn.Dense(1)(nn.relu(x))

    variables = MLP().init(jax.random.key(0), jnp.ones((1, 3)))
    path = tmp_path / "ckpt.msgpack"
    path.write_bytes(flax.serialization.to_bytes(variables))
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["flax"] = None  # any `import flax` now raises ImportError
        import equinox as eqx, jax, eqx_bn
        from eqx_bn.models import SeedMLP
        variables = eqx_bn.interop.read_msgpack({str(path)!r})
        model, state = eqx.nn.make_with_state(SeedMLP)(3, key=jax.random.key(1))
        model, state = eqx_bn.interop.load_flax(model, state, variables)
        assert not any(m == "flax" or m.startswith("flax.") for m in sys.modules
                       if sys.modules[m] is not None)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

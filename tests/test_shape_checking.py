"""Shape checking for users' own models: `eqx_bn.typecheck` and jaxtyping's import
hook, under jit / filter_jit / vmap / Sequential, checked once at trace time."""

import importlib.util
import pathlib
import re
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jaxtyping import Array, Float, TypeCheckError, install_import_hook

import eqx_bn
from eqx_bn.models import ResNet, SeedMLP, TorchResNet


def pool(h: Float[Array, "channels height width"]) -> Float[Array, " channels"]:
    return jnp.mean(h, axis=(1, 2))


class Net(eqx.Module):
    """A user's model: conv -> BatchNorm -> relu -> pool -> dense, one image."""

    conv: eqx.nn.Conv2d
    norm: eqx_bn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key, channels=1, width=4, classes=3):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(channels, width, 3, padding=1, key=k1)
        self.norm = eqx_bn.BatchNorm(width)
        self.head = eqx.nn.Linear(width, classes, key=k2)

    def __call__(
        self, x: Float[Array, "channels height width"], state: eqx.nn.State
    ) -> tuple[Float[Array, " classes"], eqx.nn.State]:
        h, state = self.norm(self.conv(x), state)
        return self.head(checked_pool(jax.nn.relu(h))), state


checked_pool = eqx_bn.typecheck(pool)


class CheckedNet(Net):
    __call__ = eqx_bn.typecheck(Net.__call__)


def batched(model):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


@eqx.filter_jit
def filter_jitted(model, x, state):
    return batched(model)(x, state)


TRANSFORMS = {
    "vmap": batched,
    "jax.jit": lambda m: jax.jit(batched(m)),
    "eqx.filter_jit": lambda m: lambda x, s: filter_jitted(m, x, s),
}


@pytest.fixture(scope="module")
def net():
    return eqx.nn.make_with_state(CheckedNet)(jax.random.key(0))


def test_typecheck_is_the_public_name():
    assert eqx_bn.typecheck.__module__ == "eqx_bn._typing"
    assert "typecheck" in dir(eqx_bn)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_checked_model_runs_and_catches_a_wrong_rank(net, transform):
    model, state = net
    run = TRANSFORMS[transform](model)
    logits, _ = run(jnp.ones((2, 1, 5, 5)), state)
    assert logits.shape == (2, 3)
    # A channels axis forgotten: (batch, height, width) is one rank short per example.
    with pytest.raises(TypeCheckError, match="parameter 'x'") as e:
        run(jnp.ones((2, 5, 5)), state)
    assert "f32[5,5]" in str(e.value) and "channels height width" in str(e.value)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_a_dimension_mismatch_names_the_dimension_and_its_size(transform):
    """`pool` declares it keeps `channels`; a body that does not is caught there."""

    @eqx_bn.typecheck
    def wrong(h: Float[Array, "channels height width"]) -> Float[Array, " channels"]:
        return jnp.mean(h, axis=(0, 1))  # pools the wrong axes: gives `width`

    run = TRANSFORMS[transform](lambda x, s: (wrong(x), s))
    with pytest.raises(TypeCheckError, match="return value") as e:
        run(jnp.ones((2, 4, 5, 6)), None)
    assert re.search(r"channels=4", str(e.value)) and "f32[6]" in str(e.value)


def test_check_runs_at_trace_time_only(net):
    """The checked model traces to exactly the program of the unchecked one: no
    per-step cost under jit (benchmarks/typecheck_overhead.py times it)."""
    model, state = net
    plain = Net(jax.random.key(0))
    plain = eqx.tree_at(lambda m: m.norm, plain, model.norm)  # same state keys
    x = jnp.ones((2, 1, 5, 5))
    checked_jaxpr = jax.make_jaxpr(batched(model))(x, state)
    unchecked_jaxpr = jax.make_jaxpr(batched(plain))(x, state)
    assert str(checked_jaxpr) == str(unchecked_jaxpr)


class Widen(eqx.Module):
    """A user layer inside `eqx.nn.Sequential`, which calls it as `layer(x, key=)`."""

    linear: eqx.nn.Linear

    @eqx_bn.typecheck
    def __call__(
        self, x: Float[Array, " features"], *, key=None
    ) -> Float[Array, " hidden"]:
        return self.linear(x)


def test_checks_inside_sequential():
    keys = jax.random.split(jax.random.key(1), 2)
    seq, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            Widen(eqx.nn.Linear(3, 8, key=keys[0])),
            eqx_bn.BatchNorm(8),
            eqx.nn.Lambda(jax.nn.relu),
            Widen(eqx.nn.Linear(8, 2, key=keys[1])),
        ]
    )
    run = TRANSFORMS["eqx.filter_jit"](seq)
    y, _ = run(jnp.ones((4, 3)), state)
    assert y.shape == (4, 2)
    with pytest.raises(TypeCheckError, match="parameter 'x'") as e:
        run(jnp.ones((4, 3, 1)), state)
    assert "Widen.__call__" in str(e.value)


def test_eqx_bn_layer_error_inside_a_checked_model_names_the_numbers(net):
    """The layer's own check (not jaxtyping's) names input_size and the shape."""
    model, state = net
    bad = eqx.tree_at(
        lambda m: m.conv, model, eqx.nn.Conv2d(1, 5, 3, key=jax.random.key(2))
    )
    with pytest.raises(ValueError, match=re.escape("x has 5 channels on axis 0")) as e:
        jax.eval_shape(batched(bad), jnp.ones((2, 1, 5, 5)), state)
    assert "input_size=4" in str(e.value)


def test_import_hook_checks_a_user_package_without_decorators(tmp_path, monkeypatch):
    package = tmp_path / "typed_user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            import jax.numpy as jnp
            from jaxtyping import Array, Float

            def pool(h: Float[Array, "channels h w"]) -> Float[Array, " channels"]:
                return jnp.mean(h, axis=(1, 2))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with install_import_hook("typed_user_pkg", "beartype.beartype"):
            import typed_user_pkg
        assert jax.jit(typed_user_pkg.pool)(jnp.ones((4, 2, 2))).shape == (4,)
        with pytest.raises(TypeCheckError, match="parameter 'h'"):
            jax.jit(typed_user_pkg.pool)(jnp.ones((4, 2)))
    finally:
        sys.modules.pop("typed_user_pkg", None)


# --- eqx_bn's own models name the dimension they expect, with the numbers ---


@pytest.fixture(scope="module")
def resnet():
    """Built abstractly: the checks raise before any weight is used."""

    def build(channels_last):
        return eqx.filter_eval_shape(
            eqx.nn.make_with_state(ResNet),
            (1,),
            10,
            num_filters=4,
            channels_last=channels_last,
            key=jax.random.key(0),
        )

    return build


@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_names_in_channels(resnet, channels_last):
    model, state = resnet(channels_last)
    shape = (2, 8, 8, 4) if channels_last else (2, 4, 8, 8)
    with pytest.raises(ValueError, match="the image has 4 channels") as e:
        jax.eval_shape(batched(model), jnp.ones(shape), state)
    assert "expected in_channels=3" in str(e.value)


@pytest.mark.parametrize("channels_last", [False, True])
def test_torchvision_resnet_names_in_channels(channels_last):
    # The message used to show the shape after the model's internal move to
    # channels last, not the image the user passed.
    model, state = eqx.filter_eval_shape(
        eqx.nn.make_with_state(eqx_bn.models.TorchResNet18),
        num_classes=10,
        channels_last=channels_last,
        key=jax.random.key(0),
    )
    shape = (2, 32, 32, 1) if channels_last else (2, 1, 32, 32)
    with pytest.raises(ValueError, match="TorchResNet: the image has 1 channels") as e:
        jax.eval_shape(batched(model), jnp.ones(shape), state)
    assert f"(shape {shape[1:]})" in str(e.value)
    assert "expected in_channels=3" in str(e.value)


def test_resnet_channels_last_image_to_a_channels_first_model_names_the_flag(resnet):
    model, state = resnet(False)
    with pytest.raises(ValueError, match="channels_last=True"):
        jax.eval_shape(batched(model), jnp.ones((2, 8, 8, 3)), state)


def _abstract(make, *args, **kwargs):
    return eqx.filter_eval_shape(
        eqx.nn.make_with_state(make), *args, key=jax.random.key(0), **kwargs
    )


@pytest.mark.parametrize(
    "name, build, batch",
    [
        ("ResNet", lambda: _abstract(ResNet, (1,), 10, num_filters=4), (2, 3, 8, 8)),
        (
            "TorchResNet",
            lambda: _abstract(TorchResNet, "basic", (1, 1, 1, 1), width=4),
            (2, 3, 8, 8),
        ),
        ("SeedMLP", lambda: _abstract(SeedMLP, 2), (4, 2)),
    ],
)
def test_batch_without_vmap_says_vmap(name, build, batch):
    """Issue 21: a whole batch passed without jax.vmap gave jaxtyping's print-out
    of the whole State; the model's own message, naming the vmap call, comes
    first."""
    model, state = build()
    with pytest.raises(ValueError, match=f"^{name}: x has shape") as e:
        jax.eval_shape(model, jnp.ones(batch), state)
    message = str(e.value)
    assert "a whole batch?" in message
    assert "jax.vmap(model, axis_name='batch', in_axes=(0, None)" in message
    assert "State" not in message and "Called with parameters" not in message


def test_integer_image_is_named_before_the_type_check(resnet):
    model, state = resnet(False)
    with pytest.raises(TypeError, match="x is int32\\[3, 8, 8\\], expected a floating"):
        jax.eval_shape(model, jnp.ones((3, 8, 8), jnp.int32), state)


def test_seed_mlp_names_in_features():
    model, state = eqx.filter_eval_shape(
        eqx.nn.make_with_state(SeedMLP), 2, key=jax.random.key(0)
    )
    with pytest.raises(ValueError, match="x has 3 features") as e:
        jax.eval_shape(batched(model), jnp.ones((4, 3)), state)
    assert "in_features=2" in str(e.value)


@pytest.mark.slow
def test_typed_model_example_catches_both_mistakes(tmp_path):
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "typed_model.py"
    spec = importlib.util.spec_from_file_location("typed_model", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--smoke", "--out", str(tmp_path)])
    assert out["steps"] == 4
    channel, shrink = out["caught"].values()
    assert "parameter 'batch'" in channel and "f32[360,8,8]" in channel
    assert "return value of typed_model.conv_block" in shrink
    assert "f32[32,6,6]" in shrink and "height=8" in shrink and "width=8" in shrink
    assert "Called with parameters" not in shrink  # the summary drops the dump
    assert "height=8" in (tmp_path / "typed_model_errors.txt").read_text()


@pytest.mark.slow
def test_overhead_benchmark_runs(capsys):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location(
        "typecheck_overhead", path / "typecheck_overhead.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick"])
    assert set(result["jit_ms"]) == {"unchecked", "checked"}
    assert result["jit_ratio"] > 0 and result["eager_ratio"] > 0
    assert "jitted step, ms/call" in capsys.readouterr().out

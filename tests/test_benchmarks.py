"""The benchmark script runs, and the fused training path keeps its memory traffic.

No timing here: the traffic is read from the optimised HLO of the compiled program
(`benchmarks/run.py:hlo_traffic`), which does not depend on the machine's load. It
guards the fusion work in `eqx_bn/_numerics.py`: before it, the forward+backward
program wrote `x - shift`, `x - mean` and `g * mul` out in full and read them back
(14 input-sized transfers instead of 8).
"""

import functools
import importlib.util
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import flax_promotion

import eqx_bn

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (64, 64, 32, 32)  # ResNet-like; only compiled, never run
FUSED_TRAFFIC = 8  # read x twice (stats), g and x (two sums), g and x + write dx


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "run.py"
    spec = importlib.util.spec_from_file_location("bench_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_traffic(
    bench, axis_name, dtype=jnp.float32, masked=False, channels_last=False
) -> float:
    """Traffic of jit(grad) of sum(y * g) for eqx_bn, in units of x's size."""
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        SHAPE[1], axis_name, channels_last=channels_last
    )
    params, static = eqx.partition(bn, eqx.is_inexact_array)
    shape = SHAPE[:1] + SHAPE[2:] + SHAPE[1:2] if channels_last else SHAPE
    x = jnp.zeros(shape, dtype)
    g = jnp.zeros(shape, jnp.float32)
    keep = jnp.arange(SHAPE[0]) % 4 != 0

    def loss(params, x, keep):
        model = eqx.combine(params, static)
        if axis_name is None:
            mask = keep.reshape((-1,) + (1,) * (x.ndim - 1)) if masked else None
            y, new_state = model(x, state, mask=mask)
        else:
            y, new_state = jax.vmap(
                lambda xi, ki: model(xi, state, mask=ki if masked else None),
                axis_name=axis_name,
                out_axes=(0, None),
            )(x, keep)
        return jnp.sum(y.astype(jnp.float32) * g), new_state

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    text = grad.lower(params, x, keep).compile().as_text()
    return bench.hlo_traffic(text, x.nbytes, x.size)


@pytest.mark.parametrize(
    "axis_name, masked, channels_last",
    [("batch", True, False), (None, False, False), ("batch", True, True)],
)
def test_fused_training_traffic(bench, axis_name, masked, channels_last):
    # A per-example mask must not cost extra passes (its select is applied to the
    # per-example partial sums, not written out in full).
    traffic = _train_traffic(
        bench, axis_name, masked=masked, channels_last=channels_last
    )
    assert traffic <= FUSED_TRAFFIC


def test_bfloat16_input_is_not_converted_in_full(bench):
    # Units are bfloat16-sized here, so the float32 g counts twice. Each pass
    # converts its own copy of x: one float32 copy of x shared by the passes (17)
    # would be written once and read three times.
    assert _train_traffic(bench, "batch", jnp.bfloat16) <= 15


def test_fused_training_moves_less_than_flax(bench):
    x = jnp.zeros(SHAPE[:1] + SHAPE[2:] + SHAPE[1:2], jnp.float32)  # channels last
    with flax_promotion():
        train, _, params, stats = bench._flax_linen_layer(x, -1)
        text = jax.jit(train).lower(params, x, stats, x).compile().as_text()
    flax = bench.hlo_traffic(text, x.nbytes, x.size)
    assert _train_traffic(bench, None) < flax


def test_copy_traffic_is_two(bench):
    x = jnp.zeros(SHAPE, jnp.float32)
    text = jax.jit(lambda x: x * 2).lower(x).compile().as_text()
    assert bench.hlo_traffic(text, x.nbytes, x.size) == 2


@pytest.mark.slow
def test_quick_benchmark_runs(bench, tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    with flax_promotion():  # Flax's code; this session's config is strict
        bench.main(["--quick", "--out", str(out)])
    text = out.read_text()
    assert text.splitlines()[-1] in capsys.readouterr().out  # printed as written
    for heading in ("### layer fwd+bwd", "### layer eval", "### mlp step"):
        assert heading in text
    names = ("x*2 (copy)", "flax.linen", "eqx_bn (vmap)", bench.EQX_LAST, "eqx_bn")
    for name in names:
        assert f"| {name} |" in text
    assert "fails:" not in text


def _resnet_layout_traffic(bench, channels_last: bool) -> float:
    """MB of transposes and copies in a jitted training step of a small ResNet."""
    from eqx_bn.models import ResNet

    model, state = bench._build(
        ResNet,
        (1, 1),
        10,
        num_filters=16,
        channels_last=channels_last,
        key=jax.random.key(0),
    )
    shape = (16, 32, 32, 3) if channels_last else (16, 3, 32, 32)
    images = jnp.zeros(shape, jnp.float32)

    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params, state, x):
        train = jax.vmap(
            eqx.combine(params, static),
            axis_name="batch",
            in_axes=(0, None),
            out_axes=(0, None),
        )
        logits, state = train(x, state)
        return jnp.sum(logits), state

    step = jax.jit(jax.grad(loss, has_aux=True))
    text = step.lower(params, state, images).compile().as_text()
    return bench.hlo_traffic(text, 1e6, 2**16, "(transpose|copy)")


def _flax_resnet_layout_traffic(bench) -> float:
    """The same for the Flax twin of the ResNet (channels last, Flax's layout)."""
    from flax_reference import ResNet as FlaxResNet

    module = FlaxResNet(stage_sizes=[1, 1], num_classes=10, num_filters=16)
    images = jnp.zeros((16, 32, 32, 3), jnp.float32)
    with flax_promotion():
        # Shapes are all that `lower` needs: compiling Flax's init took 5.5 s.
        variables = jax.eval_shape(
            functools.partial(module.init, train=False), jax.random.key(0), images
        )

        def loss(params, stats, x):
            logits, updates = module.apply(
                {"params": params, "batch_stats": stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(logits), updates

        step = jax.jit(jax.grad(loss, has_aux=True))
        lowered = step.lower(variables["params"], variables["batch_stats"], images)
    text = lowered.compile().as_text()
    return bench.hlo_traffic(text, 1e6, 2**16, "(transpose|copy)")


def test_resnet_does_not_transpose_activations(bench):
    # A channels-first network would have XLA transpose its activations in and out
    # of every convolution (2.3x Flax's transpose bytes here). eqx_bn's ResNet
    # computes channels last whatever its input layout: only what Flax's own model
    # moves is left (the activations that the kernel gradients read transposed;
    # the kernels are below the size counted here), plus, for channels-first
    # images, one move of the input batch (read and written).
    flax = _flax_resnet_layout_traffic(bench)
    assert _resnet_layout_traffic(bench, channels_last=True) <= flax
    image_mb = 16 * 3 * 32 * 32 * 4 / 1e6
    assert _resnet_layout_traffic(bench, channels_last=False) <= flax + 2 * image_mb

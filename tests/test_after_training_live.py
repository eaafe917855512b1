"""Issue 23 against live PyTorch: `BatchNorm(momentum=None)` against
`nn.BatchNorm2d(momentum=None)`, `eqx_bn.recalibrate` against
`torch.optim.swa_utils.update_bn` and `eqx_bn.freeze_batch_norms` against
`torchvision.ops.FrozenBatchNorm2d`, on torchvision's ResNet-18 loaded with
`load_torch` (small 32x32 inputs).

Needs the `torch` extra; skipped without it. Each torch result is computed in
float64 and float32: eqx_bn's float32 result must be within a few times torch's
own float32 error plus epsilons of the value, the bound of `assert_as_accurate` in
`tests/test_interop_torch.py`. The torch-free tier is `test_cumulative_average.py`,
`test_recalibrate.py` and `test_freeze.py`, against the recorded references.
"""

import copy
import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import eqx_bn  # noqa: E402
from eqx_bn.interop import export_torch, load_torch  # noqa: E402
from eqx_bn.models import TorchResNet18  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "data"))
from make_after_training_reference import _freeze  # noqa: E402
from test_interop_torch import FACTOR, _eval, _train_step  # noqa: E402

pytestmark = pytest.mark.live

NUM_CLASSES = 10


def _numpy(t):
    return t.detach().cpu().numpy().copy()


def assert_within(ours, f64, f32, what):
    """`ours` within FACTOR times torch's float32 error plus float32 epsilons of
    the value, of the float64 result."""
    f64 = np.asarray(f64, np.float64)
    err = float(np.max(np.abs(np.asarray(f32, np.float64) - f64), initial=0.0))
    tol = FACTOR * (err + np.finfo(np.float32).eps * np.max(np.abs(f64), initial=0))
    worst = float(np.max(np.abs(np.asarray(ours, np.float64) - f64), initial=0.0))
    assert worst <= tol, f"{what}: off by {worst:.3g}, allowed {tol:.3g}"


def test_momentum_none_equals_torch():
    """Five training steps of different batch sizes and an eval call."""
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, 4, 3, 3, generator=gen) * 3 + 2 for n in (2, 5, 1, 4, 3)]
    results = {}
    for dtype in (torch.float64, torch.float32):
        bn = torch.nn.BatchNorm2d(4, momentum=None).to(dtype)
        out = []
        with torch.no_grad():
            for x in xs:
                y = bn(x.to(dtype))
                out.append((_numpy(y), _numpy(bn.running_mean), _numpy(bn.running_var)))
        results[dtype] = (out, int(bn.num_batches_tracked))
    # The two-pass variance, as in test_cumulative_average.py's `_cma_layer`.
    ours, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        4, None, momentum=None, unbiased_running_var=True, use_fast_variance=False
    )
    for i, x in enumerate(xs):
        y, state = ours(jnp.asarray(x.numpy()), state)
        entry = state.get(ours.state_index)
        for got, a, b, what in zip(
            (y, entry.mean, entry.var),
            results[torch.float64][0][i],
            results[torch.float32][0][i],
            ("y", "mean", "var"),
        ):
            assert_within(got, a, b, f"step {i} {what}")
    assert int(entry.num_batches) == results[torch.float32][1] == len(xs)


def _resnet18():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.3, 0.3, generator=gen)
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.5, 2, generator=gen)
    return net.eval()


@pytest.fixture(scope="module")
def resnet18():
    """torchvision's ResNet-18 and the eqx_bn one loaded from its state_dict."""
    net = _resnet18()
    model, state = eqx.filter_eval_shape(
        eqx.nn.make_with_state(TorchResNet18), NUM_CLASSES, key=jax.random.key(0)
    )
    model, state = load_torch(model, state, net.state_dict())
    return net, model, state


def test_recalibrate_equals_update_bn(resnet18):
    """Three batches of 4 and a last one of 2: every BatchNorm's running mean,
    variance and count as `update_bn` leaves them, and the eval logits after."""
    net, model, state = resnet18
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 3, 32, 32, generator=gen) for n in (4, 4, 4, 2)]
    torch_results = {}
    for dtype in (torch.float64, torch.float32):
        copied = copy.deepcopy(net).to(dtype)
        torch.optim.swa_utils.update_bn([x.to(dtype) for x in xs], copied)
        with torch.no_grad():
            logits = _numpy(copied(xs[0].to(dtype)))
        torch_results[dtype] = (
            {k: v.numpy() for k, v in copied.state_dict().items()},
            logits,
        )
    model = eqx.nn.inference_mode(model)
    new = eqx_bn.recalibrate(model, state, [jnp.asarray(x.numpy()) for x in xs])
    exported = export_torch(model, new, num_batches_tracked=len(xs))
    (sd64, logits64), (sd32, logits32) = torch_results.values()
    stats = [k for k in exported if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 20
    for key in stats:
        assert_within(exported[key], sd64[key], sd32[key], key)
    counts = [k for k in sd32 if k.endswith("num_batches_tracked")]
    assert all(int(sd32[k]) == len(xs) for k in counts)
    ours = _eval(model, new, jnp.asarray(xs[0].numpy()))
    assert_within(ours, logits64, logits32, "eval logits")


def test_freeze_equals_frozen_batchnorm2d(resnet18):
    """Training mode: `FrozenBatchNorm2d`'s logits and conv/fc gradients."""
    net, model, state = resnet18
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (4,), generator=gen)
    torch_results = {}
    for dtype in (torch.float64, torch.float32):
        frozen = _freeze(copy.deepcopy(net).to(dtype)).train()
        logits = frozen(x.to(dtype))
        torch.nn.functional.cross_entropy(logits, labels).backward()
        grads = {n: _numpy(p.grad) for n, p in frozen.named_parameters()}
        torch_results[dtype] = (_numpy(logits), grads)
    frozen = eqx_bn.freeze_batch_norms(eqx.nn.inference_mode(model, False))
    logits, new_state, grads = _train_step(
        frozen, state, jnp.asarray(x.numpy()), jnp.asarray(labels.numpy(), jnp.int32)
    )
    (l64, g64), (l32, g32) = torch_results.values()
    assert_within(logits, l64, l32, "logits")
    exported = export_torch(grads, state, num_batches_tracked=None)
    assert set(g64) < set(exported)
    for key in g64:
        assert_within(exported[key], g64[key], g32[key], key)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)

"""eqx_bn against live PyTorch: torchvision's ResNet-18 and -50, trained a couple of
SGD steps in torch, saved with `torch.save` and as safetensors, loaded with torch
blocked, must give torch's eval logits and train-mode step (logits, running
statistics, parameter gradients) within float32 rounding; exported back, torch
must reproduce them.

Needs the `torch` extra (`pip install -e ".[torch]"`); skipped without it. The
accuracy bound is the one of `tests/test_interop_torch.py` (see
`assert_as_accurate` there and `tests/data/make_torch_reference.py`).
"""

import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
safetensors_torch = pytest.importorskip("safetensors.torch")

from eqx_bn.interop import (  # noqa: E402
    export_torch,
    load_torch,
    read_checkpoint,
    read_safetensors,
    read_torch,
    write_safetensors,
)
from eqx_bn.models import TorchResNet, TorchResNet18, TorchResNet50  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "data"))
import make_torch_reference as reference  # noqa: E402
from test_interop_torch import _eval, _train_step, assert_as_accurate  # noqa: E402

pytestmark = pytest.mark.live

MODELS = {
    "resnet18": (torchvision.models.resnet18, TorchResNet18),
    "resnet50": (torchvision.models.resnet50, TorchResNet50),
}
NUM_CLASSES = 10


def _trained(name: str) -> torch.nn.Module:
    """torchvision's model, randomly initialised, two SGD steps in train mode."""
    torch.manual_seed(0)
    net = MODELS[name][0](num_classes=NUM_CLASSES)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.3, 0.3, generator=gen)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()
    for _ in range(2):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        labels = torch.randint(0, NUM_CLASSES, (4,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), labels).backward()
        opt.step()
    return net


def _references(name: str, net: torch.nn.Module, x, labels) -> dict:
    """Eval logits and one train step of `net` in float64 (the reference), with
    the errors of float32 and of rounding every layer, as make_torch_reference.py
    makes the recorded ones (what `assert_as_accurate` reads)."""
    f64 = reference._results(reference.copy.deepcopy(net).double(), x.double(), labels)
    f32 = reference._results(reference.copy.deepcopy(net), x, labels)
    rounded = []
    for seed in range(3):
        torch.manual_seed(seed)
        rounded.append(
            reference._results(reference._rounded_copy(net), x.double(), labels)
        )
    terms = reference._term_sizes(net, x.double(), labels)
    refs = reference._with_error(f64, f32, f"{name}/", rounded, terms)
    refs["x"], refs["labels"] = x.numpy(), labels.numpy().astype(np.int32)
    return refs


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, tmp_path_factory):
    """The trained torch model, its files, the reference results, and the
    eqx_bn model loaded from the .pt file with torch blocked."""
    name = request.param
    net = _trained(name)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (4,), generator=gen)
    refs = _references(name, net, x, labels)

    folder = tmp_path_factory.mktemp(name)
    state_dict = net.state_dict()
    torch.save(state_dict, folder / "model.pt")
    safetensors_torch.save_file(state_dict, folder / "model.safetensors")

    blocked = pytest.MonkeyPatch()
    blocked.setitem(sys.modules, "torch", None)  # `import torch` now fails
    try:
        from_pt = read_torch(folder / "model.pt")
        from_st = read_checkpoint(folder / "model.safetensors")
        model, state = eqx.filter_eval_shape(
            eqx.nn.make_with_state(MODELS[name][1]),
            NUM_CLASSES,
            key=jax.random.key(0),
        )
        model, state = load_torch(model, state, from_pt)
    finally:
        blocked.undo()
    return name, net, refs, folder, from_pt, from_st, model, state


def test_pt_and_safetensors_read_as_torch_wrote_them(case):
    name, net, refs, folder, from_pt, from_st, model, state = case
    expected = {k: v.numpy() for k, v in net.state_dict().items()}
    assert list(from_pt) == list(expected)  # in the state_dict's order
    assert set(from_st) == set(expected)
    for read in (from_pt, from_st):
        for key, value in expected.items():
            assert read[key].dtype == value.dtype, key
            np.testing.assert_array_equal(read[key], value, err_msg=key)


def test_eval_logits_equal_torch(case):
    name, net, refs, *_, model, state = case
    logits = _eval(model, state, jnp.asarray(refs["x"]))
    assert_as_accurate(logits, refs, f"{name}/eval_logits")


def test_train_step_equals_torch(case):
    """Logits, every running statistic and every parameter gradient."""
    name, net, refs, *_, model, state = case
    x, labels = jnp.asarray(refs["x"]), jnp.asarray(refs["labels"])
    logits, new_state, grads = _train_step(model, state, x, labels)
    assert_as_accurate(logits, refs, f"{name}/train_logits")
    stats = export_torch(model, new_state, num_batches_tracked=None)
    grads = export_torch(grads, new_state, num_batches_tracked=None)
    checked = 0
    for key in stats:
        kind, ours = ("state", stats) if "running" in key else ("grad", grads)
        assert_as_accurate(ours[key], refs, f"{name}/{kind}/{key}")
        checked += 1
    assert checked == len(dict(net.named_parameters())) + 2 * sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()
    )


@pytest.mark.parametrize("case", ["resnet18"], indirect=True)
def test_channels_last_model_equals_torch(case):
    name, net, refs, *_, from_pt, from_st, model, state = case
    model, state = eqx.filter_eval_shape(
        eqx.nn.make_with_state(TorchResNet18),
        NUM_CLASSES,
        channels_last=True,
        key=jax.random.key(0),
    )
    model, state = load_torch(model, state, from_st)
    logits = _eval(model, state, jnp.moveaxis(jnp.asarray(refs["x"]), 1, -1))
    assert_as_accurate(logits, refs, f"{name}/eval_logits")


def test_export_back_into_torch_reproduces_the_logits(case, tmp_path):
    """export_torch -> load_state_dict (strict) -> torch eval gives eqx_bn's logits;
    write_safetensors -> safetensors.torch.load_file gives the same tensors."""
    name, net, refs, folder, from_pt, from_st, model, state = case
    exported = export_torch(model, state, num_batches_tracked=2)
    fresh = MODELS[name][0](num_classes=NUM_CLASSES)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    fresh.eval()
    with torch.no_grad():
        torch_logits = fresh(torch.from_numpy(refs["x"])).numpy()
    ours = np.asarray(_eval(model, state, jnp.asarray(refs["x"])))
    assert_as_accurate(torch_logits, refs, f"{name}/eval_logits")
    assert_as_accurate(ours, refs, f"{name}/eval_logits")

    write_safetensors(tmp_path / "out.safetensors", exported)
    back = safetensors_torch.load_file(tmp_path / "out.safetensors")
    assert set(back) == set(exported)
    for key, value in exported.items():
        np.testing.assert_array_equal(back[key].numpy(), value, err_msg=key)
    assert read_safetensors(tmp_path / "out.safetensors").keys() == exported.keys()


def test_batch_norm_one_value_per_channel_like_torch():
    """PyTorch refuses training on one value per channel; so does the option."""
    import eqx_bn

    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.nn.BatchNorm2d(2).train()(torch.ones(1, 2, 1, 1))
    bn, st = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        2, None, unbiased_running_var=True
    )
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(jnp.ones((1, 2, 1, 1)), st)


def test_torch_to_equinox_example_with_torch(tmp_path):
    """With torch, the example makes its checkpoint with torchvision's classes, and
    torch reproduces the fine-tuned model's logits from the exported file."""
    from test_interop_torch import _load_example

    out = _load_example().main(["--smoke", "--out", str(tmp_path)])
    assert out["source"] == str(tmp_path / "torch_resnet.pt")
    assert out["torch_diff"] is not None and out["torch_diff"] < 1e-4


@pytest.mark.parametrize("case", ["resnet18"], indirect=True)
def test_load_torch_takes_torch_tensors(case):
    """A state_dict of torch tensors (parameters requiring grad, bfloat16) loads
    as its numpy form does."""
    name, net, refs, *_, from_pt, from_st, model, state = case
    params = dict(net.named_parameters())  # requires_grad=True
    buffers = dict(net.named_buffers())
    loaded, _ = load_torch(model, state, {**params, **buffers})
    np.testing.assert_array_equal(loaded.fc.weight, from_pt["fc.weight"])
    half = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in net.state_dict().items()
    }
    loaded, _ = load_torch(model, state, half, cast=True)
    want = half["layer1.0.conv1.weight"].float().numpy()  # (out, in, kh, kw)
    np.testing.assert_array_equal(
        loaded.layer1[0].conv1.weight, np.transpose(want, (2, 3, 1, 0))
    )


# (groups, width_per_group) of a narrow ResNeXt and a narrow wide ResNet: 8 stem
# channels, so the 3x3 convolutions have 16 ... 128 (ResNeXt, in 4 groups) and
# 16 ... 128 (wide) channels.
VARIANTS = {"resnext": (4, 32), "wide": (1, 128)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    """torchvision's own grouped / widened Bottleneck in a narrow ResNet (issue 21:
    these state_dicts gave 176 shape problems), with BatchNorms away from their
    initial values, its references, and the eqx_bn model loaded from it."""
    name = request.param
    groups, width_per_group = VARIANTS[name]
    torch.manual_seed(0)
    net = reference.NarrowResNet(
        torchvision.models.resnet.Bottleneck,
        [1, 1, 1, 1],
        NUM_CLASSES,
        8,
        groups=groups,
        width_per_group=width_per_group,
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.3, 0.3, generator=gen)
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    x = torch.randn(4, 3, 24, 24, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (4,), generator=gen)
    refs = _references(name, net, x, labels)
    model, state = eqx.filter_eval_shape(
        eqx.nn.make_with_state(TorchResNet),
        "bottleneck",
        (1, 1, 1, 1),
        NUM_CLASSES,
        width=8,
        groups=groups,
        width_per_group=width_per_group,
        key=jax.random.key(0),
    )
    state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
    model, state = load_torch(model, state, state_dict)
    return name, net, refs, model, state


def test_resnext_and_wide_eval_logits_equal_torch(variant):
    name, net, refs, model, state = variant
    assert model.layer1[0].conv2.groups == VARIANTS[name][0]
    logits = _eval(model, state, jnp.asarray(refs["x"]))
    assert_as_accurate(logits, refs, f"{name}/eval_logits")


@pytest.mark.parametrize("variant", ["resnext"], indirect=True)
def test_resnext_train_step_equals_torch(variant):
    """Logits, every running statistic and every parameter gradient through the
    grouped convolutions (the wide variant differs only in its widths)."""
    name, net, refs, model, state = variant
    x, labels = jnp.asarray(refs["x"]), jnp.asarray(refs["labels"])
    logits, new_state, grads = _train_step(model, state, x, labels)
    assert_as_accurate(logits, refs, f"{name}/train_logits")
    stats = export_torch(model, new_state, num_batches_tracked=None)
    grads = export_torch(grads, new_state, num_batches_tracked=None)
    for key in stats:
        kind, ours = ("state", stats) if "running" in key else ("grad", grads)
        assert_as_accurate(ours[key], refs, f"{name}/{kind}/{key}")


def test_export_without_num_batches_tracked_loads_strictly_in_torch():
    """`num_batches_tracked=None`, as export_torch's docstring says: torchvision's
    ResNet-18 takes it with `strict=True` and keeps its own counts."""
    model, state = eqx.nn.make_with_state(TorchResNet18)(
        num_classes=NUM_CLASSES, key=jax.random.key(0)
    )
    exported = export_torch(model, state, num_batches_tracked=None)
    net = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    net.bn1.num_batches_tracked.fill_(7)
    result = net.load_state_dict(
        {k: torch.from_numpy(v) for k, v in exported.items()}, strict=True
    )
    assert not result.missing_keys and not result.unexpected_keys
    assert int(net.bn1.num_batches_tracked) == 7
    assert int(net.layer1[0].bn1.num_batches_tracked) == 0
    np.testing.assert_array_equal(net.fc.weight.detach().numpy(), model.fc.weight)

"""PyTorch interop without torch: numerics and reading checked against reference files
that `tests/data/make_torch_reference.py` made with torch (see its docstring), plus
hostile and corrupt files.

Numerics are measured against PyTorch's float64 result: eqx_bn in float32 must be as
close to it as PyTorch's own float32 computation is (`err/...` in the references), up
to a small factor, and a few units in the last place where PyTorch happened to be
exact. That is "equal to PyTorch within float32 rounding", without assuming which
float32 rounding order is the right one.
"""

import importlib.util
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import zipfile

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import assert_as_accurate as assert_within_rounding

import eqx_bn
from eqx_bn.interop import (
    CheckpointError,
    ConversionError,
    export_torch,
    load_torch,
    read_checkpoint,
    read_msgpack,
    read_safetensors,
    read_torch,
    to_msgpack_bytes,
    to_safetensors_bytes,
    torch_paths,
    write_safetensors,
)
from eqx_bn.models import (
    TorchResNet,
    TorchResNet18,
    TorchResNet34,
    TorchResNet50,
    TorchResNeXt50_32x4d,
    TorchWideResNet50_2,
)

DATA = pathlib.Path(__file__).resolve().parent / "data" / "torch"
FACTOR = 4  # how many times PyTorch's own float32 error eqx_bn may be off
NETS = {"basic": ("basic", 2), "bottleneck": ("bottleneck", 1)}


def assert_as_accurate(ours, refs, key):
    """`helpers.assert_as_accurate` with PyTorch as the reference library."""
    assert_within_rounding(ours, refs, key, FACTOR, "PyTorch")


# ----------------------------------------------------------------- BatchNorm numerics


@pytest.fixture(scope="module")
def bn_ref():
    return dict(np.load(DATA / "batch_norm.npz"))


def _torch_bn(ref, axis_name=None):
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3, axis_name, momentum=0.9, eps=1e-5, unbiased_running_var=True
    )
    bn = eqx.tree_at(
        lambda b: (b.scale, b.bias),
        bn,
        (jnp.asarray(ref["weight"]), jnp.asarray(ref["bias"])),
    )
    stats = eqx_bn.RunningStats(
        jnp.asarray(ref["running_mean0"]), jnp.asarray(ref["running_var0"])
    )
    return bn, state.set(bn.state_index, stats)


def _check_bn(ref, case, y, stats, dx, dscale, dbias):
    assert_as_accurate(y, ref, f"{case}/y")
    for name, ours in (("running_mean", stats.mean), ("running_var", stats.var)):
        assert_as_accurate(ours, ref, f"{case}/{name}")
    for name, ours in (("dx", dx), ("dweight", dscale), ("dbias", dbias)):
        assert_as_accurate(ours, ref, f"{case}/{name}")


def test_batch_norm_matches_torch_whole_batch(bn_ref):
    bn, state = _torch_bn(bn_ref)

    def f(x, scale, bias):
        b = eqx.tree_at(lambda b: (b.scale, b.bias), bn, (scale, bias))
        y, new = b(x, state)
        return y, new.get(b.state_index)

    args = (jnp.asarray(bn_ref["x"]), bn.scale, bn.bias)
    (y, stats), vjp = jax.vjp(f, *args)
    zero = jax.tree.map(jnp.zeros_like, stats)
    dx, dscale, dbias = vjp((jnp.asarray(bn_ref["dy"]), zero))
    _check_bn(bn_ref, "full", y, stats, dx, dscale, dbias)


def _vmapped(bn, state, x, mask, names):
    """The layer per example under one or two nested named vmap axes."""
    if len(names) == 1:
        return jax.vmap(
            lambda x, m: bn(x, state, mask=m),
            axis_name=names[0],
            out_axes=(0, None),
        )(x, mask)
    inner = jax.vmap(
        lambda x, m: bn(x, state, mask=m), axis_name=names[1], out_axes=(0, None)
    )
    return jax.vmap(inner, axis_name=names[0], out_axes=(0, None))(x, mask)


@pytest.mark.parametrize("names", [("batch",), ("a", "b")])
def test_batch_norm_matches_torch_on_named_axes_and_masks(bn_ref, names):
    """n counts the unmasked elements over every named axis: masking examples out
    gives PyTorch's step on the remaining ones."""
    keep = bn_ref["keep"]
    bn, state = _torch_bn(bn_ref, names if len(names) > 1 else names[0])
    x, dy = jnp.asarray(bn_ref["x"]), jnp.asarray(bn_ref["dy"])
    shape = (2, 3) if len(names) > 1 else (6,)

    def f(x, scale, bias):
        b = eqx.tree_at(lambda b: (b.scale, b.bias), bn, (scale, bias))
        xs = x.reshape(*shape, *x.shape[1:])
        y, new = _vmapped(b, state, xs, jnp.asarray(keep).reshape(shape), names)
        return y.reshape(x.shape), new.get(b.state_index)

    (y, stats), vjp = jax.vjp(f, x, bn.scale, bn.bias)
    # Only the kept examples' outputs enter the loss, as in PyTorch on x[keep].
    cot = jnp.where(jnp.asarray(keep)[:, None, None, None], dy, 0.0)
    dx, dscale, dbias = vjp((cot, jax.tree.map(jnp.zeros_like, stats)))
    _check_bn(bn_ref, "masked", y[keep], stats, dx[keep], dscale, dbias)
    assert np.all(np.asarray(dx)[~keep] == 0)


def test_batch_norm_unbiased_one_element_is_refused_as_in_torch():
    # torch.nn.BatchNorm2d: "Expected more than 1 value per channel when training".
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        2, None, unbiased_running_var=True
    )
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(jnp.ones((1, 2, 1, 1)), state)
    # The biased (Flax) update has no such limit.
    plain, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(2, None)
    plain(jnp.ones((1, 2, 1, 1)), state)


def test_batch_norm_unbiased_masked_to_one_element_keeps_the_variance():
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        1, None, momentum=0.9, unbiased_running_var=True
    )
    x = jnp.array([[3.0], [5.0], [7.0]])
    _, new = bn(x, _clone(state), mask=jnp.array([[True], [False], [False]]))
    stats = new.get(bn.state_index)
    np.testing.assert_allclose(stats.mean, [0.3], rtol=1e-6)  # 0.9 * 0 + 0.1 * 3
    np.testing.assert_array_equal(stats.var, [1.0])  # undefined: kept
    _, new = bn(x, state, mask=jnp.array([[True], [True], [False]]))
    # Two elements: unbiased variance 2 (biased 1).
    np.testing.assert_allclose(new.get(bn.state_index).var, [0.9 + 0.1 * 2.0])


def _clone(state):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def test_unbiased_running_var_is_static_config():
    bn = eqx_bn.BatchNorm(3, unbiased_running_var=True)
    assert bn.unbiased_running_var is True
    assert eqx_bn.BatchNorm(3).unbiased_running_var is False
    assert "unbiased_running_var" not in [
        str(p) for p, _ in jax.tree_util.tree_leaves_with_path(bn)
    ]


# -------------------------------------------------------- narrow torchvision ResNets


@pytest.fixture(scope="module")
def net_ref():
    return dict(np.load(DATA / "narrow_reference.npz"))


def _narrow(name, channels_last=False):
    block, width = NETS[name]
    return eqx.filter_eval_shape(
        eqx.nn.make_with_state(TorchResNet),
        block,
        (1, 1, 1, 1),
        5,
        width=width,
        channels_last=channels_last,
        key=jax.random.key(0),
    )


@pytest.fixture(scope="module", params=["basic", "bottleneck"])
def loaded(request):
    name = request.param
    model, state = _narrow(name)
    model, state = load_torch(model, state, read_torch(DATA / f"narrow_{name}.pt"))
    return name, model, state


def _batched(model):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


@eqx.filter_jit
def _eval(model, state, x):
    return _batched(eqx.nn.inference_mode(model))(x, state)[0]


@eqx.filter_jit
def _train_step(model, state, x, labels):
    def loss(m):
        logits, new = _batched(m)(x, state)
        ce = (
            jax.nn.logsumexp(logits, -1)
            - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
        )
        return jnp.mean(ce), (logits, new)

    (_, (logits, new)), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
    return logits, new, grads


def test_narrow_resnet_eval_logits_match_torch(loaded, net_ref):
    name, model, state = loaded
    logits = _eval(model, state, jnp.asarray(net_ref["x"]))
    assert_as_accurate(logits, net_ref, f"{name}/eval_logits")


def test_narrow_resnet_train_step_matches_torch(loaded, net_ref):
    """Logits, every running statistic and every parameter gradient of one
    train-mode step equal PyTorch's (the gradients through export_torch, so by
    PyTorch's names)."""
    name, model, state = loaded
    x, labels = jnp.asarray(net_ref["x"]), jnp.asarray(net_ref["labels"])
    logits, new_state, grads = _train_step(model, state, x, labels)
    assert_as_accurate(logits, net_ref, f"{name}/train_logits")
    exported = export_torch(model, new_state, num_batches_tracked=None)
    grads = export_torch(grads, new_state, num_batches_tracked=None)
    stats = [k for k in exported if k.endswith(("running_mean", "running_var"))]
    params = [k for k in exported if k not in stats]
    for kind, ours, keys in (("state", exported, stats), ("grad", grads, params)):
        recorded = [k for k in net_ref if k.startswith(f"{name}/{kind}/")]
        assert sorted(recorded) == sorted(f"{name}/{kind}/{k}" for k in keys)
        for key in keys:
            assert_as_accurate(ours[key], net_ref, f"{name}/{kind}/{key}")


def test_channels_last_model_gives_the_same_logits(net_ref):
    model, state = _narrow("basic", channels_last=True)
    model, state = load_torch(model, state, read_torch(DATA / "narrow_basic.pt"))
    x = jnp.moveaxis(jnp.asarray(net_ref["x"]), 1, -1)
    logits = _eval(model, state, x)
    assert_as_accurate(logits, net_ref, "basic/eval_logits")


def test_export_gives_back_the_checkpoint_bit_for_bit(loaded):
    name, model, state = loaded
    original = read_torch(DATA / f"narrow_{name}.pt")
    exported = export_torch(model, state, num_batches_tracked=2)
    assert list(exported) == list(original)  # PyTorch's order, too
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert all(a.flags.writeable for a in exported.values())


def test_num_batches_tracked_is_optional_on_load_and_export(loaded):
    name, model, state = loaded
    without = export_torch(model, state, num_batches_tracked=None)
    assert not any(k.endswith("num_batches_tracked") for k in without)
    model2, state2 = load_torch(model, state, without)
    np.testing.assert_array_equal(model2.fc.weight, model.fc.weight)
    with pytest.raises(ValueError, match="num_batches_tracked must be >= 0"):
        export_torch(model, state, num_batches_tracked=-1)


@pytest.mark.parametrize(
    "count", [5, np.int64(5), jnp.int32(5), jnp.asarray(5, jnp.int32), np.array(5)]
)
def test_num_batches_tracked_takes_any_integer_scalar(count):
    """Issue 21.2: `ts.step` (a jax int32 scalar), numpy and jax integers."""
    model, state = _narrow("basic")
    model, state = jax.tree.map(jnp.zeros_like, (model, state))
    out = export_torch(model, state, num_batches_tracked=count)
    assert out["bn1.num_batches_tracked"].dtype == np.int64
    assert out["bn1.num_batches_tracked"].shape == ()
    assert int(out["bn1.num_batches_tracked"]) == 5


@pytest.mark.parametrize(
    "count, error, message",
    [
        (2.0, TypeError, "must be an integer.*got a float"),
        (True, TypeError, "must be an integer.*got a bool"),
        (jnp.float32(2), TypeError, r"must be an integer.*got float32\[\]"),
        (np.arange(2), TypeError, r"must be an integer.*got int64\[2\]"),
        (np.int8(-1), ValueError, "must be >= 0, got -1"),
    ],
)
def test_num_batches_tracked_refuses_what_is_no_count(count, error, message):
    model, state = _narrow("basic")
    with pytest.raises(error, match=message):
        export_torch(model, state, num_batches_tracked=count)


# ------------------------------------------------------------------------ models


@pytest.mark.parametrize(
    "factory, name",
    [
        (TorchResNet18, "resnet18"),
        (TorchResNet34, "resnet34"),
        (TorchResNet50, "resnet50"),
        (TorchResNeXt50_32x4d, "resnext50_32x4d"),
        (TorchWideResNet50_2, "wide_resnet50_2"),
    ],
)
def test_models_pair_with_torchvision_state_dicts(factory, name):
    """Every torchvision key pairs without a mapping, with torchvision's shape
    (issue 21: ResNeXt and wide ResNets gave 176 shape problems)."""
    keys = json.loads((DATA / "torchvision_keys.json").read_text())[name]
    model, state = eqx.filter_eval_shape(
        eqx.nn.make_with_state(factory), key=jax.random.key(0)
    )
    paths = torch_paths(model)
    expected = [k for k in keys if not k.endswith("num_batches_tracked")]
    assert list(paths) == expected
    # load_torch checks every shape and dtype before building anything.
    fake = {
        k: np.broadcast_to(np.zeros((), dtype), shape)
        for k, (shape, dtype) in keys.items()
    }
    fake["fc.weight"] = fake["fc.weight"][:, :3]
    with pytest.raises(ConversionError) as info:
        load_torch(model, state, fake)
    (line,) = info.value.mismatched
    assert line.startswith("fc.weight -> model.fc.weight: expected float32[1000, ")


def test_model_bad_arguments():
    with pytest.raises(ValueError, match="'basic' or 'bottleneck'"):
        TorchResNet("wide", (1, 1, 1, 1), key=jax.random.key(0))
    with pytest.raises(ValueError, match="four positive block counts"):
        TorchResNet("basic", (1, 1, 1), key=jax.random.key(0))
    # As torchvision's BasicBlock: groups and width_per_group are bottleneck-only.
    with pytest.raises(ValueError, match="only groups=1 and base_width=64"):
        TorchResNet("basic", (1, 1, 1, 1), groups=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="channels inside the block"):
        TorchResNet(
            "bottleneck",
            (1, 1, 1, 1),
            width=4,
            width_per_group=8,
            key=jax.random.key(0),
        )


def test_models_use_pytorch_batch_norm():
    model = eqx.filter_eval_shape(
        TorchResNet, "bottleneck", (1, 1, 1, 1), width=1, key=jax.random.key(0)
    )
    norms = [
        m
        for m in jax.tree.leaves(
            model, is_leaf=lambda m: isinstance(m, eqx_bn.BatchNorm)
        )
        if isinstance(m, eqx_bn.BatchNorm)
    ]
    assert len(norms) == 17  # the stem's, and 4 blocks x (3 + downsample)
    assert all(
        (n.momentum, n.eps, n.unbiased_running_var) == (0.9, 1e-5, True) for n in norms
    )


# ----------------------------------------------------------------------- reading


def test_pt_and_safetensors_hold_the_same_arrays():
    pt = read_torch(DATA / "narrow_basic.pt")
    st = read_safetensors(DATA / "narrow_basic.safetensors")
    assert set(pt) == set(st)
    for key in pt:
        assert pt[key].dtype == st[key].dtype
        np.testing.assert_array_equal(pt[key], st[key], err_msg=key)
    assert pt["bn1.num_batches_tracked"].dtype == np.int64
    assert int(pt["bn1.num_batches_tracked"]) == 2
    assert not pt["conv1.weight"].flags.writeable


def test_read_checkpoint_tells_the_formats_apart(tmp_path):
    pt = read_checkpoint(DATA / "narrow_basic.pt")
    st = read_checkpoint(DATA / "narrow_basic.safetensors")
    assert set(pt) == set(st)
    renamed = tmp_path / "weights.bin"  # no telling suffix: the first bytes decide
    renamed.write_bytes((DATA / "narrow_basic.safetensors").read_bytes())
    assert set(read_checkpoint(renamed)) == set(st)


def test_safetensors_bytes_equal_the_safetensors_package():
    """The recorded file was written by `safetensors.torch.save_file`."""
    raw = (DATA / "narrow_basic.safetensors").read_bytes()
    tensors = read_safetensors(raw)
    metadata = {"made_by": "make_torch_reference.py"}
    assert to_safetensors_bytes(tensors, metadata) == raw


def test_read_torch_features():
    """Strides, offsets, shared storages, low-precision dtypes, parameters and plain
    values around the state_dict, as torch.load gives them."""
    ckpt = read_torch(DATA / "features.pt")
    expected = dict(np.load(DATA / "features.npz"))
    sd = ckpt["state_dict"]
    assert list(sd) == list(expected)
    for key, want in expected.items():
        got = sd[key]
        if got.dtype == ml_dtypes.bfloat16:
            got = got.view(np.uint16)
        elif got.dtype == ml_dtypes.float8_e4m3fn:
            got = got.view(np.uint8)
        assert got.dtype == want.dtype, key
        np.testing.assert_array_equal(got, want, err_msg=key)
        assert sd[key].flags.c_contiguous
    np.testing.assert_array_equal(sd["transposed"], sd["base"].T)
    assert ckpt["epoch"] == 3
    assert ckpt["meta"] == {"name": "narrow", "lr": 0.1, "tags": ["a", 1], "none": None}
    assert ckpt["shape"] == (2, 3)


# ----------------------------------------------------------------- hostile files


def _torch_zip(path, pickle_bytes, records=None, prefix="archive"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", pickle_bytes)
        z.writestr(f"{prefix}/byteorder", "little")
        for name, data in (records or {}).items():
            z.writestr(f"{prefix}/data/{name}", data)
    return path


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _Exploit(marker)}, protocol=2)
    path = _torch_zip(tmp_path / "evil.pt", payload)
    with pytest.raises(
        CheckpointError, match=r"refusing to load `(posix|os|nt)\.system`"
    ):
        read_torch(path)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()
    # The same pickle does run code when loaded plainly: the test is meaningful.
    subprocess.run(
        [sys.executable, "-c", f"import pickle; pickle.loads({payload!r})"], check=True
    )
    assert marker.exists()


@pytest.mark.parametrize(
    "pickle_bytes, message",
    [
        # builtins.eval("...") through the GLOBAL and REDUCE opcodes
        (b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R.", "builtins.eval"),
        # a torch name that is not a tensor-rebuild one
        (b"\x80\x02ctorch\nload\n.", "torch.load"),
        # BUILD (__setstate__) on a dict into arbitrary attributes is dropped, but on
        # a rebuilt tensor it is refused
        (
            b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00a]sb.",
            None,
        ),
    ],
)
def test_unpickler_accepts_only_tensor_globals(tmp_path, pickle_bytes, message):
    path = _torch_zip(tmp_path / "x.pt", pickle_bytes)
    if message is None:
        assert read_torch(path) == {}
        return
    with pytest.raises(CheckpointError, match=message):
        read_torch(path)


def test_pickle_cannot_change_what_names_resolve_to(tmp_path):
    """BUILD (setting attributes) on a resolved name is refused, so one file cannot
    change how the next one is read (here: FloatStorage's dtype)."""
    evil = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb."
    with pytest.raises(CheckpointError, match="sets attributes on torch.FloatStorage"):
        read_torch(_torch_zip(tmp_path / "evil.pt", evil))
    evil = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x01\x00\x00\x00aK\x01sb."
    with pytest.raises(CheckpointError, match="sets attributes"):
        read_torch(_torch_zip(tmp_path / "evil2.pt", evil))
    data = np.arange(4, dtype=np.float32).tobytes()
    ok = _torch_zip(tmp_path / "ok.pt", _tensor_pickle(), {"0": data})
    np.testing.assert_array_equal(read_torch(ok)["w"], [[0, 1], [2, 3]])


def _tensor_pickle(
    storage_type=b"FloatStorage", numel=4, size=(2, 2), stride=(2, 1), bare=False
):
    """A hand-made torch.save pickle of {"w": tensor} (or the bare tensor) from
    storage "0", as torch writes it."""
    pid = (b"(X\x07\x00\x00\x00storagectorch\n" + storage_type + b"\nX\x01\x00\x00\x000"
           b"X\x03\x00\x00\x00cpuK" + bytes([numel]) + b"tQ")  # fmt: skip
    tup = lambda t: b"(" + b"".join(b"K" + bytes([v]) for v in t) + b"t"  # noqa: E731
    tensor = (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + pid
        + b"K\x00"
        + tup(size)
        + tup(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )
    if bare:
        return b"\x80\x02" + tensor + b"."
    return b"\x80\x02}X\x01\x00\x00\x00w" + tensor + b"s."


def test_hand_made_tensor_pickle_reads(tmp_path):
    data = np.arange(4, dtype=np.float32).tobytes()
    path = _torch_zip(tmp_path / "ok.pt", _tensor_pickle(), {"0": data})
    np.testing.assert_array_equal(read_torch(path)["w"], [[0, 1], [2, 3]])
    path = _torch_zip(tmp_path / "t.pt", _tensor_pickle(stride=(1, 2)), {"0": data})
    np.testing.assert_array_equal(read_torch(path)["w"], [[0, 2], [1, 3]])


@pytest.mark.parametrize(
    "kwargs, records, message",
    [
        ({}, {}, "storage '0' is missing"),
        (
            {},
            {"0": b"\x00" * 12},
            "declares 4 elements of 4 bytes but its record holds 12",
        ),
        ({"size": (3, 2)}, {"0": b"\x00" * 16}, "reaches element 5 of storage '0'"),
        ({"stride": (0, 0), "size": (9, 9)}, {"0": b"\x00" * 16}, "more elements than"),
        (
            {"storage_type": b"ObjectStorage"},
            {},
            "refusing to load `torch.ObjectStorage`",
        ),
    ],
)
def test_inconsistent_tensors_are_refused(tmp_path, kwargs, records, message):
    path = _torch_zip(tmp_path / "x.pt", _tensor_pickle(**kwargs), records)
    with pytest.raises(CheckpointError, match=message):
        read_torch(path)


def test_corrupt_torch_files(tmp_path):
    good = (DATA / "narrow_basic.pt").read_bytes()
    cases = {
        "empty.pt": (b"", "is empty"),
        "truncated.pt": (good[: len(good) // 2], "truncated or corrupt"),
        "text.pt": (b"hello world", "does not start as a zip archive"),
        "legacy.pt": (b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.", "legacy format"),
    }
    # One flipped byte inside a storage: the zip's CRC check catches it.
    flipped = bytearray(good)
    at = good.index(b"data/0") + 200
    flipped[at] ^= 0xFF
    cases["flipped.pt"] = (bytes(flipped), "truncated or corrupt|cannot be read")
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            read_torch(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_torch(tmp_path / "missing.pt")
    not_torch = tmp_path / "other.zip"
    with zipfile.ZipFile(not_torch, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="not a torch.save file"):
        read_torch(not_torch)
    tensor_only = _torch_zip(
        tmp_path / "tensor.pt",
        _tensor_pickle(bare=True),
        {"0": np.zeros(4, np.float32).tobytes()},
    )
    with pytest.raises(CheckpointError, match="single tensor"):
        read_torch(tensor_only)


def _rebuilds_pickle(numel, entries):
    """A torch.save pickle of `{name: tensor}` for `(name, size, stride)` in
    `entries`, all rebuilt from float32 storage "0" of `numel` elements; the rebuild
    function and the storage are memoized, as torch's pickler does, so that each
    entry costs a few dozen bytes."""
    ints = lambda t: b"(" + b"".join(b"J" + struct.pack("<i", v) for v in t) + b"t"  # noqa: E731
    out = [
        b"\x80\x02}q\x00ctorch._utils\n_rebuild_tensor_v2\nq\x010"
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000"
        b"X\x03\x00\x00\x00cpuJ" + struct.pack("<i", numel) + b"tQq\x020"
    ]
    for name, size, stride in entries:
        out.append(b"X" + struct.pack("<I", len(name)) + name.encode())
        out.append(b"h\x01(h\x02K\x00" + ints(size) + ints(stride) + b"\x89}tRs")
    return b"".join(out) + b"."


def test_views_of_one_storage_share_it_and_copies_are_bounded(tmp_path):
    """A storage rebuilt many times for a few bytes each: contiguous views are not
    copied, non-contiguous copies stop at the file's size."""
    data = np.arange(32 * 32, dtype=np.float32).tobytes()
    entries = [(f"w{i}", (32, 32), (32, 1)) for i in range(100)]
    path = _torch_zip(
        tmp_path / "c.pt", _rebuilds_pickle(32 * 32, entries), {"0": data}
    )
    sd = read_torch(path)
    assert len(sd) == 100
    assert np.shares_memory(sd["w0"], sd["w99"])
    assert not sd["w0"].flags.writeable and sd["w0"].flags.c_contiguous
    np.testing.assert_array_equal(sd["w7"].ravel(), np.arange(32 * 32))
    # One transposed view of a storage is copied, as a real file has.
    entries = [("t", (32, 32), (1, 32))]
    path = _torch_zip(
        tmp_path / "t.pt", _rebuilds_pickle(32 * 32, entries), {"0": data}
    )
    t = read_torch(path)["t"]
    np.testing.assert_array_equal(t, np.arange(32 * 32).reshape(32, 32).T)
    assert t.flags.c_contiguous and not t.flags.writeable
    # 100 of them would copy 400 KB out of a file of a few KB.
    entries = [(f"t{i}", (32, 32), (1, 32)) for i in range(100)]
    path = _torch_zip(
        tmp_path / "n.pt", _rebuilds_pickle(32 * 32, entries), {"0": data}
    )
    assert path.stat().st_size < 20_000
    with pytest.raises(CheckpointError, match="would copy more than"):
        read_torch(path)


@pytest.mark.parametrize("record", ["data/0", "data.pkl"])
def test_compressed_records_are_refused(tmp_path, record):
    """torch.save stores records uncompressed; a compressed one could be a zip bomb
    (zipfile inflates it whole before any size check), so it is not read."""
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in [
            ("data.pkl", _tensor_pickle()),
            ("byteorder", b"little"),
            ("data/0", np.zeros(4, np.float32).tobytes()),
        ]:
            method = zipfile.ZIP_BZIP2 if name == record else zipfile.ZIP_STORED
            z.writestr(f"archive/{name}", data, compress_type=method)
    with pytest.raises(CheckpointError, match=f"'archive/{record}' is compressed"):
        read_torch(path)


def test_shared_containers_cannot_expand_exponentially(tmp_path):
    """x1 = [x0, x0], x2 = [x1, x1], ... through the memo: 2**22 values from a
    pickle of 100 bytes, refused after a bounded number of steps."""
    depth = 21
    body = b"]q\x000" + b"".join(
        b"(h" + bytes([i]) + b"h" + bytes([i]) + b"lq" + bytes([i + 1]) + b"0"
        for i in range(depth)
    )
    evil = b"\x80\x02}(X\x01\x00\x00\x00a" + body + b"h" + bytes([depth]) + b"u."
    with pytest.raises(CheckpointError, match="more than 1000"):
        read_torch(_torch_zip(tmp_path / "x.pt", evil))


def test_huge_memo_index_allocates_nothing(tmp_path):
    """C's unpickler grows its memo to the largest index a pickle names (8 bytes
    per slot) before storing anything; the pure-Python one keeps a dict."""
    import tracemalloc

    evil = b"\x80\x02}r" + struct.pack("<I", 2**24) + b"."
    path = _torch_zip(tmp_path / "x.pt", evil)
    tracemalloc.start()
    try:
        assert read_torch(path) == {}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20


def test_only_a_record_named_data_pkl_is_the_pickle(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/xdata.pkl", b"\x80\x02}.")
    with pytest.raises(CheckpointError, match="not a torch.save file"):
        read_torch(path)


@pytest.mark.parametrize("file", ["features.pt", "narrow_basic.safetensors"])
def test_mangled_files_give_checkpoint_errors(tmp_path, file):
    """Random byte changes, cuts and insertions: a CheckpointError or a result,
    never another exception."""
    raw = (DATA / file).read_bytes()
    read = read_torch if file.endswith(".pt") else read_safetensors
    rng = np.random.default_rng(0)
    path = tmp_path / file
    errors = 0
    for _ in range(1000):
        data = bytearray(raw)
        kind = rng.integers(3)
        if kind == 0:
            for at in rng.integers(len(data), size=rng.integers(1, 4)):
                data[at] = int(rng.integers(256))
        elif kind == 1:
            data = data[: rng.integers(len(data))]
        else:
            at = rng.integers(len(data))
            data[at:at] = (
                rng.integers(0, 256, rng.integers(1, 9)).astype(np.uint8).tobytes()
            )
        path.write_bytes(bytes(data))
        try:
            read(path)
        except CheckpointError:
            errors += 1
    assert errors > 500  # most mangled files are caught


def _safetensors(header, body=b"", length=None):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x01\x00", "less than the 8-byte header"),
        (_safetensors({}, length=10**12), "header length"),
        (struct.pack("<Q", 4) + b"[1] ", "not a JSON object"),
        (struct.pack("<Q", 5) + b"{'a':", "not valid JSON"),
        (
            _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}),
            "do not lie within",
        ),
        (
            _safetensors(
                {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8
            ),
            "needs 12 bytes",
        ),
        (
            _safetensors(
                {"a": {"dtype": "STR", "shape": [1], "data_offsets": [0, 1]}}, b"\0"
            ),
            "unsupported dtype 'STR'",
        ),
        (
            _safetensors(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "overlap or leave a gap",
        ),
        (
            _safetensors(
                {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8
            ),
            "the data holds 8",
        ),
        (
            struct.pack("<Q", 12) + b'{"a":1,"a":2}'[:12],
            "not valid JSON|twice",
        ),
        (_safetensors({"__metadata__": {"a": 1}}), "__metadata__ must map"),
        (_safetensors({"a": [1]}), "exactly the fields"),
    ],
)
def test_corrupt_safetensors(data, message):
    with pytest.raises(CheckpointError, match=message):
        read_safetensors(data)


def test_safetensors_duplicate_names_refused():
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},' \
          b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'  # fmt: skip
    with pytest.raises(CheckpointError, match="twice"):
        read_safetensors(struct.pack("<Q", len(raw)) + raw + b"\0")


@pytest.mark.parametrize(
    "shape, message",
    [
        ([0, 2**62, 2**62], "too large for any array"),
        ([0, 10**30], "too large for any array"),
        ([1] * 100, "100 axes"),
    ],
)
def test_safetensors_forged_shapes_give_checkpoint_errors(shape, message):
    """Zero-size shapes that numpy cannot make (it raises a plain ValueError)."""
    data = _safetensors({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(CheckpointError, match=message):
        read_safetensors(data)


def test_safetensors_deeply_nested_header_gives_checkpoint_error():
    raw = b'{"a":' + b"[" * 100_000
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_safetensors(struct.pack("<Q", len(raw)) + raw)


def test_truncated_safetensors_file(tmp_path):
    raw = (DATA / "narrow_basic.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_checkpoint(path)


def test_write_safetensors_round_trip(tmp_path):
    tensors = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not C-contiguous
        "h": np.ones(3, ml_dtypes.bfloat16),
        "n": np.array(5, np.int64),
        "j": jnp.arange(3, dtype=jnp.int32),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"})
    back = read_safetensors(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == np.asarray(value).dtype
        np.testing.assert_array_equal(back[key], np.asarray(value))
    with pytest.raises(ValueError, match="cannot store"):
        to_safetensors_bytes({"s": np.array(["a"])})
    with pytest.raises(TypeError, match="not an array"):
        to_safetensors_bytes({"s": [1.0]})


# --------------------------------------------------------------------- conversion


def test_load_torch_lists_every_problem(loaded):
    name, model, state = loaded
    sd = dict(read_torch(DATA / f"narrow_{name}.pt"))
    del sd["fc.bias"]
    sd["conv1.weight"] = sd["conv1.weight"][:, :2]
    sd["bn1.running_var"] = sd["bn1.running_var"].astype(np.float16)
    sd["head.weight"] = np.ones(2, np.float32)
    with pytest.raises(ConversionError) as info:
        load_torch(model, state, sd)
    e = info.value
    assert e.missing == ("fc.bias -> model.fc.bias: expected float32[5]",)
    assert e.unexpected == ("head.weight: float32[2]",)
    assert [m.split(" ->")[0] for m in e.mismatched] == [
        "conv1.weight",
        "bn1.running_var",
    ]
    assert "got float16[" in e.mismatched[1] and "cast" not in e.mismatched[1]
    assert e.castable and "pass cast=True to convert them" in str(e)
    assert "4 problems" in str(e)
    # cast=True converts dtypes; strict=False skips the missing and unexpected.
    del sd["conv1.weight"]
    model2, state2 = load_torch(model, state, sd, strict=False, cast=True)
    var = state2.get(model2.bn1.state_index).var
    assert var.dtype == jnp.float32


def test_load_torch_whole_checkpoint_and_prefix(loaded):
    name, model, state = loaded
    sd = read_torch(DATA / f"narrow_{name}.pt")
    with pytest.raises(ConversionError, match=r"checkpoint\['state_dict'\]") as info:
        load_torch(model, state, {"state_dict": sd, "epoch": 3})
    assert info.value.key == "state_dict" and info.value.prefix is None
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    with pytest.raises(ConversionError, match="pass prefix='module.'") as info:
        load_torch(model, state, wrapped)
    assert info.value.prefix == "module." and info.value.key is None
    model2, _ = load_torch(model, state, wrapped, prefix="module.")
    np.testing.assert_array_equal(model2.fc.weight, sd["fc.weight"])


def test_conv_bias_scalar_linear_and_sequential_names():
    """Layouts that differ from PyTorch's: conv bias (out, 1, 1), a scalar Linear's
    (in,) weight and () bias; Sequential layers by index (`net.0`, `net.2`)."""

    class Net(eqx.Module):
        net: eqx.nn.Sequential
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.net = eqx.nn.Sequential(
                [
                    eqx.nn.Conv2d(2, 3, 3, key=k1),
                    eqx.nn.Lambda(jax.nn.relu),
                    eqx.nn.Conv1d(3, 4, 1, key=k2),
                ]
            )
            self.head = eqx.nn.Linear(4, "scalar", key=k3)

    model = Net(jax.random.key(0))
    state = eqx.nn.State(model)
    sd = export_torch(model, state)
    assert {k: v.shape for k, v in sd.items()} == {
        "net.0.weight": (3, 2, 3, 3),
        "net.0.bias": (3,),
        "net.2.weight": (4, 3, 1),
        "net.2.bias": (4,),
        "head.weight": (1, 4),
        "head.bias": (1,),
    }
    again, _ = load_torch(model, state, sd)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(model)):
        np.testing.assert_array_equal(a, b)


def test_num_batches_tracked_only_for_batch_norms():
    """An array field called `running_var` that is no BatchNorm's statistic gets no
    `num_batches_tracked` on export, as `load_torch` expects none for it."""

    class Stats(eqx.Module):
        running_var: jax.Array

    class Net(eqx.Module):
        stats: Stats
        bn: eqx_bn.BatchNorm

    model = Net(Stats(jnp.arange(3.0)), eqx_bn.BatchNorm(3, axis_name=None))
    state = eqx.nn.State(model)
    sd = export_torch(model, state)
    assert list(sd) == [
        "stats.running_var",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ]
    again, _ = load_torch(model, state, sd)
    np.testing.assert_array_equal(again.stats.running_var, model.stats.running_var)


@pytest.mark.subprocess
def test_read_torch_needs_no_torch(tmp_path):
    """Reading and converting with torch made unimportable."""
    code = f"""
import sys
sys.modules["torch"] = None
sys.modules["safetensors"] = None
import jax, equinox as eqx
from eqx_bn.interop import read_checkpoint, load_torch
from eqx_bn.models import TorchResNet
model, state = eqx.filter_eval_shape(eqx.nn.make_with_state(TorchResNet), "basic",
    (1, 1, 1, 1), 5, width=2, key=jax.random.key(0))
for f in ("narrow_basic.pt", "narrow_basic.safetensors"):
    load_torch(model, state, read_checkpoint({str(DATA)!r} + "/" + f))
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("file", ["narrow_basic.pt", "narrow_basic.safetensors"])
def test_cli_converts_a_torch_checkpoint(tmp_path, file):
    factory = tmp_path / "narrow.py"
    factory.write_text(
        "import equinox as eqx, jax\n"
        "from eqx_bn.models import TorchResNet\n"
        "def make():  # abstract: every array comes from the checkpoint\n"
        "    return eqx.filter_eval_shape(eqx.nn.make_with_state(TorchResNet),\n"
        "        'basic', (1, 1, 1, 1), 5, width=2, key=jax.random.key(1))\n"
    )
    from eqx_bn.interop import cli

    out = tmp_path / "model.eqx"
    assert (
        cli.main([str(DATA / file), str(out), "--model", f"{factory}:make", "-q"]) == 0
    )
    sd = read_torch(DATA / "narrow_basic.pt")
    # A template of zeros, so that every value checked below comes from the file.
    template = load_torch(
        *_narrow("basic"), {k: np.zeros_like(v) for k, v in sd.items()}
    )
    model, state = eqx.tree_deserialise_leaves(out, template)
    # PyTorch's (out, in, kh, kw) weight is the model's (kh, kw, in, out) kernel.
    np.testing.assert_array_equal(
        model.layer4[0].conv2.weight,
        np.transpose(sd["layer4.0.conv2.weight"], (2, 3, 1, 0)),
    )
    np.testing.assert_array_equal(
        state.get(model.bn1.state_index).var, sd["bn1.running_var"]
    )


def _load_example():
    path = pathlib.Path(__file__).resolve().parent.parent / "examples"
    spec = importlib.util.spec_from_file_location(
        "torch_to_equinox", path / "torch_to_equinox.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_torch_to_equinox_example_without_torch(tmp_path, monkeypatch):
    """The example's --smoke run on the recorded checkpoint, without torch: what it
    saves loads back into the same model, for Equinox and through safetensors."""
    example = _load_example()
    # As if torch were not installed. (Not through sys.modules: scikit-learn's
    # scipy looks torch up there.)
    monkeypatch.setattr(example, "torch", None)
    out = example.main(["--smoke", "--out", str(tmp_path)])
    assert out["source"] == str(DATA / "narrow_basic.pt")
    assert out["steps"] == 5 and out["torch_diff"] is None
    exported = read_safetensors(out["safetensors_path"])
    assert int(exported["bn1.num_batches_tracked"]) == 5
    abstract = eqx.filter_eval_shape(
        eqx.nn.make_with_state(TorchResNet),
        "basic",
        (1, 1, 1, 1),
        10,
        width=2,
        key=jax.random.key(1),
    )
    again = load_torch(*abstract, exported)
    zeros = jax.tree.map(jnp.zeros_like, again)
    saved, saved_state = eqx.tree_deserialise_leaves(out["eqx_path"], zeros)
    for a, b in zip(jax.tree.leaves((saved, saved_state)), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    # The backbone came from the checkpoint and was fine-tuned from there.
    original = read_torch(DATA / "narrow_basic.pt")
    start = np.transpose(original["conv1.weight"], (2, 3, 1, 0))  # (kh, kw, in, out)
    assert not np.array_equal(saved.conv1.weight, start)
    np.testing.assert_allclose(saved.conv1.weight, start, atol=0.05)


# ------------------------------------------------- files given to the wrong reader


def _flax_msgpack(path):
    path.write_bytes(to_msgpack_bytes({"params": {"w": np.ones(2, np.float32)}}))
    return path


@pytest.mark.parametrize(
    "make, reader, message",
    [
        (
            lambda p: _flax_msgpack(p / "x.msgpack"),
            read_torch,
            "looks like a Flax msgpack checkpoint; read it with "
            "eqx_bn.interop.read_msgpack",
        ),
        (
            lambda p: _copy(DATA / "narrow_basic.safetensors", p / "x.safetensors"),
            read_torch,
            "looks like a safetensors file; read it with "
            "eqx_bn.interop.read_safetensors",
        ),
        (
            lambda p: _copy(DATA / "narrow_basic.pt", p / "x.safetensors"),
            read_safetensors,
            r"looks like a torch.save file \(a zip archive\); read it with "
            "eqx_bn.interop.read_torch",
        ),
        (
            lambda p: _copy(DATA / "narrow_basic.pt", p / "x.msgpack"),
            read_msgpack,
            "looks like a torch.save file",
        ),
        (
            lambda p: _copy(DATA / "narrow_basic.safetensors", p / "x.msgpack"),
            read_msgpack,
            "looks like a safetensors file",
        ),
        (
            lambda p: _write(p / "x.pkl", pickle.dumps({"w": [1.0, 2.0]}, protocol=4)),
            read_msgpack,
            r"looks like a plain Python pickle \(`pickle.dump`\), not a torch.save "
            "file; no reader here loads one",
        ),
        (
            lambda p: _write(p / "x.pkl", pickle.dumps({"w": [1.0, 2.0]}, protocol=4)),
            read_checkpoint,
            "not a torch.save file: it looks like a plain Python pickle",
        ),
        (
            lambda p: _flax_msgpack(p / "x.safetensors"),
            read_safetensors,
            "looks like a Flax msgpack checkpoint",
        ),
    ],
)
def test_a_file_given_to_the_wrong_reader_is_named(tmp_path, make, reader, message):
    """Issue 21.4: the error says what the file looks like and which reader reads
    it (not "two files concatenated?" or "header length does not fit")."""
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        reader(path)


def _copy(source, target):
    target.write_bytes(source.read_bytes())
    return target


def _write(path, data):
    path.write_bytes(data)
    return path


def test_read_checkpoint_goes_by_the_bytes_before_the_suffix(tmp_path):
    """A torch.save file named `.safetensors` is read as what it is."""
    path = _copy(DATA / "narrow_basic.pt", tmp_path / "x.safetensors")
    assert set(read_checkpoint(path)) == set(read_torch(DATA / "narrow_basic.pt"))


@pytest.mark.live
def test_a_training_checkpoint_holding_argparse_args_is_read_by_keys(tmp_path):
    """Issue 21.5: torchvision's reference scripts save `args`, an
    `argparse.Namespace`, beside the model. It is refused (reading it would import
    and call argparse), the error names it and how to read the rest, and the rest
    reads with `keys=`."""
    import argparse

    torch = pytest.importorskip("torch")
    sd = read_torch(DATA / "narrow_basic.pt")
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(lr=0.1, model="resnet18", epochs=90)
    torch.save(
        {
            "model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
            "args": args,
            "epoch": 3,
        },
        path,
    )
    for read in (read_torch, read_checkpoint):
        with pytest.raises(
            CheckpointError,
            match=r"refusing to load `argparse.Namespace` at 'args'.*"
            r"pass keys=\['model'\] to read_torch or read_checkpoint "
            r"\(`--key model` on the command line\)",
        ):
            read(path)
        got = read(path, keys=["model", "epoch"])
        assert list(got) == ["model", "epoch"] and got["epoch"] == 3
        model, state = load_torch(*_narrow("basic"), got["model"])
        np.testing.assert_array_equal(model.fc.weight, sd["fc.weight"])
    with pytest.raises(
        CheckpointError, match="refusing.*`argparse.Namespace` at 'args'"
    ):
        read_torch(path, keys=["args"])
    with pytest.raises(CheckpointError, match="no entry 'optimizer'.*'args', 'epoch'"):
        read_torch(path, keys=["optimizer"])

"""`eqx_bn.interop` msgpack I/O against `flax.serialization` as installed."""

import os
import stat
from typing import NamedTuple

import flax.serialization as fser
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest

from eqx_bn.interop import (
    CheckpointError,
    read_checkpoint,
    read_msgpack,
    to_msgpack_bytes,
    write_msgpack,
)
from eqx_bn.interop.formats import msgpack as ours


def assert_identical(got, want, path="root"):
    """Same structure, same Python/numpy types, same dtype, shape and bytes."""
    assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, dict):
        assert list(got) == list(want), path
        for k in want:
            assert_identical(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_identical(g, w, f"{path}/{i}")
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), path
    elif isinstance(want, float):
        assert np.float64(got).tobytes() == np.float64(want).tobytes(), path
    else:
        assert got == want, path


def sample_tree():
    """Every kind of leaf Flax's format has; NaN, -0.0 and inf for bitwise checks."""
    special = np.array([np.nan, -0.0, np.inf, 1e-40, 3.5], np.float32)
    return {
        "params": {
            "Dense_0": {
                "kernel": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
                "bias": special,
            },
            "BatchNorm_0": {
                "scale": jnp.linspace(0.5, 2.0, 4, dtype=jnp.bfloat16),
                "bias": np.array([1.5, -2.25], np.float16),
            },
        },
        "batch_stats": {"BatchNorm_0": {"mean": np.zeros(3, np.float64)}},
        "ints": {
            "i8": np.array([-128, 127], np.int8),
            "u8": np.array([[0, 255]], np.uint8),
            "i64": np.array([2**62, -(2**63)], np.int64),
            "u32": np.array(7, np.uint32),  # 0-d array, not a scalar
        },
        "bool": np.array([True, False]),
        "complex": np.array([1 + 2j, -0.5j], np.complex64),
        "empty": np.zeros((0, 3), np.float32),
        "f8e4": np.array([0.5, -3.0], ml_dtypes.float8_e4m3fn),
        "scalars": {
            "np_f32": np.float32(0.1),
            "np_i64": np.int64(-5),
            "np_bool": np.bool_(True),
            "np_c128": np.complex128(3 - 4j),
            "np_bf16": ml_dtypes.bfloat16(1.5),
        },
        "step": 1234,
        "lr": 0.125,
        "flag": False,
        "z": complex(1.5, -2.0),
        "name": "resnet",
        "nothing": None,
    }


def test_reads_what_flax_writes_bitwise():
    data = fser.to_bytes(sample_tree())
    got = read_msgpack(data)
    assert_identical(got, fser.msgpack_restore(data))
    # The reference itself is faithful, so this pins dtypes and bits to the input.
    assert got["params"]["BatchNorm_0"]["scale"].dtype == jnp.bfloat16
    assert got["ints"]["u32"].shape == () and isinstance(got["ints"]["u32"], np.ndarray)
    assert isinstance(got["scalars"]["np_bf16"], ml_dtypes.bfloat16)
    assert np.isnan(got["params"]["Dense_0"]["bias"][0])
    assert got["step"] == 1234 and type(got["step"]) is int


def test_reads_flax_lists_tuples_and_namedtuples():
    class Pair(NamedTuple):
        mu: np.ndarray
        nu: np.ndarray

    tree = {
        "opt_state": (Pair(np.ones(2, np.float32), np.zeros(2, np.float32)), None),
        "layers": [np.int32(1), np.int32(2)],
    }
    data = fser.to_bytes(tree)
    got = read_msgpack(data)
    assert_identical(got, fser.msgpack_restore(data))
    assert set(got["opt_state"]) == {"0", "1"}
    assert set(got["opt_state"]["0"]) == {"mu", "nu"}
    # msgpack_serialize (no to_state_dict) keeps a raw list as a msgpack array.
    raw = fser.msgpack_serialize({"xs": [np.ones(1, np.float32), 2]})
    assert_identical(read_msgpack(raw), fser.msgpack_restore(raw))


def test_reads_flax_chunked_arrays(monkeypatch):
    monkeypatch.setattr(fser, "MAX_CHUNK_SIZE", 64)
    big = np.arange(3 * 7 * 5, dtype=np.float32).reshape(3, 7, 5)  # 420 bytes
    odd = np.arange(33, dtype=np.int64)  # 264 bytes: chunks of 8, last one short
    data = fser.msgpack_serialize({"params": {"big": big, "odd": odd}})
    stored = msgpack.unpackb(data)["params"]["big"]
    assert stored["__msgpack_chunked_array__"] is True and len(stored["chunks"]) > 1
    got = read_msgpack(data)
    assert_identical(got, {"params": {"big": big, "odd": odd}})


def test_flax_reads_what_we_write():
    tree = sample_tree()
    data = to_msgpack_bytes(tree)
    restored = fser.msgpack_restore(data)
    assert_identical(read_msgpack(data), restored)
    want = fser.msgpack_restore(fser.to_bytes(tree))
    assert_identical(restored, want)
    # Same bytes as Flax, for the same dict.
    assert data == fser.to_bytes(tree)


def test_flax_from_bytes_restores_our_sequences_into_its_target():
    tree = {"params": {"w": np.ones(2, np.float32)}, "seq": (np.float32(1), [2, 3])}
    data = to_msgpack_bytes(tree)
    target = {"params": {"w": np.zeros(2, np.float32)}, "seq": (None, [0, 0])}
    restored = fser.from_bytes(target, data)
    assert isinstance(restored["seq"], tuple) and restored["seq"][1] == [2, 3]
    np.testing.assert_array_equal(restored["params"]["w"], np.ones(2, np.float32))


def test_flax_reads_our_chunked_arrays(monkeypatch):
    monkeypatch.setattr(ours, "_MAX_CHUNK_BYTES", 40)
    # 120 bytes: 3 chunks of 20 elements.
    big = np.arange(60, dtype=np.float16).reshape(6, 10)
    data = to_msgpack_bytes({"params": {"emb": big}, "small": np.ones(2, np.int8)})
    stored = msgpack.unpackb(data)["params"]["emb"]
    assert stored["__msgpack_chunked_array__"] is True and len(stored["chunks"]) == 3
    assert_identical(fser.msgpack_restore(data)["params"]["emb"], big)
    assert_identical(read_msgpack(data)["params"]["emb"], big)


def test_writes_native_byte_order_and_jax_arrays():
    be = np.array([1.0, -2.5], dtype=">f4")
    got = read_msgpack(
        to_msgpack_bytes({"be": be, "jx": jnp.arange(3, dtype=jnp.int32)})
    )
    assert got["be"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(got["be"], [1.0, -2.5])
    assert_identical(got["jx"], np.arange(3, dtype=np.int32))


def test_file_round_trip_and_progress(tmp_path):
    path = tmp_path / "ckpt.msgpack"
    write_msgpack(path, sample_tree())
    calls = []
    got = read_msgpack(
        str(path), progress=lambda done, total: calls.append((done, total))
    )
    assert_identical(got, fser.msgpack_restore(fser.to_bytes(sample_tree())))
    size = path.stat().st_size
    assert calls and calls[-1] == (size, size)
    assert_identical(read_checkpoint(path), got)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_write_is_atomic(tmp_path):
    path = tmp_path / "ckpt.msgpack"
    write_msgpack(path, {"params": {"w": np.ones(3, np.float32)}})
    before = path.read_bytes()
    # A bad leaf fails before the file is touched.
    with pytest.raises(TypeError, match="at 'params/f'"):
        write_msgpack(path, {"params": {"w": np.zeros(3), "f": print}})
    # A crash in the middle of writing leaves the old file and no temporary file.
    with pytest.raises(KeyboardInterrupt):
        with ours.atomic_write(path) as f:
            f.write(b"\x81\xa6params")
            raise KeyboardInterrupt
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.msgpack"]
    write_msgpack(path, {"params": {"w": np.zeros(3, np.float32)}})
    assert_identical(read_msgpack(path)["params"]["w"], np.zeros(3, np.float32))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.msgpack"]


@pytest.mark.parametrize(
    "tree, error, match",
    [
        ({"a": np.array([object()])}, ValueError, "at 'a'.*dtype object"),
        ({"a": np.array(["x"])}, ValueError, "at 'a'.*dtype <U1"),
        ({"a": {"b": 2**64}}, ValueError, "at 'a/b'.*64 bits"),
        ({1: 1, "1": 2}, ValueError, "not distinct as strings"),
        ({"a": [1, {"m": object()}]}, TypeError, "at 'a/1/m'.*object"),
        (np.ones(3), TypeError, "top level must be a dict"),
    ],
)
def test_write_refuses_what_flax_cannot_read(tree, error, match):
    with pytest.raises(error, match=match):
        to_msgpack_bytes(tree)


def _ext(shape, dtype, payload, code=1):
    return msgpack.ExtType(code, msgpack.packb([shape, dtype, payload]))


def _file(tree):
    return msgpack.packb(tree, use_bin_type=True)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "is empty"),
        (_file([1, 2]), "only a list at the top level"),
        (_file(3), "only an int at the top level"),
        (fser.msgpack_serialize(np.ones(2, np.float32)), "only an array at the top"),
        (_file({"__msgpack_chunked_array__": True}), "only an array at the top"),
        (
            _file({"p": {"w": _ext([2], "object", b"\0" * 16)}}),
            "at 'p/w'.*dtype b'object'",
        ),
        (_file({"w": _ext([1], "[('a', '<f4')]", b"\0" * 4)}), "at 'w'.*unsupported"),
        (_file({"w": _ext([1], "V4", b"\0" * 4)}), "at 'w'.*unsupported array dtype"),
        (
            _file({"p": {"w": _ext([10**9, 10**9], "float32", b"\0" * 4)}}),
            r"at 'p/w'.*declares shape \(1000000000, 1000000000\) of float32 "
            r"\(4000000000000000000 bytes\) but holds 4 bytes",
        ),
        (_file({"w": _ext([-1], "float32", b"")}), "at 'w'.*non-negative ints"),
        (
            _file({"w": _ext([2], "float32", b"\0" * 8, code=3)}),
            "at 'w'.*shape \\(2,\\)",
        ),
        (_file({"w": msgpack.ExtType(1, b"\xc1")}), "at 'w'.*not valid msgpack"),
        (_file({"w": msgpack.ExtType(1, msgpack.packb([1, 2]))}), "at 'w'.*triple"),
        (_file({"w": msgpack.ExtType(2, msgpack.packb("x"))}), "at 'w'.*real, imag"),
        (_file({"a": [0, msgpack.ExtType(42, b"")]}), "at 'a/1'.*extension type 42"),
        (_file({"t": msgpack.Timestamp(1)}), "at 't'.*Timestamp"),
        (msgpack.packb({"a": {1.5: 2}}), "at 'a'.*key 1.5 is a float"),
        (msgpack.packb({"a": {b"k": 2}}), "at 'a'.*key b'k' is a bytes"),
        (
            _file({"c": {"__msgpack_chunked_array__": True, "shape": {"0": 3}}}),
            "at 'c'.*malformed chunked array",
        ),
        (
            _file(
                {
                    "c": {
                        "__msgpack_chunked_array__": True,
                        "shape": {"0": 5},
                        "chunks": {"0": _ext([2], "float32", b"\0" * 8)},
                    }
                }
            ),
            r"at 'c'.*declares shape \(5,\) but its chunks hold 2",
        ),
        (
            _file(
                {
                    "c": {
                        "__msgpack_chunked_array__": True,
                        "shape": {"0": 2},
                        "chunks": {"1": _ext([2], "float32", b"\0" * 8)},
                    }
                }
            ),
            "at 'c/chunks'.*keys '0', '1'",
        ),
        (b"\xc1\x00", "not valid msgpack: FormatError"),
        (b"import os\n", "not a Flax msgpack checkpoint: it starts with an int"),
        # Issue 21.3: a bad array first, not "a _Invalid".
        (
            msgpack.packb(msgpack.ExtType(1, b"\xc1")) + b"\x00",
            "it starts with an array, not a map",
        ),
        (_file({"a": 1}) + b"\x00", "1 unexpected bytes after its data"),
    ],
)
def test_bad_files_raise_checkpoint_error(data, match):
    with pytest.raises(CheckpointError, match=match):
        read_msgpack(data)


def test_deep_nesting_is_refused():
    tree = 0
    for _ in range(150):
        tree = {"a": tree}
    with pytest.raises(CheckpointError, match="nested deeper than"):
        read_msgpack(_file(tree))


def test_truncated_file_raises_at_every_offset():
    data = fser.to_bytes(sample_tree())
    for cut in range(1, len(data), 7):
        with pytest.raises(CheckpointError, match="is truncated"):  # or corrupt
            read_msgpack(data[:cut])


def test_bit_flips_give_checkpoint_error_or_a_whole_tree():
    data = fser.to_bytes({"params": {"w": np.arange(4, dtype=np.float32)}, "step": 3})
    errors = 0
    for i in range(len(data)):
        for bit in (0, 5, 7):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            try:
                got = read_msgpack(bytes(flipped))
            except CheckpointError:
                errors += 1
            else:
                assert isinstance(got, dict)
    # The format has no checksum: flips in array bytes go unseen, the others not.
    assert errors > len(data)


def test_random_bytes_raise_checkpoint_error():
    rng = np.random.default_rng(0)
    for n in (1, 2, 16, 300):
        data = rng.bytes(n)
        if data[0] & 0xF0 == 0x80 and n == 1:  # a lone fixmap header is `{}`
            continue
        with pytest.raises(CheckpointError):
            read_msgpack(data)


def test_unreadable_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.msgpack")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_msgpack(tmp_path)
    (tmp_path / "empty.msgpack").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.msgpack' is empty"):
        read_checkpoint(tmp_path / "empty.msgpack")


def test_integer_keys_are_read_as_flax_reads_them():
    """Issue 21.1: `msgpack_serialize` keeps integer keys (NNX list items, from
    `nnx.to_pure_dict`); Flax's `msgpack_restore` gives them back as ints, and so
    does `read_msgpack`."""
    tree = {"blocks": {0: {"w": np.ones(2, np.float32)}, 1: {"w": np.zeros(2)}}}
    raw = fser.msgpack_serialize(tree)
    got, flax = read_msgpack(raw), fser.msgpack_restore(raw)
    assert list(got["blocks"]) == list(flax["blocks"]) == [0, 1]
    np.testing.assert_array_equal(got["blocks"][1]["w"], flax["blocks"][1]["w"])
    clash = msgpack.packb({"b": {0: 1, "0": 2}}, strict_types=False)
    with pytest.raises(CheckpointError, match="at 'b'.*keys 0 and '0' both read"):
        read_msgpack(clash)

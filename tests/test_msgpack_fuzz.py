"""Fuzzing `read_msgpack`: whatever the bytes, it returns a whole tree (the one
`flax.serialization.msgpack_restore` gives) or raises `CheckpointError`, never else."""

import flax.serialization as fser
import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from eqx_bn.interop import CheckpointError, read_msgpack

FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

VALID = fser.to_bytes(
    {
        "params": {
            "Dense_0": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "BatchNorm_0": {"scale": np.ones(3, np.float16)},
        },
        "batch_stats": {"BatchNorm_0": {"mean": np.zeros(3, np.float64)}},
        "step": np.int64(12),
        "z": 1 + 2j,
        "opt": {"0": None, "1": [1.5, "x"]},
    }
)


def _equal(a, b):
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, (np.ndarray, np.generic)):
        return (
            type(a) is type(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    if isinstance(a, float):
        return type(b) is float and np.float64(a).tobytes() == np.float64(b).tobytes()
    if isinstance(a, complex):
        return type(b) is complex and _equal(a.real, b.real) and _equal(a.imag, b.imag)
    return type(a) is type(b) and a == b


def check(data: bytes) -> None:
    try:
        tree = read_msgpack(data)
    except CheckpointError:
        return
    # Accepted: then it is what Flax itself reads from these bytes.
    assert isinstance(tree, dict)
    assert _equal(tree, fser.msgpack_restore(data))


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data):
    check(data)


@st.composite
def mutations(draw):
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


@FUZZ
@given(mutations())
def test_mutated_checkpoint(data):
    check(data)


def _array_payloads():
    # msgpack itself can only pack integers in [-2**63, 2**64): stay inside, or the
    # strategy fails before our reader ever runs.
    any_int = st.integers(-(2**63), 2**64 - 1)
    shapes = st.lists(st.integers(-1, 4), max_size=3) | any_int | st.none()
    names = st.sampled_from(
        ["float32", "bfloat16", "int8", "bool", "object", "<U2", "V4", "f4,i4", "x"]
    )
    return st.builds(
        lambda *t: msgpack.packb(list(t)), shapes, names, st.binary(max_size=40)
    ) | st.binary(max_size=20)


leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.builds(msgpack.ExtType, st.sampled_from([1, 2, 3, 7, 127]), _array_payloads())
)
trees = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["a", "0", "1", "__msgpack_chunked_array__", "shape", "chunks"]
            )
            | st.integers(0, 2),
            inner,
            max_size=4,
        )
    ),
    max_leaves=8,
)


@settings(FUZZ, max_examples=60)  # generating these trees is the slow part
@given(st.dictionaries(st.text(max_size=3), trees, max_size=3))
def test_structured_garbage(tree):
    check(msgpack.packb(tree, use_bin_type=True))

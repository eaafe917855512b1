"""Flax's msgpack checkpoint format, read and written with the `msgpack` package alone.

The format (that of `flax.serialization.to_bytes` / `msgpack_serialize`):

- the file is one msgpack map; every key is a string; lists and tuples were stored
  by Flax's `to_state_dict` as maps `{"0": ..., "1": ...}` and named tuples as maps
  of their fields (`msgpack_serialize` of a tree with integer keys, such as
  `nnx.to_pure_dict`'s list items, keeps them as msgpack ints: read as ints);
- an array is the msgpack extension type 1 holding the msgpack-encoded triple
  `[shape, dtype name, C-order bytes]`; a numpy scalar is type 3 with the same
  triple for a 0-d array; a Python `complex` is type 2 holding `[real, imag]`;
- an array larger than 2**30 bytes is replaced by a map
  `{"__msgpack_chunked_array__": True, "shape": {"0": ...}, "chunks": {"0": ...}}`
  of 1-d pieces, because one msgpack value cannot exceed 2**32 - 1 bytes.

Nothing in a file is ever executed (there is no pickle); object and structured dtypes
are refused, and every array's declared shape must match its payload's size, so a
file cannot make the reader allocate more than the file itself holds.
"""

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_dtypes
import msgpack
import numpy as np
from jaxtyping import PyTree

from ..._describe import describe
from ..._typing import typecheck
from .atomic import atomic_write
from .errors import CheckpointError
from .shapes import shape_problem as _shape_problem
from .sniff import HEAD_BYTES, other_format
from .tree import MAX_DEPTH, map_tree, where

_EXT_NDARRAY = 1
_EXT_NATIVE_COMPLEX = 2
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"
# Flax's `MAX_CHUNK_SIZE`: msgpack's limit is 2**32 - 1 bytes per value, and Flax
# leaves a wide margin. Files chunked at any size are read.
_MAX_CHUNK_BYTES = 2**30
_READ_BLOCK = 16 * 2**20

ProgressCallback = Callable[[int, int], None]
"""Called as `progress(bytes_read, total_bytes)` while a file is read."""


def _dtype_table() -> dict[str, np.dtype]:
    numeric = [
        np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
        np.uint32, np.uint64, np.float16, np.float32, np.float64, np.longdouble,
        np.complex64, np.complex128, np.clongdouble,
    ]  # fmt: skip
    # The low-precision floats and ints JAX uses, as `ml_dtypes` names them (and
    # as `dtype.name` writes them). Those missing from an older ml_dtypes are skipped.
    low_precision = [
        "bfloat16", "float8_e3m4", "float8_e4m3", "float8_e4m3b11fnuz",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
        "float8_e8m0fnu", "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn",
        "int2", "int4", "uint2", "uint4",
    ]  # fmt: skip
    dtypes = [np.dtype(t) for t in numeric]
    dtypes += [
        np.dtype(getattr(ml_dtypes, n)) for n in low_precision if hasattr(ml_dtypes, n)
    ]
    return {d.name: d for d in dtypes}


# Looked up by name rather than with `np.dtype(name)`, which would parse any string
# from the file (structured and object dtypes included).
_DTYPES = _dtype_table()
_SUPPORTED = frozenset(_DTYPES.values())


class _Invalid:
    """What the extension hook returns for a bad payload: it cannot raise with the
    tree path, which only the walk over the decoded tree knows."""

    def __init__(self, reason: str):
        self.reason = reason


def _decode_array(data: bytes) -> np.ndarray | _Invalid:
    try:
        header = msgpack.unpackb(data, raw=True, use_list=True)
    except (ValueError, TypeError) as e:
        return _Invalid(f"array payload is not valid msgpack ({e})")
    if not (isinstance(header, list) and len(header) == 3):
        return _Invalid("array payload is not a [shape, dtype, bytes] triple")
    shape, name, buffer = header
    problem = _shape_problem(shape, 1)
    if problem is not None:
        return _Invalid(f"array {problem}")
    if not isinstance(name, bytes) or not isinstance(buffer, bytes):
        return _Invalid("array dtype name or data has the wrong msgpack type")
    dtype = _DTYPES.get(name.decode("ascii", errors="replace"))
    if dtype is None:
        return _Invalid(
            f"unsupported array dtype {name!r}: only numeric dtypes (bool, ints, "
            "floats, complex, bfloat16 and the other ml_dtypes) are read"
        )
    problem = _shape_problem(shape, dtype.itemsize)
    if problem is not None:
        return _Invalid(f"array {problem}")
    size = math.prod(shape)
    if size * dtype.itemsize != len(buffer):
        return _Invalid(
            f"array declares shape {tuple(shape)} of {dtype.name} "
            f"({size * dtype.itemsize} bytes) but holds {len(buffer)} bytes"
        )
    # Flax writes the machine's byte order, which is little-endian on every
    # platform JAX runs on; the native dtypes above read it.
    return np.frombuffer(buffer, dtype=dtype, count=size).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        return _decode_array(data)
    if code == _EXT_NPSCALAR:
        array = _decode_array(data)
        if isinstance(array, np.ndarray) and array.shape != ():
            return _Invalid(f"numpy scalar has shape {array.shape}, expected ()")
        return array if isinstance(array, _Invalid) else array[()]
    if code == _EXT_NATIVE_COMPLEX:
        try:
            parts = msgpack.unpackb(data, use_list=True)
        except (ValueError, TypeError) as e:
            return _Invalid(f"complex payload is not valid msgpack ({e})")
        if not (
            isinstance(parts, list)
            and len(parts) == 2
            and all(type(p) in (int, float) for p in parts)
        ):
            return _Invalid("complex payload is not a [real, imag] pair")
        return complex(parts[0], parts[1])
    return _Invalid(f"unknown msgpack extension type {code}")


_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes)


def _check_key(path: tuple[str, ...], key: Any) -> None:
    # Flax's `to_bytes` writes string keys; `msgpack_serialize` of
    # `nnx.to_pure_dict(...)` keeps NNX's integer list indices, and Flax's
    # `msgpack_restore` reads them back as ints: so does this.
    if type(key) not in (str, int):
        raise CheckpointError(
            f"{where(path)}: key {key!r} is {describe(key)}; a Flax checkpoint's "
            "keys are strings (or ints, for list items)"
        )


def _is_chunked(node: Any) -> bool:
    return isinstance(node, dict) and _CHUNKED in node


def _leaf(path: tuple[str, ...], node: Any) -> Any:
    if _is_chunked(node):
        return _unchunk(node, path)
    if isinstance(node, _Invalid):
        raise CheckpointError(f"{where(path)}: {node.reason}")
    if isinstance(node, (np.ndarray, np.generic, *_PLAIN_LEAVES)):
        return node
    raise CheckpointError(
        f"{where(path)}: unsupported msgpack value of type {type(node).__name__}"
    )


def _too_deep(path: tuple[str, ...]) -> CheckpointError:
    return CheckpointError(f"{where(path[:3])}...: nested deeper than {MAX_DEPTH}")


def _restore(node: Any, path: tuple[str, ...] = ()) -> Any:
    """The decoded tree, checked leaf by leaf, chunked arrays joined."""
    try:
        return map_tree(
            node,
            lambda p, leaf: _leaf((*path, *p), leaf),
            is_leaf=_is_chunked,
            key=lambda p, k: _check_key((*path, *p), k),
            lists=True,
            max_depth=MAX_DEPTH - len(path),
            too_deep=lambda p: _too_deep((*path, *p)),
        )
    except ValueError as e:  # keys 0 and "0" in one map
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(str(e)) from None


def _sequence(node: Any, path: tuple[str, ...]) -> list[Any]:
    """A Flax tuple-as-dict `{"0": a, "1": b}` back to `[a, b]`."""
    if not isinstance(node, dict) or set(node) != {str(i) for i in range(len(node))}:
        raise CheckpointError(
            f"{where(path)}: expected a map with keys '0', '1', ... in a chunked array"
        )
    return [node[str(i)] for i in range(len(node))]


def _unchunk(node: dict, path: tuple[str, ...]) -> np.ndarray:
    if set(node) != {_CHUNKED, "shape", "chunks"} or node[_CHUNKED] is not True:
        raise CheckpointError(
            f"{where(path)}: malformed chunked array: expected exactly the keys "
            f"'{_CHUNKED}' (true), 'shape' and 'chunks', got {sorted(map(str, node))}"
        )
    shape = _sequence(node["shape"], (*path, "shape"))
    problem = _shape_problem(shape, 1)
    if problem is not None:
        raise CheckpointError(f"{where(path)}: chunked array {problem}")
    chunks = []
    for i, chunk in enumerate(_sequence(node["chunks"], (*path, "chunks"))):
        chunk = _restore(chunk, (*path, "chunks", str(i)))
        if not isinstance(chunk, np.ndarray) or chunk.ndim != 1:
            raise CheckpointError(
                f"{where((*path, 'chunks', str(i)))}: a chunk must be a 1-d array"
            )
        chunks.append(chunk)
    if not chunks or len({c.dtype for c in chunks}) != 1:
        raise CheckpointError(
            f"{where(path)}: a chunked array needs one or more chunks of one dtype"
        )
    problem = _shape_problem(shape, chunks[0].dtype.itemsize)
    if problem is not None:
        raise CheckpointError(f"{where(path)}: chunked array {problem}")
    if sum(c.size for c in chunks) != math.prod(shape):
        raise CheckpointError(
            f"{where(path)}: chunked array declares shape {tuple(shape)} but its "
            f"chunks hold {sum(c.size for c in chunks)} elements"
        )
    return np.concatenate(chunks).reshape(shape)


def _read_file(path: str, progress: ProgressCallback | None) -> memoryview:
    try:
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            data = bytearray(total)
            view = memoryview(data)
            done = 0
            while done < total:
                n = f.readinto(view[done : done + _READ_BLOCK])
                if not n:  # the file shrank while being read
                    break
                done += n
                if progress is not None:
                    progress(done, total)
    except OSError as e:
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: {e.strerror or e}"
        ) from e
    return view[:done]


def _what(value: Any) -> str:
    """A decoded msgpack value, for messages: `an int`, `an array`."""
    if isinstance(value, (_Invalid, np.ndarray, np.generic)) or _is_chunked(value):
        return "an array"
    return describe(value)


def _decode(data: bytes | bytearray | memoryview, origin: str) -> dict[str, Any]:
    if len(data) == 0:
        raise CheckpointError(f"{origin} is empty")
    try:
        raw = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=False, ext_hook=_ext_hook
        )
    except (ValueError, TypeError) as e:  # msgpack.ExtraData is a ValueError
        # A file in another format fails here: say which, and the reader to use.
        other = other_format(bytes(data[:HEAD_BYTES]), len(data), "msgpack")
        if other is not None:
            raise CheckpointError(
                f"{origin} is not a Flax msgpack checkpoint: {other}"
            ) from None
        raise _decode_error(e, len(data), origin) from None
    if not isinstance(raw, dict) or _CHUNKED in raw:
        raise CheckpointError(
            f"{origin} holds only {_what(raw)} at the top level; a Flax checkpoint "
            "is a map (dict) of variables, e.g. {'params': ...}"
        )
    return _restore(raw, ())


def _decode_error(e: Exception, size: int, origin: str) -> CheckpointError:
    """What msgpack's complaint about the data means."""
    if isinstance(e, msgpack.ExtraData):
        if not isinstance(e.unpacked, dict):
            return CheckpointError(
                f"{origin} is not a Flax msgpack checkpoint: it starts with "
                f"{_what(e.unpacked)}, not a map, and goes on for {len(e.extra)} "
                "more bytes"
            )
        return CheckpointError(
            f"{origin} has {len(e.extra)} unexpected bytes after its data "
            "(two files concatenated, or a corrupt length?)"
        )
    if "incomplete input" in str(e):
        return CheckpointError(
            f"{origin} is truncated: its data ends in the middle of a value "
            f"({size} bytes); was the write interrupted?"
        )
    if "exceeds max_" in str(e):
        # msgpack bounds every declared length by the size of the data.
        return CheckpointError(
            f"{origin} is truncated or corrupt: a declared length is larger than "
            f"its {size} bytes ({e})"
        )
    detail = str(e) or type(e).__name__  # msgpack's FormatError has no text
    return CheckpointError(f"{origin} is not valid msgpack: {detail}")


@typecheck
def read_msgpack(
    source: str | os.PathLike | bytes | bytearray,
    *,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Reads a checkpoint in Flax's msgpack format, without Flax.

    Reads what `flax.serialization.to_bytes(variables)` or
    `flax.training.checkpoints.save_checkpoint` (with Orbax turned off) wrote, and
    returns what `flax.serialization.msgpack_restore` would: arrays larger than 2**30
    bytes, which Flax splits into chunks, come back whole.

    **Arguments:**

    - `source`: a file path, or the file's bytes.
    - `progress`: called as `progress(bytes_read, total_bytes)` while a file is
        read, e.g. to drive a progress bar.

    **Returns:**

    Nested dicts, keyed as stored: by strings, or by ints where the file has
    them (`flax.serialization.msgpack_serialize(nnx.to_pure_dict(...))` keeps
    NNX's list indices as ints, and `msgpack_restore` gives them back so).
    Arrays are read-only numpy arrays
    with the stored dtype (`bfloat16` and the other `ml_dtypes` included); numpy
    scalars, Python scalars (`int`, `float`, `bool`, `complex`, `str`, `None`) and
    lists are returned as they were stored.

    **Raises:**

    - `CheckpointError`: the file cannot be opened, is empty, truncated or corrupt,
        is not a map at the top level, or holds something other than numeric
        arrays, scalars and containers. The message names the offending path,
        e.g. `'params/Dense_0/kernel'`. Nothing is returned in that case.
    """
    if isinstance(source, (bytes, bytearray)):
        return _decode(source, "the checkpoint data")
    path = os.fspath(source)
    return _decode(_read_file(path, progress), f"checkpoint {path!r}")


def _named_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _array_ext(code: int, array: np.ndarray, path: tuple[str, ...]) -> msgpack.ExtType:
    dtype = array.dtype.newbyteorder("=")
    if dtype not in _SUPPORTED:
        raise ValueError(
            f"{where(path)}: cannot store an array of dtype {array.dtype}; only "
            "numeric dtypes (bool, ints, floats, complex, bfloat16 and the other "
            "ml_dtypes) are supported"
        )
    # Not `np.ascontiguousarray`: it turns a 0-d array (a numpy scalar) into 1-d.
    array = np.asarray(array, dtype=dtype, order="C")
    payload = msgpack.packb(
        [list(array.shape), dtype.name, array.tobytes("C")], use_bin_type=True
    )
    return msgpack.ExtType(code, payload)


def _encode_array(array: np.ndarray, path: tuple[str, ...]) -> Any:
    if array.nbytes <= _MAX_CHUNK_BYTES:
        return _array_ext(_EXT_NDARRAY, array, path)
    flat = array.reshape(-1)
    step = max(1, _MAX_CHUNK_BYTES // array.dtype.itemsize)
    pieces = [flat[i : i + step] for i in range(0, flat.size, step)]
    return {
        _CHUNKED: True,
        "shape": {str(i): int(d) for i, d in enumerate(array.shape)},
        "chunks": {
            str(i): _array_ext(_EXT_NDARRAY, p, path) for i, p in enumerate(pieces)
        },
    }


def _encode(node: Any, path: tuple[str, ...]) -> Any:
    if len(path) > MAX_DEPTH:
        raise ValueError(f"{where(path[:3])}...: nested deeper than {MAX_DEPTH}")
    # Containers as Flax's `to_state_dict` stores them: every key a string.
    if (
        isinstance(node, Mapping)
        or _named_tuple(node)
        or isinstance(node, (list, tuple))
    ):
        if isinstance(node, Mapping):
            items = list(node.items())
        elif _named_tuple(node):
            items = [(f, getattr(node, f)) for f in node._fields]
        else:
            items = list(enumerate(node))
        out = {str(k): None for k, _ in items}
        if len(out) != len(items):
            raise ValueError(
                f"{where(path)}: keys {[k for k, _ in items]!r} are not distinct as "
                "strings, and a Flax checkpoint's keys are strings"
            )
        for key, value in items:
            out[str(key)] = _encode(value, (*path, str(key)))
        return out
    if isinstance(node, jax.Array):
        node = np.asarray(node)
    if isinstance(node, np.ndarray):
        return _encode_array(node, path)
    if isinstance(node, np.generic):
        return _array_ext(_EXT_NPSCALAR, np.asarray(node), path)
    if type(node) is complex:
        return msgpack.ExtType(
            _EXT_NATIVE_COMPLEX, msgpack.packb([node.real, node.imag])
        )
    if type(node) is int and not -(2**63) <= node < 2**64:
        raise ValueError(f"{where(path)}: the int {node} does not fit in 64 bits")
    if type(node) in _PLAIN_LEAVES:
        return node
    raise TypeError(
        f"{where(path)}: cannot store {describe(node)}; a checkpoint holds "
        "dicts, lists/tuples, arrays and Python or numpy scalars"
    )


@typecheck
def to_msgpack_bytes(tree: PyTree) -> bytes:
    """Encodes `tree` in Flax's msgpack format, without Flax.

    The result is what `flax.serialization.to_bytes(tree)` gives for a tree of
    dicts, lists, tuples and named tuples: containers become maps with string keys
    (a list as `{"0": ..., "1": ...}`), arrays larger than 2**30 bytes are split
    into chunks. `flax.serialization.from_bytes` and `msgpack_restore` read it.

    **Arguments:**

    - `tree`: a dict (or list, tuple, named tuple) of numpy or JAX arrays, numpy
        scalars, Python scalars and `None`, nested in such containers.

    **Returns:**

    The encoded bytes.

    **Raises:**

    - `TypeError`: a leaf is not an array or scalar, or the tree is a single leaf;
        the message names its path.
    - `ValueError`: an array has an object, string or structured dtype; an `int`
        is wider than 64 bits; two keys of a dict have the same string form.
    """
    encoded = _encode(tree, ())
    if not isinstance(encoded, dict) or _CHUNKED in encoded:
        raise TypeError(
            f"the top level must be a dict of variables (e.g. {{'params': ...}}), "
            f"got {type(tree).__name__}"
        )
    return msgpack.packb(encoded, use_bin_type=True)


@typecheck
def write_msgpack(path: str | os.PathLike, tree: PyTree) -> None:
    """Writes `tree` to `path` in Flax's msgpack format, atomically.

    The tree is encoded in full first (so a bad leaf raises before the file is
    touched), then written to a temporary file in the same directory, flushed to
    disk and renamed over `path`: a crash at any moment leaves either the old file
    or the new one, never a truncated one.

    **Arguments:**

    - `path`: the file to create or replace; its directory must exist.
    - `tree`: as for [`eqx_bn.interop.to_msgpack_bytes`][].

    **Raises:**

    As [`eqx_bn.interop.to_msgpack_bytes`][], and `OSError` if the file cannot be
    written.
    """
    data = to_msgpack_bytes(tree)
    with atomic_write(path) as f:
        f.write(data)

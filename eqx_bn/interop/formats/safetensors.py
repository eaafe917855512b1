"""The safetensors format, read and written without the `safetensors` package.

A file is:

- 8 bytes: `N`, the length of the header, a little-endian unsigned 64-bit integer;
- `N` bytes: a JSON object mapping each tensor's name to `{"dtype": "F32", "shape":
  [...], "data_offsets": [begin, end]}`, plus an optional `"__metadata__"` map of
  strings to strings; the writer pads it with spaces to a multiple of 8 bytes;
- the data: each tensor's bytes, C order, little-endian, at `[begin, end)` from the
  start of the data. The tensors tile the data exactly: no gaps, no overlaps.

Nothing in a file is executed. Every declared size is checked against the bytes
present, so a file cannot make the reader allocate more than it holds.
"""

import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from ..._typing import typecheck
from .atomic import atomic_write
from .errors import CheckpointError
from .shapes import shape_problem
from .sniff import HEAD_BYTES, other_format

_CODES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _CODES["F8_E8M0"] = np.dtype(ml_dtypes.float8_e8m0fnu)
_NAMES = {dtype: code for code, dtype in _CODES.items()}

# The `safetensors` package refuses larger headers; so does this reader, so that a
# corrupt length cannot make it read a whole file as JSON.
_MAX_HEADER = 100_000_000
_METADATA = "__metadata__"


def _header(data: memoryview, origin: str) -> tuple[dict[str, Any], int]:
    if len(data) < 8:
        raise CheckpointError(
            f"{origin} is truncated: {len(data)} bytes, less than the 8-byte header "
            "length of a safetensors file"
        )
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise CheckpointError(
            f"{origin} is truncated or not a safetensors file: its header length "
            f"{n} does not fit in its {len(data)} bytes"
        )
    raw = bytes(data[8 : 8 + n])
    if not raw.startswith(b"{"):
        raise CheckpointError(
            f"{origin} is not a safetensors file: its header is not a JSON object"
        )

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise CheckpointError(f"{origin}: the header names a tensor twice")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{origin}: its header is not valid JSON ({e})") from None
    except RecursionError:
        # json.loads recurses once per nesting level; a real header nests three.
        raise CheckpointError(
            f"{origin}: its header is nested too deeply to be a safetensors header "
            "(a tensor entry is one JSON object of lists)"
        ) from None
    return header, 8 + n


def _entry(
    name: str, info: Any, size: int
) -> tuple[np.dtype, tuple[int, ...], int, int]:
    where = f"tensor {name!r}"
    if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
        raise CheckpointError(
            f"{where}: expected exactly the fields dtype, shape and data_offsets, "
            f"got {info!r}"[:300]
        )
    dtype = _CODES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(
            f"{where}: unsupported dtype {info['dtype']!r}; supported: "
            f"{', '.join(_CODES)}"
        )
    shape, offsets = info["shape"], info["data_offsets"]
    # A forged shape (`[0, 2**62, 2**62]`, 100 axes) must not reach numpy, which
    # refuses it with a plain ValueError rather than a CheckpointError.
    problem = shape_problem(shape, dtype.itemsize)
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= size
    ):
        raise CheckpointError(
            f"{where}: data_offsets {offsets!r} do not lie within the "
            f"{size} bytes of data (truncated file?)"
        )
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"{where}: shape {tuple(shape)} of {info['dtype']} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes, data_offsets give "
            f"{end - begin}"
        )
    return dtype, tuple(shape), begin, end


def _decode(data: memoryview, origin: str) -> dict[str, np.ndarray]:
    try:
        header, start = _header(data, origin)
    except CheckpointError:
        # A file in another format fails here: say which, and the reader to use.
        other = other_format(bytes(data[:HEAD_BYTES]), len(data), "safetensors")
        if other is None:
            raise
        raise CheckpointError(f"{origin} is not a safetensors file: {other}") from None
    body = data[start:]
    metadata = header.pop(_METADATA, None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{origin}: __metadata__ must map strings to strings")
    entries = {}
    try:
        for name, info in header.items():
            entries[name] = _entry(name, info, len(body))
    except CheckpointError as e:
        raise CheckpointError(f"{origin}: {e}") from None
    # The tensors must tile the data: anything else is a corrupt file.
    spans = sorted((begin, end) for _, _, begin, end in entries.values())
    position = 0
    for begin, end in spans:
        if begin != position:
            raise CheckpointError(
                f"{origin}: the tensors' data overlap or leave a gap at byte "
                f"{min(begin, position)} of the data"
            )
        position = end
    if position != len(body):
        raise CheckpointError(
            f"{origin}: the tensors take {position} bytes but the data holds "
            f"{len(body)} (truncated, or bytes appended?)"
        )
    out = {}
    # By name, as the `safetensors` package lists them (the file orders them by
    # dtype size for alignment).
    for name, (dtype, shape, begin, end) in sorted(entries.items()):
        array = np.frombuffer(body[begin:end], dtype=dtype.newbyteorder("<"))
        array = array.astype(dtype, copy=False).reshape(shape)
        array.flags.writeable = False
        out[name] = array
    return out


@typecheck
def read_safetensors(source: str | os.PathLike | bytes | bytearray) -> dict[str, Any]:
    """Reads a `.safetensors` file, without the `safetensors` package.

    **Arguments:**

    - `source`: a file path, or the file's bytes.

    **Returns:**

    `{name: array}`, flat, sorted by name (e.g. `"layer1.0.bn1.running_var"`): read-only
    numpy arrays of the stored dtype (`BF16` and the float8 types as `ml_dtypes`).
    The header's `__metadata__` is not returned.

    **Raises:**

    - `CheckpointError`: the file cannot be opened, is truncated or corrupt (a
        header length beyond the file, invalid JSON, offsets that do not tile the
        data, sizes that do not match shapes) or has an unsupported dtype.
    """
    if isinstance(source, (bytes, bytearray)):
        return _decode(memoryview(source), "the safetensors data")
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: {e.strerror or e}"
        ) from e
    return _decode(memoryview(data), f"checkpoint {path!r}")


@typecheck
def to_safetensors_bytes(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Encodes `{name: array}` in the safetensors format.

    Tensors are laid out as the `safetensors` package does (larger dtypes first,
    then by name), so its readers and `safetensors.torch.load_file` read them.

    **Arguments:**

    - `tensors`: flat `{name: array}` of numpy or JAX arrays (or numpy scalars).
    - `metadata`: strings stored under the header's `__metadata__`.

    **Returns:**

    The encoded bytes.

    **Raises:**

    - `TypeError`: a value is not an array.
    - `ValueError`: an array's dtype has no safetensors code, or a name is
        `__metadata__`.
    """
    arrays = {}
    for name, value in tensors.items():
        if name == _METADATA:
            raise ValueError(f"a tensor cannot be named {_METADATA!r}")
        if isinstance(value, jax.Array):
            value = np.asarray(value)
        if not isinstance(value, (np.ndarray, np.generic)):
            raise TypeError(
                f"tensor {name!r} is a {type(value).__name__}, not an array"
            )
        array = np.asarray(value)
        dtype = array.dtype.newbyteorder("=")
        if dtype not in _NAMES:
            raise ValueError(
                f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot "
                f"store; supported: {', '.join(str(d) for d in _NAMES)}"
            )
        arrays[name] = array.astype(dtype.newbyteorder("<"), copy=False)
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    header: dict[str, Any] = {}
    if metadata:
        header[_METADATA] = dict(metadata)
    offset = 0
    for name in order:
        array = arrays[name]
        header[name] = {
            "dtype": _NAMES[array.dtype.newbyteorder("=")],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    parts = [struct.pack("<Q", len(raw)), raw]
    parts += [np.ascontiguousarray(arrays[n]).tobytes() for n in order]
    return b"".join(parts)


@typecheck
def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes `{name: array}` to a `.safetensors` file, atomically.

    The file is encoded in full first, then written to a temporary file beside
    `path`, flushed and renamed over it: a crash leaves the old file or the new.

    **Arguments:**

    - `path`: the file to create or replace; its directory must exist.
    - `tensors`, `metadata`: as for [`eqx_bn.interop.to_safetensors_bytes`][], e.g.
        the result of [`eqx_bn.interop.export_torch`][].

    **Raises:**

    As `to_safetensors_bytes`, and `OSError` if the file cannot be written.
    """
    data = to_safetensors_bytes(tensors, metadata)
    with atomic_write(path) as f:
        f.write(data)

"""PyTorch's `torch.save` files, read without torch and without running their code.

The format (`torch.save`'s default since PyTorch 1.6) is a zip archive whose records
sit under one folder, named after the file when it was saved:

- `data.pkl`: a pickle of the saved object. Each tensor in it is a call of
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` (or `_v3`,
  which adds the dtype, for the newer dtypes), and each storage a *persistent id*
  `("storage", storage type, key, location, numel)`;
- `data/<key>`: the raw bytes of each storage;
- `byteorder`: `little` or `big` (absent in old files: little).

A pickle may name any Python callable and have it called, so a plain `pickle.load`
of an untrusted file runs the file's code. Here the unpickler resolves only the
names a saved state dict needs (the tensor and parameter rebuild functions, the
storage and dtype names, `collections.OrderedDict`) to functions of this module
that build numpy arrays; any other name is refused before anything is called.
"""

import math
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from typing import Any

import ml_dtypes
import numpy as np

from .._typing import typecheck
from .errors import CheckpointError

# torch's names of its dtypes (`str(torch.float32)` without `torch.`), as numpy.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}
for _name in (
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
):
    if hasattr(ml_dtypes, _name):
        _TORCH_DTYPES[_name] = np.dtype(getattr(ml_dtypes, _name))

# The typed storage classes that `torch.save` names (`torch.FloatStorage`, ...).
_STORAGE_TYPES: dict[str, np.dtype] = {
    "DoubleStorage": _TORCH_DTYPES["float64"],
    "FloatStorage": _TORCH_DTYPES["float32"],
    "HalfStorage": _TORCH_DTYPES["float16"],
    "BFloat16Storage": _TORCH_DTYPES["bfloat16"],
    "LongStorage": _TORCH_DTYPES["int64"],
    "IntStorage": _TORCH_DTYPES["int32"],
    "ShortStorage": _TORCH_DTYPES["int16"],
    "CharStorage": _TORCH_DTYPES["int8"],
    "ByteStorage": _TORCH_DTYPES["uint8"],
    "BoolStorage": _TORCH_DTYPES["bool"],
    "ComplexFloatStorage": _TORCH_DTYPES["complex64"],
    "ComplexDoubleStorage": _TORCH_DTYPES["complex128"],
}

_MAX_DEPTH = 100
# How torch.save's legacy format starts: pickle protocol 2, then its magic number
# as a LONG1.
_LEGACY_TORCH = b"\x80\x02\x8a"


class _Resolved:
    """What a name in the pickle resolves to. Shared by every read, so it must not
    be changed by one: pickle's BUILD opcode (which sets attributes) is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise CheckpointError(f"the pickle sets attributes on {self!r}")


class _StorageType(_Resolved):
    """A storage class name: its element dtype (`None` for
    `torch.storage.UntypedStorage`, which holds bytes)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype | None):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _TorchDtype(_Resolved):
    """`torch.float32` and the other dtype names."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = _TORCH_DTYPES[name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Function(_Resolved):
    """A rebuild function of `torch._utils`, implemented here."""

    __slots__ = ("name", "function")

    def __init__(self, name: str, function: Any):
        self.name = name
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"torch._utils.{self.name}"


class _Storage(_Resolved):
    """One storage: its bytes, read from `data/<key>` when the pickle names it."""

    __slots__ = ("key", "data", "dtype")

    def __init__(self, key: str, data: bytes, dtype: np.dtype | None):
        self.key = key
        self.data = data
        self.dtype = dtype


class _Tensor(_Resolved):
    """A rebuilt tensor. Pickle's BUILD opcode on it is refused (a tensor has no
    state to set), so only the values computed here end up in the result."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __repr__(self) -> str:
        return "a tensor"


class _StateDict(OrderedDict):
    """`collections.OrderedDict` as the pickle builds it. A module's `state_dict()`
    carries a `_metadata` attribute (versions of its submodules), which the pickle
    restores with BUILD; it is dropped."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointError("the pickle sets a non-dict state on a dict")


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and all(type(v) is int for v in value)):
        raise CheckpointError(f"a tensor's {what} is {value!r}, not a tuple of ints")
    return value


def _view(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    dtype: np.dtype,
) -> _Tensor:
    """The tensor `storage[offset:]` viewed with `size` and `stride` (in elements),
    copied out of the storage so that views of one storage do not alias."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(
            "a tensor is rebuilt from something that is not a storage"
        )
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise CheckpointError(
            f"a tensor has offset {offset!r}, size {size} and stride {stride}: "
            "expected a non-negative offset and one stride per dimension"
        )
    if any(d < 0 for d in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"a tensor has negative size {size} or stride {stride}")
    numel = len(storage.data) // dtype.itemsize
    if math.prod(size) == 0:
        return _Tensor(np.zeros(size, dtype))
    last = offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= numel:
        raise CheckpointError(
            f"a tensor of size {size}, stride {stride} at offset {offset} reaches "
            f"element {last} of storage {storage.key!r}, which holds {numel} "
            f"{dtype.name} elements"
        )
    if math.prod(size) > numel:
        raise CheckpointError(
            f"a tensor of size {size} has more elements than its storage "
            f"{storage.key!r} ({numel}), e.g. an expanded view; save "
            "`tensor.contiguous()` instead"
        )
    flat = np.frombuffer(storage.data, dtype=dtype, count=numel)
    view = np.lib.stride_tricks.as_strided(
        flat[offset:],
        shape=size,
        strides=tuple(s * dtype.itemsize for s in stride),
        writeable=False,
    )
    array = np.array(view, order="C")
    array.flags.writeable = False
    return _Tensor(array)


def _rebuild_tensor_v2(
    storage, offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    if not isinstance(storage, _Storage) or storage.dtype is None:
        raise CheckpointError("_rebuild_tensor_v2 needs a typed storage")
    return _view(storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(
    storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    if not isinstance(dtype, _TorchDtype):
        raise CheckpointError(f"_rebuild_tensor_v3 got dtype {dtype!r}")
    if isinstance(storage, _Storage) and storage.dtype not in (None, dtype.dtype):
        raise CheckpointError(
            f"a {dtype.name} tensor is rebuilt from a typed storage of "
            f"{storage.dtype.name}"
        )
    return _view(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    # An `nn.Parameter`: the tensor it wraps.
    if not isinstance(data, _Tensor):
        raise CheckpointError("a parameter wraps something that is not a tensor")
    return data


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _StateDict,
    **{
        ("torch._utils", name): _Function(name, function)
        for name, function in (
            ("_rebuild_tensor_v2", _rebuild_tensor_v2),
            ("_rebuild_tensor_v3", _rebuild_tensor_v3),
            ("_rebuild_parameter", _rebuild_parameter),
            ("_rebuild_parameter_with_state", _rebuild_parameter),
        )
    },
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", None),
    **{("torch", n): _StorageType(n, d) for n, d in _STORAGE_TYPES.items()},
    **{("torch", n): _TorchDtype(n) for n in _TORCH_DTYPES},
}


def _to_little_endian(data: bytes, dtype: np.dtype | None, key: str) -> bytes:
    """A big-endian storage's bytes in little-endian order."""
    if dtype is None:
        raise CheckpointError(
            f"storage {key!r} is an untyped storage in a big-endian file, which is "
            "not supported; save the file on a little-endian machine"
        )
    # Complex numbers are two floats, each swapped on its own.
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    if unit == 1:
        return data
    return np.frombuffer(data, dtype=f">u{unit}").astype(f"<u{unit}").tobytes()


class _Unpickler(pickle.Unpickler):
    """Resolves only `_GLOBALS`; storages come from the archive's records."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, big: bool):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._big = big
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _GLOBALS.get((module, name))
        if found is None:
            raise CheckpointError(
                f"refusing to load `{module}.{name}`: a PyTorch checkpoint is read "
                "without running its code, so only tensors, parameters and "
                "dicts/lists of them (a state_dict, or a dict holding one) are "
                "accepted. Save `model.state_dict()` rather than the model "
                "object, or convert the file with torch to .safetensors."
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
        ):
            raise CheckpointError(f"unsupported persistent id {pid!r} in data.pkl")
        _, kind, key, _location, numel = pid
        if key in self._storages:
            return self._storages[key]
        record = f"{self._prefix}data/{key}"
        try:
            data = self._archive.read(record)
        except KeyError:
            raise CheckpointError(
                f"storage {key!r} is missing: no record {record!r} in the archive"
            ) from None
        dtype = kind.dtype
        itemsize = 1 if dtype is None else dtype.itemsize
        if len(data) != numel * itemsize:
            raise CheckpointError(
                f"storage {key!r} declares {numel} elements of {itemsize} bytes "
                f"but its record holds {len(data)} bytes"
            )
        if self._big:
            data = _to_little_endian(data, dtype, key)
        self._storages[key] = _Storage(key, data, dtype)
        return self._storages[key]


def _plain(node: Any, path: tuple[str, ...]) -> Any:
    """The unpickled tree with numpy arrays for tensors and plain dicts."""
    where = f"at {'.'.join(path)!r}" if path else "at the top level"
    if len(path) > _MAX_DEPTH:
        raise CheckpointError(f"{where}: nested deeper than {_MAX_DEPTH}")
    if isinstance(node, _Tensor):
        return node.array
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where}: unsupported key {key!r}")
            out[key] = _plain(value, (*path, str(key)))
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_plain(v, (*path, str(i))) for i, v in enumerate(node))
    if node is None or type(node) in (bool, int, float, str, bytes):
        return node
    raise CheckpointError(
        f"{where}: unsupported value of type {type(node).__name__} (a storage or "
        "dtype outside a tensor?)"
    )


def _prefix(names: list[str], origin: str) -> str:
    pickles = [n for n in names if n.endswith("data.pkl")]
    pickles = [n for n in pickles if n.count("/") <= 1]
    if len(pickles) != 1:
        raise CheckpointError(
            f"{origin} is a zip archive but not a torch.save file: expected one "
            f"'<name>/data.pkl' record, found {pickles or 'none'}"
        )
    return pickles[0][: -len("data.pkl")]


@typecheck
def read_torch(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a PyTorch checkpoint written by `torch.save`, without torch.

    No code from the file is run: the pickle inside may only rebuild tensors,
    parameters and dicts, lists and tuples of them with plain Python values (a
    `state_dict()`, or a dict such as `{"state_dict": ..., "epoch": 3}`). Anything
    else, a whole `nn.Module` included, is refused.

    **Arguments:**

    - `path`: a `.pt`/`.pth`/`.bin` file in the zip format that `torch.save` writes
        by default since PyTorch 1.6.

    **Returns:**

    The saved dict with every tensor as a read-only, C-contiguous numpy array of
    its dtype (`bfloat16` and the float8 types as `ml_dtypes`; views of one storage
    are separate copies). A `state_dict()` gives `{"layer1.0.bn1.running_var":
    array, ...}`, ready for [`eqx_bn.interop.load_torch`][].

    **Raises:**

    - `CheckpointError`: the file is missing, not a zip, truncated or corrupt, in
        the legacy (pre-1.6) format, holds something other than a dict at the top,
        or names anything outside the accepted globals. Nothing is returned then.
    """
    path = os.fspath(path)
    origin = f"checkpoint {path!r}"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"cannot read {origin}: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(f"{origin} is empty")
    if head[:3] == _LEGACY_TORCH:
        raise CheckpointError(
            f"{origin} is in torch.save's legacy format (before PyTorch 1.6, or "
            "_use_new_zipfile_serialization=False), which is not read. Load it "
            "with torch and save it again with torch.save, or with "
            "safetensors.torch.save_file."
        )
    if head != b"PK\x03\x04":
        raise CheckpointError(
            f"{origin} is not a torch.save file: it does not start as a zip archive"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _prefix(archive.namelist(), origin)
            order = b"little"
            if f"{prefix}byteorder" in archive.namelist():
                order = archive.read(f"{prefix}byteorder").strip()
            if order not in (b"little", b"big"):
                raise CheckpointError(f"{origin}: unknown byteorder {order!r}")
            with archive.open(f"{prefix}data.pkl") as f:
                unpickler = _Unpickler(f, archive, prefix, order == b"big")
                tree = unpickler.load()
    except CheckpointError as e:
        raise CheckpointError(f"{origin}: {e}") from None
    except (zipfile.BadZipFile, NotImplementedError, zlib.error) as e:
        # NotImplementedError: a corrupt header names a zip feature or compression
        # method that zipfile does not have (torch.save stores records uncompressed).
        raise CheckpointError(
            f"{origin} is truncated or corrupt: not a readable zip archive ({e}); "
            "was the write interrupted?"
        ) from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(
            f"{origin}: its data.pkl is truncated or corrupt ({e or type(e).__name__})"
        ) from None
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OSError,
        RecursionError,
        MemoryError,
        OverflowError,
        struct.error,
    ) as e:
        raise CheckpointError(
            f"{origin}: cannot be read ({type(e).__name__}: {e})"
        ) from None
    if isinstance(tree, _Tensor):
        raise CheckpointError(
            f"{origin} holds a single tensor; expected a dict of tensors (a "
            "state_dict). Save `{'name': tensor}` or `model.state_dict()`."
        )
    if not isinstance(tree, dict):
        raise CheckpointError(
            f"{origin} holds a {type(tree).__name__} at the top level; expected "
            "a dict (a state_dict, or a dict holding one)"
        )
    try:
        return _plain(tree, ())
    except CheckpointError as e:
        raise CheckpointError(f"{origin}: {e}") from None

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

Memory and time stay bounded by the file's size: only uncompressed records are
read (torch.save writes no other; a compressed one could be a zip bomb), each only
after its size is checked against the pickle's, and the pickle's memo cannot make
the reader copy a storage or walk a shared container over and over (see `_view`
and `_plain`).
"""

import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from ..._describe import describe
from ..._typing import typecheck
from .errors import CheckpointError
from .shapes import shape_problem
from .sniff import HEAD_BYTES, LEGACY_TORCH, ZIP, other_format
from .tree import MAX_DEPTH, select_entries, where

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

# How many values `_plain` may visit beyond one per byte of the pickle. A tree
# without shared parts has fewer values than its pickle has bytes (each takes at
# least an opcode); only a pickle that reuses one container many times through its
# memo (x1 = [x0, x0], x2 = [x1, x1], ...: exponential in the file's size) needs
# more. A real state_dict has at most a few thousand entries.
_MAX_EXTRA_VALUES = 1_000_000


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


class _Budget:
    """The bytes that tensors may still copy out of their storages in one read."""

    __slots__ = ("left", "total")

    def __init__(self, total: int):
        self.left = total
        self.total = total


class _Storage(_Resolved):
    """One storage: its bytes, read from `data/<key>` when the pickle names it, and
    the copy budget of the read it belongs to."""

    __slots__ = ("key", "data", "dtype", "budget")

    def __init__(self, key: str, data: bytes, dtype: np.dtype | None, budget: _Budget):
        self.key = key
        self.data = data
        self.dtype = dtype
        self.budget = budget


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


_WHY = (
    "a PyTorch checkpoint is read without running its code, so only tensors, "
    "parameters and dicts/lists of them (a state_dict, or a dict holding one) and "
    "plain values are accepted"
)


def _refusal(qualname: str) -> str:
    return f"refusing to load `{qualname}`: {_WHY}"


_SAVE_STATE_DICT = (
    "Save `model.state_dict()` rather than the model object, or convert the file "
    "with torch to .safetensors."
)


class _RefusedGlobal(_Resolved):
    """A name outside `_GLOBALS` (`argparse.Namespace`, `os.system`): never
    imported; calling or instantiating it gives a `_Refused` in its place, so that
    the rest of the file can still be read and the entry holding it named."""

    __slots__ = ("qualname",)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # Pickle's NEWOBJ opcode calls `cls.__new__(cls, *args)` with this
        # object as `cls`.
        if isinstance(cls, _RefusedGlobal):
            return _Refused(cls.qualname)
        return super().__new__(cls)

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __call__(self, *args: Any, **kwargs: Any) -> "_Refused":
        return _Refused(self.qualname)

    def __repr__(self) -> str:
        return f"`{self.qualname}`"


class _Refused:
    """What an object of a refused class is unpickled as: its name only. The
    state and items the pickle gives it are dropped."""

    __slots__ = ("qualname",)

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def add(self, value: Any) -> None:
        pass


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
    as a read-only, C-contiguous array.

    A contiguous view is returned as it is, sharing the storage's bytes: a pickle
    can rebuild one storage any number of times for a few bytes each, and copying
    each would let a small file fill the memory. Only non-contiguous views (e.g. a
    transposed weight) are copied, at most the read's budget of bytes in all.
    """
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
    problem = shape_problem(list(size), dtype.itemsize)
    if problem is not None:
        raise CheckpointError(f"a tensor's {problem}")
    numel = len(storage.data) // dtype.itemsize
    if math.prod(size) == 0:
        array = np.zeros(size, dtype)
        array.flags.writeable = False
        return _Tensor(array)
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
    if view.flags.c_contiguous:
        return _Tensor(view)
    budget = storage.budget
    if view.nbytes > budget.left:
        raise CheckpointError(
            f"its non-contiguous tensors would copy more than {budget.total} bytes "
            "out of their storages, the size of the file: the pickle rebuilds "
            "views of one storage over and over. A file saved by torch.save copies "
            "far less; save contiguous tensors (`tensor.contiguous()`)"
        )
    budget.left -= view.nbytes
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


def _read_record(
    archive: zipfile.ZipFile, name: str, limit: int, size: int | None = None
) -> bytes:
    """The bytes of one record, read only if they are stored uncompressed and fit in
    the file, so that what is read never exceeds the file's own size.

    **Arguments:**

    - `archive`: the open torch.save archive.
    - `name`: the record's name in it.
    - `limit`: the size of the file in bytes.
    - `size`: the record's expected size in bytes, if known.

    **Returns:**

    The record's bytes.

    **Raises:**

    - `KeyError`: there is no such record.
    - `CheckpointError`: the record is compressed, larger than the file, or not
        `size` bytes.
    """
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        # zipfile would decompress the whole record before any size check: a few
        # hundred bytes of bzip2 can expand to gigabytes.
        raise CheckpointError(
            f"record {name!r} is compressed (zip method {info.compress_type}); "
            "torch.save stores every record uncompressed, and a compressed one is "
            "not read because it could expand without bound. Load the file with "
            "torch and save it again with torch.save."
        )
    if info.compress_size != info.file_size or info.file_size > limit:
        raise CheckpointError(
            f"record {name!r} declares {info.file_size} bytes ({info.compress_size} "
            f"stored) in a file of {limit} bytes: the zip directory is corrupt"
        )
    if size is not None and info.file_size != size:
        raise CheckpointError(f"record {name!r} holds {info.file_size} bytes")
    return archive.read(info)


class _Unpickler(pickle._Unpickler):
    """Resolves only `_GLOBALS`; storages come from the archive's records.

    The pure-Python unpickler (torch's own `weights_only` loader is pure Python
    too): the C one allocates ahead from the memo indices a pickle declares (a
    255-byte pickle with memo index 2**26 takes a gigabyte), the Python one keeps
    its memo in a dict and reads only the bytes present.
    """

    def __init__(
        self, file, archive: zipfile.ZipFile, prefix: str, big: bool, limit: int
    ):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._big = big
        self._limit = limit
        self._budget = _Budget(limit)
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Any other name stands in as a placeholder, never imported: the entry
        # holding it is refused once the tree is known, and named.
        return _GLOBALS.get((module, name)) or _RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if isinstance(pid, tuple) and len(pid) > 1:
            if isinstance(pid[1], _RefusedGlobal):  # e.g. torch.ObjectStorage
                raise CheckpointError(
                    f"{_refusal(pid[1].qualname)}. {_SAVE_STATE_DICT}"
                )
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
        dtype = kind.dtype
        itemsize = 1 if dtype is None else dtype.itemsize
        try:
            info = self._archive.getinfo(record)
        except KeyError:
            raise CheckpointError(
                f"storage {key!r} is missing: no record {record!r} in the archive"
            ) from None
        # Checked before reading, so that a record's bytes are read only when the
        # pickle and the zip directory agree on their size.
        if info.file_size != numel * itemsize:
            raise CheckpointError(
                f"storage {key!r} declares {numel} elements of {itemsize} bytes "
                f"but its record holds {info.file_size} bytes"
            )
        data = _read_record(self._archive, record, self._limit, numel * itemsize)
        if self._big:
            data = _to_little_endian(data, dtype, key)
        self._storages[key] = _Storage(key, data, dtype, self._budget)
        return self._storages[key]


class _Count:
    """The values `_plain` may still visit, and the refused objects it met (their
    paths and names)."""

    __slots__ = ("left", "total", "refused")

    def __init__(self, total: int):
        self.left = total
        self.total = total
        self.refused: list[tuple[tuple[str, ...], str]] = []


def _plain(node: Any, path: tuple[str, ...], count: _Count) -> Any:
    """The unpickled tree with numpy arrays for tensors and plain dicts."""
    at = where(path, ".")
    if len(path) > MAX_DEPTH:
        raise CheckpointError(f"{at}: nested deeper than {MAX_DEPTH}")
    count.left -= 1
    if count.left < 0:
        raise CheckpointError(
            f"{at}: the pickle holds more than {count.total} values once its "
            "shared lists and dicts are expanded (one container reused over and "
            "over, e.g. x1 = [x0, x0], x2 = [x1, x1], ...); a state_dict has at "
            "most a few thousand entries"
        )
    if isinstance(node, _Tensor):
        return node.array
    if isinstance(node, (_Refused, _RefusedGlobal)):
        count.refused.append((path, node.qualname))
        return None
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{at}: unsupported key {key!r}")
            out[key] = _plain(value, (*path, str(key)), count)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_plain(v, (*path, str(i)), count) for i, v in enumerate(node))
    if node is None or type(node) in (bool, int, float, str, bytes):
        return node
    raise CheckpointError(
        f"{at}: unsupported value of type {type(node).__name__} (a storage or "
        "dtype outside a tensor?)"
    )


def _prefix(names: list[str], origin: str) -> str:
    # Not `endswith("data.pkl")`, which would take `archive/xdata.pkl` too.
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    pickles = [n for n in pickles if n.count("/") <= 1]
    if len(pickles) != 1:
        raise CheckpointError(
            f"{origin} is a zip archive but not a torch.save file: expected one "
            f"'<name>/data.pkl' record, found {pickles or 'none'}"
        )
    return pickles[0][: -len("data.pkl")]


@typecheck
def read_torch(
    path: str | os.PathLike, *, keys: Sequence[str] | None = None
) -> dict[str, Any]:
    """Reads a PyTorch checkpoint written by `torch.save`, without torch.

    No code from the file is run: the pickle inside may only rebuild tensors,
    parameters and dicts, lists and tuples of them with plain Python values (a
    `state_dict()`, or a dict such as `{"state_dict": ..., "epoch": 3}`). Anything
    else, a whole `nn.Module` included, is refused, and never imported or called:
    the error names each entry that holds such an object. A training checkpoint
    that saves one beside the model's weights (torchvision's reference scripts
    save `{"model": ..., "optimizer": ..., "args": argparse.Namespace(...),
    "epoch": ...}`) is read with `keys=["model"]`. Memory stays within a small
    multiple of the file's size: records are read only uncompressed (as torch.save
    writes them) and only when their size matches what the pickle declares.

    **Arguments:**

    - `path`: a `.pt`/`.pth`/`.bin` file in the zip format that `torch.save` writes
        by default since PyTorch 1.6.
    - `keys`: only these top-level entries (all if `None`); what the others hold
        is not checked.

    **Returns:**

    The saved dict with every tensor as a read-only, C-contiguous numpy array of
    its dtype (`bfloat16` and the float8 types as `ml_dtypes`; contiguous tensors
    share their storage's bytes, non-contiguous ones are copied; `np.array(x)`
    gives a writable copy). A `state_dict()` gives `{"layer1.0.bn1.running_var":
    array, ...}`, ready for [`eqx_bn.interop.load_torch`][].

    **Raises:**

    - `CheckpointError`: the file is missing, not a zip, truncated or corrupt, in
        the legacy (pre-1.6) format, holds something other than a dict at the top,
        or holds an object of a class outside the accepted ones (in the entries
        read); lacks one of `keys`; or it could make the
        reader use memory or time out of proportion to its size (a compressed
        record, which torch.save never writes; views copied beyond the file's
        size; a structure expanding to more than a million values). Nothing is
        returned then.
    """
    path = os.fspath(path)
    origin = f"checkpoint {path!r}"
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"cannot read {origin}: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(f"{origin} is empty")
    if head[:3] == LEGACY_TORCH:
        raise CheckpointError(
            f"{origin} is in torch.save's legacy format (before PyTorch 1.6, or "
            "_use_new_zipfile_serialization=False), which is not read. Load it "
            "with torch and save it again with torch.save, or with "
            "safetensors.torch.save_file."
        )
    if head[:4] != ZIP:
        other = other_format(head, size, "torch")
        raise CheckpointError(
            f"{origin} is not a torch.save file: "
            + (other or "it does not start as a zip archive")
        )
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _prefix(archive.namelist(), origin)
            order = b"little"
            if f"{prefix}byteorder" in archive.namelist():
                order = _read_record(archive, f"{prefix}byteorder", size).strip()
            if order not in (b"little", b"big"):
                raise CheckpointError(f"{origin}: unknown byteorder {order!r}")
            pickled = _read_record(archive, f"{prefix}data.pkl", size)
            unpickler = _Unpickler(
                io.BytesIO(pickled), archive, prefix, order == b"big", size
            )
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
    if isinstance(tree, (_Refused, _RefusedGlobal)):
        raise CheckpointError(
            f"{origin}: {_refusal(tree.qualname)}. {_SAVE_STATE_DICT}"
        )
    if not isinstance(tree, dict):
        raise CheckpointError(
            f"{origin} holds {describe(tree)} at the top level; expected a dict "
            "(a state_dict, or a dict holding one)"
        )
    count = _Count(len(pickled) + _MAX_EXTRA_VALUES)
    try:
        out = _plain(select_entries(tree, keys, origin), (), count)
    except CheckpointError as e:
        raise CheckpointError(f"{origin}: {e}") from None
    if count.refused:
        raise _refused_entries(origin, tree, count.refused)
    return out


def _refused_entries(
    origin: str, tree: dict, refused: list[tuple[tuple[str, ...], str]]
) -> CheckpointError:
    """The error naming each entry that holds a refused object and, when other
    top-level entries are fine (a training checkpoint's `model` beside its
    `args`), how to read those alone."""
    named = ", ".join(f"`{name}` at {'.'.join(path)!r}" for path, name in refused[:5])
    more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
    message = f"{origin}: refusing to load {named}{more}: {_WHY}."
    bad = {path[0] for path, _ in refused}
    fine = [k for k in tree if str(k) not in bad]
    if not fine:
        return CheckpointError(f"{message} {_SAVE_STATE_DICT}")
    dicts = [k for k in fine if isinstance(tree[k], dict)]
    flag = f" (`--key {dicts[0]}` on the command line)" if dicts else ""
    return CheckpointError(
        f"{message} The other entries can be read on their own: pass "
        f"keys={[str(k) for k in (dicts or fine)]!r} to read_torch or "
        f"read_checkpoint{flag}."
    )
